"""Optimizer steps against slow references, torch.optim.AdamW and transformers.Adafactor; state round-trips."""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch
from conftest import assert_close_on_scale
from torch import nn

from hf_galore.errors import InvalidConfigError
from hf_galore.methods.galore import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
)
from hf_galore.optim._reference import ReferenceGaLoreAdafactor, ReferenceGaLoreAdamW
from hf_galore.projection.subspace import Side

SHAPES = {"tall": (23, 11), "wide": (11, 23), "square": (16, 16)}
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def _pair(shape, dtype=torch.float32):
    a = nn.Parameter(torch.randn(*shape, dtype=dtype))
    b = nn.Parameter(a.detach().clone())
    return a, b


def _feed(params, grad):
    for p in params:
        p.grad = grad.clone()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_galore_adamw_matches_reference_over_refreshes(shape, proj_type, weight_decay):
    # `full` makes Pᵀ G Q diagonal at a refresh step: its off-diagonal entries are fp32 round-off that Adam
    # normalises to ±1, so a larger eps keeps the comparison about the algorithm, not about round-off.
    eps = 1e-2 if proj_type == "full" else 1e-8
    kwargs = dict(lr=1e-2, weight_decay=weight_decay, eps=eps, rank=4, update_proj_gap=3, scale=0.5)
    a, b = _pair(shape)
    ours = GaLoreAdamW([{"params": [a], "low_rank": True}], proj_type=proj_type, svd="exact", **kwargs)
    ref = ReferenceGaLoreAdamW([b], proj_type=proj_type, **kwargs)
    for _ in range(8):  # refreshes at steps 0, 3, 6
        _feed([a, b], torch.randn(*shape))
        ours.step()
        ref.step()
    assert_close_on_scale(a, b)
    assert ours.state[a]["refresh_count"] == 3


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_svd_signs_follow_galore_torchs_trajectory_over_many_refreshes(shape):
    """`refresh_signs="svd"`, `svd="exact"`: the SVD's own signs, as galore-torch uses them, so the moments carried
    across each of the 5 refreshes meet the same basis as in the reference, step for step."""
    torch.manual_seed(4)
    kwargs = dict(lr=1e-2, weight_decay=0.01, rank=4, update_proj_gap=2, scale=0.25)
    a, b = _pair(shape)
    w0 = a.detach().clone()
    ours = GaLoreAdamW([{"params": [a], "low_rank": True}], svd="exact", refresh_signs="svd", **kwargs)
    ref = ReferenceGaLoreAdamW([b], signs="svd", **kwargs)
    for _ in range(10):  # refreshes at steps 0, 2, 4, 6, 8
        _feed([a, b], torch.randn(*shape))
        ours.step()
        ref.step()
        # on the scale of the distance travelled, so the check does not depend on fp32 noise of the weights
        assert float((a - b).norm()) <= 1e-4 * float((b - w0).norm())
    assert ours.state[a]["refresh_count"] == 5


@pytest.mark.parametrize("signs", ["canonical", "aligned", "rotate"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_every_sign_convention_matches_the_reference(shape, proj_type, signs):
    torch.manual_seed(7)
    kwargs = dict(lr=1e-2, weight_decay=0.01, rank=4, update_proj_gap=2, scale=0.25)
    a, b = _pair(shape)
    w0 = a.detach().clone()
    ours = GaLoreAdamW([{"params": [a], "low_rank": True}], svd="exact", refresh_signs=signs, proj_type=proj_type,
                       **kwargs)  # fmt: skip
    ref = ReferenceGaLoreAdamW([b], signs=signs, proj_type=proj_type, **kwargs)
    for _ in range(9):
        _feed([a, b], torch.randn(*shape))
        ours.step()
        ref.step()
        assert float((a - b).norm()) <= 1e-4 * float((b - w0).norm())


@pytest.mark.parametrize("signs", ["canonical", "aligned", "rotate"])
def test_other_sign_conventions_leave_the_svd_trajectory(signs):
    """The knob is live: with a refresh every 2 steps, another convention moves the weights elsewhere."""
    torch.manual_seed(4)
    kwargs = dict(lr=1e-2, rank=4, update_proj_gap=2, scale=0.25, svd="exact")
    a, b = _pair((23, 11))
    ours = GaLoreAdamW([{"params": [a], "low_rank": True}], refresh_signs=signs, **kwargs)
    svd = GaLoreAdamW([{"params": [b], "low_rank": True}], refresh_signs="svd", **kwargs)
    for _ in range(6):
        _feed([a, b], torch.randn(23, 11))
        ours.step()
        svd.step()
    assert not torch.allclose(a, b, rtol=0, atol=1e-5)


def test_aligned_signs_agree_with_the_previous_basis():
    torch.manual_seed(5)
    w = nn.Parameter(torch.randn(30, 12))
    opt = GaLoreAdamW([{"params": [w], "low_rank": True}], lr=1e-2, rank=4, update_proj_gap=1, svd="exact",
                      refresh_signs="aligned")  # fmt: skip
    previous = None
    for _ in range(4):
        w.grad = torch.randn(30, 12)
        opt.step()
        basis = opt.state[w]["proj_right"]
        if previous is not None:
            assert bool(((basis * previous).sum(dim=0) >= 0).all())
        previous = basis.clone()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_rotate_carries_the_first_moment_into_a_rotated_basis_of_the_same_subspace(cls):
    """A new gradient whose top-4 right singular space is the old one but whose singular vectors are rotated inside
    it: with `rotate` the back-projected first moment M Qᵀ is unchanged by the refresh; with `aligned` it is not."""
    torch.manual_seed(6)
    grad = torch.randn(30, 12)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    mix, _ = torch.linalg.qr(torch.randn(4, 4))
    rotated = u[:, :4] @ torch.diag(s[:4]) @ mix @ vh[:4]  # same row space, other singular vectors

    def momentum_before_and_after(signs):
        w = nn.Parameter(torch.zeros(30, 12))
        extra = {"beta1": 0.9} if cls is GaLoreAdafactor else {"min_8bit_size": 0} if cls is GaLoreAdamW8bit else {}
        opt = cls([{"params": [w], "low_rank": True}], lr=1e-2, rank=4, update_proj_gap=100, svd="exact",
                  refresh_signs=signs, **extra)  # fmt: skip
        w.grad = grad.clone()
        opt.step()
        state = opt.state[w]
        moment = opt._load_moments(state)[0] if cls is not GaLoreAdafactor else state["exp_avg"]
        before = moment.float() @ state["proj_right"].T
        opt._refresh(rotated, state, opt.param_groups[0], Side(state["side"]))
        moment = opt._load_moments(state)[0] if cls is not GaLoreAdafactor else state["exp_avg"]
        return before, moment.float() @ state["proj_right"].T

    before, after = momentum_before_and_after("rotate")
    tolerance = 0.02 if cls is GaLoreAdamW8bit else 1e-5  # 8-bit moments are re-quantised after the rotation
    assert float((after - before).norm()) <= tolerance * float(before.norm())
    before, after = momentum_before_and_after("aligned")
    assert float((after - before).norm()) > 0.1 * float(before.norm())


def test_refresh_signs_is_validated():
    w = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(InvalidConfigError, match=r"refresh_signs='flip'.*svd, canonical, aligned, rotate"):
        GaLoreAdamW([{"params": [w], "low_rank": True}], refresh_signs="flip")


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_galore_torch_readme_param_groups_project(cls):
    """galore-torch's README usage: the group that sets `rank` is projected (no `low_rank` key needed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 160), nn.ReLU(), nn.Linear(160, 300))
    mats = [p for p in model.parameters() if p.dim() == 2]  # 160×300 (wide: left) and 300×160 (tall: right)
    others = [p for p in model.parameters() if p.dim() != 2]
    param_groups = [
        {"params": others},
        {"params": mats, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    ]
    optimizer = cls(param_groups, lr=0.01)
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()
    assert optimizer.param_groups[1]["low_rank"] and not optimizer.param_groups[0]["low_rank"]
    wide, tall = mats
    assert optimizer.state[wide]["proj_left"].shape == (160, 128) and "proj_right" not in optimizer.state[wide]
    assert optimizer.state[tall]["proj_right"].shape == (160, 128) and "proj_left" not in optimizer.state[tall]
    if cls is GaLoreAdafactor:  # factored second moment of the r×n / m×r projected gradient
        assert optimizer.state[wide]["exp_avg_sq_row"].shape == (128,)
        assert optimizer.state[tall]["exp_avg_sq_col"].shape == (128,)
    else:
        key = "exp_avg_q" if cls is GaLoreAdamW8bit else "exp_avg"
        assert optimizer.state[wide][key].shape == (128, 300)
        assert optimizer.state[tall][key].shape == (300, 128)
    for p in others:
        assert optimizer.state[p]["side"] == 0


def test_a_rank_group_that_says_low_rank_false_stays_plain():
    w = nn.Parameter(torch.randn(20, 30))
    optimizer = GaLoreAdamW([{"params": [w], "rank": 4, "low_rank": False}], lr=0.01)
    w.grad = torch.randn(20, 30)
    optimizer.step()
    assert optimizer.state[w]["side"] == 0 and optimizer.state[w]["exp_avg"].shape == (20, 30)


def test_projected_adam_by_hand_with_refresh_every_step():
    """Two steps of GaLore-Adam written out by hand: rank = min dim - 1, exact SVD, gap 1, scale 1."""
    torch.manual_seed(3)
    w0 = torch.randn(6, 4)
    p = nn.Parameter(w0.clone())
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    opt = GaLoreAdamW([{"params": [p], "low_rank": True}], lr=lr, betas=(b1, b2), eps=eps, rank=3,
                      update_proj_gap=1, scale=1.0, svd="exact", refresh_signs="canonical")  # fmt: skip
    g1, g2 = torch.randn(6, 4), torch.randn(6, 4)
    w = w0.clone()
    m = torch.zeros(6, 3)
    v = torch.zeros(6, 3)
    for t, g in enumerate((g1, g2), start=1):
        _, _, vh = torch.linalg.svd(g)  # m > n: right projection onto the top-3 right singular vectors
        q = vh[:3].T
        q = q * torch.sign(q.gather(0, q.abs().argmax(0, keepdim=True)))
        r = g @ q
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
        w = w - lr * n @ q.T
        p.grad = g.clone()
        opt.step()
        assert_close_on_scale(p.detach(), w)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_non_target_parameters_follow_torch_adamw_exactly(cls):
    params = [_pair((5, 7)), _pair((7,)), _pair((3, 2, 4))]
    ours = cls([a for a, _ in params], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW([b for _, b in params], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                            foreach=False)  # fmt: skip
    for _ in range(6):
        for a, b in params:
            _feed([a, b], torch.randn_like(a))
        ours.step()
        ref.step()
    for a, b in params:
        assert torch.equal(a, b)


def test_rank_at_least_min_dim_falls_back_to_adamw_with_one_warning():
    a, b = _pair((2, 30))  # e.g. a 2-label classifier at rank 8
    c, d = _pair((3, 30))
    with pytest.warns(UserWarning, match=r"2 projected weight\(s\) have min\(m, n\) ≤ rank.*`scale`") as record:
        ours = GaLoreAdamW([{"params": [a, c], "low_rank": True}], lr=1e-2, rank=8, scale=1.0)
    assert len([w for w in record if "≤ rank" in str(w.message)]) == 1
    ref = torch.optim.AdamW([b, d], lr=1e-2, weight_decay=0.0, foreach=False)
    for _ in range(4):
        _feed([a, b], torch.randn(2, 30))
        _feed([c, d], torch.randn(3, 30))
        ours.step()
        ref.step()
    assert torch.equal(a, b) and torch.equal(c, d)  # scale 1: exactly torch.optim.AdamW
    assert ours.state[a]["side"] == 0 and "proj_left" not in ours.state[a]


@pytest.mark.parametrize("foreach", [True, False])
def test_too_small_weight_keeps_scale_and_matches_the_reference(foreach):
    """The plain update of a weight too small to project is multiplied by `scale` (AdamW direction × α·lr), weight
    decay unscaled; a weight of a plain group next to it is not scaled."""
    torch.manual_seed(0)
    (a, b), (c, d) = _pair((5, 30)), _pair((30, 5))
    e, f = _pair((7, 9))
    kwargs = dict(lr=1e-2, weight_decay=0.05, rank=8, update_proj_gap=3, scale=0.25)
    with pytest.warns(UserWarning, match="≤ rank"):
        ours = GaLoreAdamW(
            [{"params": [a, c], "low_rank": True}, {"params": [e]}], svd="exact", foreach=foreach, **kwargs
        )
    ref = ReferenceGaLoreAdamW([b, d, f], project=[True, True, False], **kwargs)
    for _ in range(5):
        for x, y in ((a, b), (c, d), (e, f)):
            _feed([x, y], torch.randn(x.shape))
        ours.step()
        ref.step()
    for x, y in ((a, b), (c, d), (e, f)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (6, 6)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdamWLayerwise])
def test_too_small_weight_takes_galore_torchs_step_size(cls, shape):
    """galore-torch projects a weight with rank ≥ min(m, n) on a full basis and applies `scale`; the step of our
    plain fallback has the same size (Adam's first step is a rotation of the same ±1 pattern) at rank 8, scale 0.25."""
    torch.manual_seed(1)
    w0, grad = torch.randn(shape), torch.randn(shape)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    settings = dict(lr=1e-2, rank=8, update_proj_gap=200, scale=0.25, proj_type="std")
    with pytest.warns(UserWarning, match="≤ rank"):
        ours = cls([{"params": [a], **{k: settings[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")}}],
                   lr=settings["lr"])  # fmt: skip
    ref = ReferenceGaLoreAdamW([b], signs="svd", full_basis=True, **settings)
    if cls is GaLoreAdamWLayerwise:
        (a * grad).sum().backward()  # the update happens in the gradient hook
    else:
        a.grad = grad.clone()
        ours.step()
    b.grad = grad.clone()
    ref.step()
    ours_step, ref_step = (a - w0).norm(), (b - w0).norm()
    assert ref_step > 0
    torch.testing.assert_close(ours_step, ref_step, rtol=1e-4, atol=0)


def test_too_small_weight_keeps_scale_with_adafactor():
    """Adafactor's update does not depend on the weight (scale_parameter=False): the fallback's weight change is
    exactly `scale` times the plain group's, step after step."""
    torch.manual_seed(2)
    w0 = 1e-3 * torch.randn(4, 30)  # small weights: their fp32 rounding stays far below the changes compared
    low, plain = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    with pytest.warns(UserWarning, match="≤ rank"):
        ours = GaLoreAdafactor([{"params": [low], "rank": 8, "scale": 0.25}], lr=1e-2, beta1=0.9)
    reference = GaLoreAdafactor([plain], lr=1e-2, beta1=0.9)
    for _ in range(3):
        before_low, before_plain = low.detach().clone(), plain.detach().clone()
        _feed([low, plain], torch.randn(4, 30))
        ours.step()
        reference.step()
        expected = 0.25 * (plain - before_plain)
        assert float((low - before_low - expected).norm()) <= 1e-4 * float(expected.norm())


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_adafactor_matches_reference(proj_type):
    a, b = _pair((12, 20))
    ours = GaLoreAdafactor([{"params": [a], "low_rank": True}], lr=1e-2, rank=4, update_proj_gap=3, scale=0.5,
                           proj_type=proj_type, svd="exact")  # fmt: skip
    ref = ReferenceGaLoreAdafactor([b], lr=1e-2, rank=4, update_proj_gap=3, scale=0.5, proj_type=proj_type)
    for _ in range(7):
        _feed([a, b], torch.randn(12, 20))
        ours.step()
        ref.step()
    assert_close_on_scale(a, b)


@pytest.mark.parametrize("signs", ["svd", "canonical", "aligned", "rotate"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_galore_adafactor_matches_reference_for_every_sign_convention(shape, signs):
    torch.manual_seed(8)
    a, b = _pair(shape)
    w0 = a.detach().clone()
    kwargs = dict(lr=1e-2, rank=4, update_proj_gap=2, scale=0.5)
    ours = GaLoreAdafactor([{"params": [a], "low_rank": True}], svd="exact", refresh_signs=signs, **kwargs)
    ref = ReferenceGaLoreAdafactor([b], signs=signs, **kwargs)
    for _ in range(7):
        _feed([a, b], torch.randn(*shape))
        ours.step()
        ref.step()
        assert float((a - b).norm()) <= 1e-4 * float((b - w0).norm())


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=1e-2, scale_parameter=False, relative_step=False),
        dict(lr=1e-2, scale_parameter=True, relative_step=False, beta1=0.9, weight_decay=0.01),
        dict(lr=None, scale_parameter=True, relative_step=True, warmup_init=True),
    ],
    ids=["fixed-lr", "scaled-momentum-wd", "relative-step"],
)
def test_non_target_parameters_follow_transformers_adafactor(options):
    from transformers.optimization import Adafactor

    params = [_pair((6, 9)), _pair((9,))]
    ours = GaLoreAdafactor([a for a, _ in params], **options)
    ref = Adafactor([b for _, b in params], **options)
    for _ in range(5):
        for a, b in params:
            _feed([a, b], torch.randn_like(a))
        ours.step()
        ref.step()
    for a, b in params:
        assert_close_on_scale(a, b, rtol=1e-6)


def test_8bit_states_track_32bit_states_and_are_smaller():
    a, b = _pair((64, 300))
    w0 = b.detach().clone()
    ours = GaLoreAdamW8bit([{"params": [a], "low_rank": True}], lr=1e-2, rank=16, update_proj_gap=4)
    ref = GaLoreAdamW([{"params": [b], "low_rank": True}], lr=1e-2, rank=16, update_proj_gap=4)
    for _ in range(10):
        _feed([a, b], torch.randn(64, 300))
        ours.step()
        ref.step()
    state = ours.state[a]
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_q"].shape == (16, 300)
    assert state["exp_avg_absmax"].numel() == (16 * 300 + 255) // 256
    # small deviation on the scale of the distance the 32-bit run travelled (not of the weights themselves)
    assert float((a - b).norm()) <= 0.02 * float((b - w0).norm())
    assert not torch.equal(a, b)  # the states really are quantised

    def state_bytes(opt):
        return sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                   if isinstance(v, torch.Tensor) and not k.startswith("proj_"))  # fmt: skip

    assert state_bytes(ours) < 0.3 * state_bytes(ref)


def _train(cls, steps, grads, state_dict=None, start=0, **kwargs):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    groups = [
        {"params": [model[0].weight, model[2].weight], "low_rank": True},
        {"params": [model[0].bias, model[2].bias]},
    ]
    opt = cls(groups, lr=1e-2, rank=2, update_proj_gap=3, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict["model"])
        opt.load_state_dict(state_dict["optimizer"])
    for step in range(start, steps):
        x, y = grads[step]
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


def _resume_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 20, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(10)]


@functools.cache
def _uninterrupted_parameters(cls) -> tuple[torch.Tensor, ...]:
    """The final parameters of the uninterrupted 10-step run of the resume test, trained once per class."""
    batches = _resume_batches()
    kwargs = {"min_8bit_size": 0} if "8bit" in cls.__name__ else {}
    full, opt = _train(cls, 10, batches, **kwargs)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    return tuple(p.detach().clone() for p in full.parameters())


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor, GaLoreAdamWLayerwise,
                                 GaLoreAdamW8bitLayerwise, GaLoreAdafactorLayerwise])  # fmt: skip
@pytest.mark.parametrize("split", [4, 6], ids=["mid-period", "at-refresh"])
def test_resume_from_weights_only_checkpoint_equals_uninterrupted(cls, split):
    batches = _resume_batches()
    kwargs = {"min_8bit_size": 0} if "8bit" in cls.__name__ else {}
    full = _uninterrupted_parameters(cls)
    half, opt = _train(cls, split, batches, **kwargs)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    resumed, _ = _train(cls, 10, batches, state_dict=checkpoint, start=split, **kwargs)
    resumed = list(resumed.parameters())
    assert len(resumed) == len(full)
    for p, q in zip(full, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_resume_exactly_and_track_full_precision_bases(bits):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 20, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(10)]
    kwargs = {"min_8bit_size": 0, "basis_bits": bits, "basis_group_size": 8}
    full, opt = _train(GaLoreAdamW8bit, 10, batches, **kwargs)
    state = opt.state[full[0].weight]
    assert "proj_left" not in state and "proj_right" not in state
    codes = state.get("proj_left_q", state.get("proj_right_q"))
    assert codes.dtype == torch.uint8 and state["proj_bits"] == bits
    # Exact resume from a weights-only checkpoint.
    half, opt = _train(GaLoreAdamW8bit, 4, batches, **kwargs)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    resumed, _ = _train(
        GaLoreAdamW8bit, 10, batches, state_dict=torch.load(buffer, weights_only=True), start=4, **kwargs
    )
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # Close to the run with bases in the gradient dtype (quantization noise of the basis only).
    # A 4-bit basis of these 12×2 / 3×2 matrices has 16 levels per group of 8: a visibly noisier direction.
    reference, _ = _train(GaLoreAdamW8bit, 10, batches, min_8bit_size=0)
    torch.manual_seed(11)  # the initial weights of `_train`
    start = nn.Sequential(nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 3))
    for p, q, p0 in zip(full.parameters(), reference.parameters(), start.parameters()):
        moved = (q - p0).norm()
        assert (p - q).norm() <= (0.02 if bits == 8 else 0.5) * moved


def test_changing_basis_bits_of_a_group_switches_storage_at_the_next_refresh():
    weight = nn.Parameter(torch.randn(12, 20))
    optimizer = GaLoreAdamW([{"params": [weight], "low_rank": True}], lr=1e-2, rank=3, update_proj_gap=2)
    for step in range(4):
        if step == 1:  # (a checkpoint's param_groups would restore its own value, as for any hyperparameter)
            optimizer.param_groups[0]["basis_bits"] = 8
        weight.grad = torch.randn(12, 20)
        optimizer.step()
        state = optimizer.state[weight]
        assert ("proj_left" in state) == (step < 2) and ("proj_left_q" in state) == (step >= 2)
    assert torch.isfinite(weight).all()


def test_basis_bits_is_validated_and_not_a_q_galore_or_flora_knob():
    from hf_galore.methods.flora.optimizer import FloraAdamW
    from hf_galore.methods.q_galore.optimizer import QGaLoreAdamW8bit

    weight = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(InvalidConfigError, match="basis_bits=6"):
        GaLoreAdamW([{"params": [weight], "low_rank": True}], basis_bits=6)
    with pytest.raises(InvalidConfigError, match="proj_bits"):
        QGaLoreAdamW8bit([{"params": [weight], "low_rank": True}], basis_bits=8)
    with pytest.raises(InvalidConfigError, match="proj_group_size"):
        QGaLoreAdamW8bit([{"params": [weight], "low_rank": True}], basis_group_size=64)
    with pytest.raises(InvalidConfigError, match="basis_bits"):
        FloraAdamW([{"params": [weight], "low_rank": True}], rank=2, basis_bits=8)


def test_state_holds_only_tensors_and_numbers():
    _, opt = _train(GaLoreAdamW8bit, 4, [(torch.randn(8, 20), torch.randint(0, 3, (8,)))] * 4, min_8bit_size=0)
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert isinstance(value, torch.Tensor | int | float), (key, type(value))


def test_load_state_dict_keeps_state_dtypes_for_bf16_weights():
    a = nn.Parameter(torch.randn(32, 300, dtype=torch.bfloat16))
    opt = GaLoreAdamW8bit([{"params": [a], "low_rank": True}], lr=1e-2, rank=8, min_8bit_size=0)
    a.grad = torch.randn_like(a)
    opt.step()
    saved = opt.state_dict()
    fresh = GaLoreAdamW8bit([{"params": [a], "low_rank": True}], lr=1e-2, rank=8, min_8bit_size=0)
    fresh.load_state_dict(saved)
    state = fresh.state[a]
    assert state["exp_avg_q"].dtype == torch.uint8
    assert state["exp_avg_absmax"].dtype == torch.float32
    assert state["proj_left"].dtype == torch.bfloat16
    for key, value in saved["state"][0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key

    b = nn.Parameter(torch.randn(32, 300, dtype=torch.bfloat16))
    opt32 = GaLoreAdamW([{"params": [b], "low_rank": True}], lr=1e-2, rank=8)
    b.grad = torch.randn_like(b)
    opt32.step()
    fresh32 = GaLoreAdamW([{"params": [b], "low_rank": True}], lr=1e-2, rank=8)
    fresh32.load_state_dict(opt32.state_dict())
    assert fresh32.state[b]["exp_avg"].dtype == torch.float32  # torch alone would cast it to bf16


def test_nan_gradient_at_first_refresh_skips_the_update_and_warns_once():
    a = nn.Parameter(torch.randn(10, 20))
    before = a.detach().clone()
    opt = GaLoreAdamW([{"params": [a], "low_rank": True}], lr=1e-2, rank=3, update_proj_gap=2)
    bad = torch.randn(10, 20)
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf gradient"):
        a.grad = bad
        opt.step()
    assert torch.equal(a, before) and opt.state[a]["step"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second NaN does not warn again
        opt.step()
    a.grad = torch.randn(10, 20)
    opt.step()
    assert opt.state[a]["step"] == 1 and not torch.equal(a, before)


def _raise_linalg_error(*args, **kwargs):
    raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")


def _nan_basis(grad, *args, **kwargs):
    return torch.full((10, 3), float("nan")), None


@pytest.mark.parametrize(
    ("broken", "warning"),
    [(_raise_linalg_error, "decomposition failed"), (_nan_basis, "non-finite basis")],
    ids=["decomposition-raises", "basis-not-finite"],
)
def test_a_failed_decomposition_at_a_later_refresh_keeps_the_basis(monkeypatch, broken, warning):
    a = nn.Parameter(torch.randn(10, 20))
    opt = GaLoreAdamW([{"params": [a], "low_rank": True}], lr=1e-2, rank=3, update_proj_gap=1)
    a.grad = torch.randn(10, 20)
    opt.step()
    basis = opt.state[a]["proj_left"].clone()
    monkeypatch.setattr("hf_galore.optim.base.compute_bases", broken)
    with pytest.warns(UserWarning, match=warning):
        a.grad = torch.randn(10, 20)
        opt.step()
    assert torch.equal(opt.state[a]["proj_left"], basis)
    assert opt.state[a]["step"] == 2 and opt.state[a]["refresh_count"] == 1
    assert torch.isfinite(a).all()


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdafactor])
def test_weight_decay_that_zeroes_the_weight_is_applied_literally(cls):
    """lr·wd == 1 gives a decay factor of 0, which addmm_'s beta cannot carry: the weight is zeroed first, so the
    result equals the update of an all-zero weight (and a NaN in the old weight would stay NaN, not vanish)."""
    grad = torch.randn(10, 20)
    results = []
    for start in (torch.randn(10, 20), torch.zeros(10, 20)):
        weight = nn.Parameter(start)
        opt = cls([{"params": [weight], "low_rank": True}], lr=1.0, weight_decay=1.0, rank=3)
        weight.grad = grad.clone()
        opt.step()
        results.append(weight.detach())
    assert torch.equal(results[0], results[1]) and results[0].abs().sum() > 0


def test_refresh_schedule_and_stagger():
    weights = [nn.Parameter(torch.randn(8, 16)) for _ in range(4)]
    opt = GaLoreAdamW([{"params": weights, "low_rank": True}], lr=1e-3, rank=2, update_proj_gap=8, stagger=True)
    refreshed_at: dict[int, list[int]] = {i: [] for i in range(4)}
    for step in range(20):
        counts = [opt.state[w].get("refresh_count", 0) for w in weights]
        for w in weights:
            w.grad = torch.randn(8, 16)
        opt.step()
        for i, w in enumerate(weights):
            if opt.state[w]["refresh_count"] != counts[i]:
                refreshed_at[i].append(step)
    assert refreshed_at == {0: [0, 8, 16], 1: [0, 2, 10, 18], 2: [0, 4, 12], 3: [0, 6, 14]}
    plain = [nn.Parameter(torch.randn(8, 16)) for _ in range(2)]
    opt = GaLoreAdamW([{"params": plain, "low_rank": True}], lr=1e-3, rank=2, update_proj_gap=8)
    for _ in range(17):
        for w in plain:
            w.grad = torch.randn(8, 16)
        opt.step()
    assert [opt.state[w]["refresh_count"] for w in plain] == [3, 3]  # steps 0, 8, 16


def test_bad_groups_and_hyperparameters_are_rejected():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(InvalidConfigError, match="Unknown param-group key"):
        GaLoreAdamW([{"params": [w], "rnak": 2}])
    with pytest.raises(InvalidConfigError, match="2-D weights only"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.randn(4))], "low_rank": True}])
    with pytest.raises(InvalidConfigError, match="betas"):
        GaLoreAdamW([w], betas=(1.2, 0.9))
    with pytest.raises(InvalidConfigError, match="proj_type"):
        GaLoreAdamW([{"params": [w], "low_rank": True, "proj_type": "diag"}])
    with pytest.raises(InvalidConfigError, match="unknown argument"):
        GaLoreAdamW([w], momentum=0.9)
    with pytest.raises(InvalidConfigError, match="block_size"):
        GaLoreAdamW8bit([w], block_size=100)


@pytest.mark.parametrize("pair", [(GaLoreAdamW, GaLoreAdamWLayerwise), (GaLoreAdafactor, GaLoreAdafactorLayerwise)])
def test_layerwise_equals_step_after_backward_and_frees_gradients(pair):
    eager_cls, layerwise_cls = pair
    batches = [(torch.randn(8, 20), torch.randint(0, 3, (8,))) for _ in range(7)]
    eager, _ = _train(eager_cls, 7, batches)
    layerwise, _ = _train(layerwise_cls, 7, batches)
    for p, q in zip(eager.parameters(), layerwise.parameters()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in layerwise.parameters())


def test_layerwise_records_the_true_gradient_norm():
    model = nn.Linear(10, 6)
    opt = GaLoreAdamWLayerwise([{"params": [model.weight], "low_rank": True}, {"params": [model.bias]}], rank=2)
    x = torch.randn(4, 10)
    reference = nn.Linear(10, 6)
    reference.load_state_dict(model.state_dict())
    reference(x).square().sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    model(x).square().sum().backward()
    opt.step()
    torch.testing.assert_close(opt.last_grad_norm, expected)
    opt.remove_hooks()
    before = model.weight.detach().clone()
    model(x).square().sum().backward()
    assert torch.equal(model.weight, before) and model.weight.grad is not None


def test_gradient_shape_is_untouched_and_second_backward_works():
    model = nn.Linear(10, 6)
    opt = GaLoreAdamW([{"params": [model.weight], "low_rank": True}, {"params": [model.bias]}], rank=2)
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    assert model.weight.grad.shape == model.weight.shape
    opt.zero_grad(set_to_none=False)
    model(torch.randn(3, 10)).sum().backward()
    opt.step()


def test_projection_runs_in_fp32_even_for_bf16_gradients(decomposition_dtypes):
    a = nn.Parameter(torch.randn(16, 40, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [a], "low_rank": True}], lr=1e-2, rank=4)
    a.grad = torch.randn_like(a)
    opt.step()
    assert decomposition_dtypes == [torch.float32]
    assert opt.state[a]["proj_left"].dtype == torch.bfloat16 and opt.state[a]["exp_avg"].dtype == torch.float32


class _SharedInTwoCheckpoints(nn.Module):
    """One Linear used in two reentrant-checkpointed segments: its grad hook fires once per segment."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(lambda t: torch.tanh(self.shared(t)), x, use_reentrant=True)
        x = checkpoint(lambda t: torch.tanh(self.shared(t)), x, use_reentrant=True)
        return self.head(x)


def _run_shared(cls, deferred: bool, steps: int = 5):
    torch.manual_seed(5)
    model = _SharedInTwoCheckpoints()
    groups = [{"params": [model.shared.weight, model.head.weight], "low_rank": True},
              {"params": [model.shared.bias, model.head.bias]}]  # fmt: skip
    kwargs = {"deferred_params": [model.shared.weight, model.shared.bias]} if deferred else {}
    opt = cls(groups, lr=1e-2, rank=2, update_proj_gap=2, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 12, generator=g, requires_grad=True)
        model(x).square().mean().backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


def test_weights_shared_across_checkpointed_segments_are_stepped_once():
    eager, _ = _run_shared(GaLoreAdamW, deferred=False)
    layerwise, opt = _run_shared(GaLoreAdamWLayerwise, deferred=True)
    assert opt.state[layerwise.shared.weight]["step"] == 5
    for p, q in zip(eager.parameters(), layerwise.parameters()):
        assert_close_on_scale(q, p)
    # Without deferral the hook would see each segment's partial gradient and step twice per backward: it refuses.
    from hf_galore.errors import UnsupportedSetupError

    with pytest.raises(UnsupportedSetupError, match="use_reentrant"):
        _run_shared(GaLoreAdamWLayerwise, deferred=False)


@pytest.mark.parametrize("full_on_last", [False, True], ids=["projected-accumulator", "refresh-step-full-gradient"])
def test_layerwise_accumulation_survives_a_last_micro_step_without_gradient(full_on_last):
    """A weight with a gradient on an early micro-step but none on the last one is still updated at the boundary."""
    torch.manual_seed(0)
    flag = {"sync": True}
    gap = 1 if full_on_last else 100  # gap 1: every step refreshes, so the full gradient is kept across micro-steps
    w = nn.Parameter(torch.randn(16, 32))
    ref = nn.Parameter(w.detach().clone())
    opt = GaLoreAdamWLayerwise([{"params": [w], "low_rank": True}], lr=1e-2, rank=4, update_proj_gap=gap,
                               sync_gradients=lambda: flag["sync"])  # fmt: skip
    eager = GaLoreAdamW([{"params": [ref], "low_rank": True}], lr=1e-2, rank=4, update_proj_gap=gap)
    x = torch.randn(8, 32)
    for param in (w, ref):
        (param @ x.T).pow(2).sum().backward()
    opt.step()
    eager.step()
    ref.grad = None
    flag["sync"] = False  # micro-step 1 of 2: w gets a gradient
    (w @ x.T).pow(2).sum().backward()
    flag["sync"] = True  # micro-step 2 of 2: w is not used
    opt.step()
    (ref @ x.T).pow(2).sum().backward()
    eager.step()
    assert opt.state[w]["step"] == 2 and not opt._low_rank_grads and w.grad is None
    assert_close_on_scale(w, ref)
