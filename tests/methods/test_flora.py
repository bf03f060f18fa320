"""FLoRA: seeded random projections, the optimizers against a slow reference, compressed gradient accumulation in
the layer-wise hooks, and the stock Trainer (training with GA, exact resume, errors)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_on_scale, tiny_llama_config, tiny_roberta_config
from trainer_utils import classification_dataset, lm_dataset, make_trainer, training_args
from transformers import LlamaForCausalLM, RobertaForSequenceClassification

from hf_galore import REGISTRY
from hf_galore.errors import InvalidConfigError
from hf_galore.methods.flora import FloraConfig
from hf_galore.methods.flora.optimizer import (
    ACCUMULATION_STREAM,
    MOMENTUM_STREAM,
    FloraAdafactor,
    FloraAdafactorAccumulating,
    FloraAdafactorLayerwise,
    FloraAdamW,
    FloraAdamWAccumulating,
    FloraAdamWLayerwise,
)
from hf_galore.optim._reference import ReferenceFlora
from hf_galore.optim.base import mix_seed
from hf_galore.projection.random import (
    GENERATOR_PHILOX,
    GENERATOR_TORCH_CPU,
    compress,
    decompress,
    gaussian_projection,
    philox4x32,
    philox_normal,
    transfer,
    transfer_scale,
)
from hf_galore.projection.subspace import Side

FLORA_NAMES = sorted(n for n, spec in REGISTRY.items() if spec.method == "FLoRA")


# ------------------------------------------------------------------------------------------------ projections
def _projections(seed: int, draws: int, dim: int, rank: int) -> torch.Tensor:
    """`draws` independent dim×rank projections at once (entries of one long stream; cheaper than a call each)."""
    return (philox_normal(seed, draws * dim * rank) * rank**-0.5).float().view(draws, dim, rank)


def test_projection_is_isotropic_in_expectation():
    dim, rank, draws = 8, 4, 3000
    projections = _projections(0, draws, dim, rank)
    mean = (projections @ projections.transpose(1, 2)).mean(0)
    # Entry std of the mean ≈ sqrt(2/(r·draws)) ≈ 0.013: 0.08 is > 6σ, while one draw is far from I.
    assert (mean - torch.eye(dim)).abs().max() < 0.08
    single = gaussian_projection(0, dim, rank)
    assert (single @ single.T - torch.eye(dim)).abs().max() > 0.3
    assert gaussian_projection(0, 1000, 10).var().item() == pytest.approx(0.1, rel=0.05)
    torch.testing.assert_close(gaussian_projection(5, 30, 7), _projections(5, 1, 30, 7)[0], rtol=0, atol=0)


def test_same_seed_same_matrix_and_distinct_seeds_differ():
    a, b = gaussian_projection(123, 7, 3), gaussian_projection(123, 7, 3)
    assert torch.equal(a, b) and a.shape == (7, 3) and a.dtype == torch.float32
    assert not torch.equal(a, gaussian_projection(124, 7, 3))
    # The seed sequence is a pure function of ints (same on every process and after a resume).
    assert [mix_seed(5, MOMENTUM_STREAM, k) for k in range(3)] == [mix_seed(5, MOMENTUM_STREAM, k) for k in range(3)]
    assert len({mix_seed(5, s, k) for s in (MOMENTUM_STREAM, ACCUMULATION_STREAM) for k in range(50)}) == 100
    assert gaussian_projection(1, 4, 2, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_decompressed_gradient_is_unbiased_over_seeds():
    torch.manual_seed(0)
    grad = torch.randn(6, 40)
    draws = 4000
    projections = _projections(1, draws, 6, 2)

    def mean_estimate(scale: float) -> torch.Tensor:
        proj = projections * scale
        return (proj @ (proj.transpose(1, 2) @ grad)).mean(0)

    rel = lambda est: float((est - grad).norm() / grad.norm())  # noqa: E731
    # Expected relative error of the mean ≈ sqrt((m+1)/(r·draws)) ≈ 0.03; one draw is ≈ 1.9 off; a 10% bias in the
    # projection's variance (scale² = 1.1) gives ≥ 0.1: the tolerance separates them.
    assert rel(mean_estimate(1.0)) < 0.07
    assert rel(mean_estimate(1.1**0.5)) > 0.08
    proj = gaussian_projection(0, 6, 2)
    assert rel(decompress(compress(grad, Side.LEFT, proj), Side.LEFT, proj)) > 0.5


# The on-device generator (#16 part 3): Philox4x32-10 in int64 tensor ops, Box-Muller from IEEE basic operations.
def _philox_reference(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 on Python ints (arbitrary precision), straight from Salmon et al. (2011)."""
    x, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
        x = [(p1 >> 32) ^ x[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ x[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return x


def _normal_reference(seed: int, index: int) -> float:
    """Entry `index` of `philox_normal(seed, ·)`: Box-Muller with the math module's log, cos and sin."""
    import math

    words = _philox_reference((index // 4 & 0xFFFFFFFF, index // 4 >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    pair = index % 4 // 2
    u1, u2 = (words[2 * pair] + 1) * 2.0**-32, words[2 * pair + 1] * 2.0**-32
    radius, angle = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2
    return radius * (math.cos(angle) if index % 2 == 0 else math.sin(angle))


def test_philox_matches_known_answers_and_the_python_reference():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32 10) for the reference itself.
    assert _philox_reference((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox_reference((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    counter, key = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
    assert _philox_reference(counter, key) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    # The tensor version (counter = (i mod 2³², i >> 32, 0, 0)) on extreme counters and keys: every word in [0, 2³²).
    counters = torch.tensor([0, 1, 0xFFFFFFFF, 2**32 + 7, 2**40 + 123, 2**63 - 1])
    for seed in (0, 5, 0xFFFFFFFF, 2**63 - 1, 0x299F31D0A4093822):
        words = philox4x32(counters, seed)
        for i, c in enumerate(counters.tolist()):
            expected = _philox_reference((c & 0xFFFFFFFF, c >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
            assert words[:, i].tolist() == expected, (seed, c)


def test_philox_normals_match_a_libm_box_muller():
    """The polynomial log/cos/sin agree with the math module's to float64 rounding noise."""
    for seed in (0, 2**40 + 3, mix_seed(9, MOMENTUM_STREAM, 4)):
        values = philox_normal(seed, 4099)
        assert values.dtype == torch.float64
        for index in (0, 1, 2, 3, 17, 1000, 4098):
            assert float(values[index]) == pytest.approx(_normal_reference(seed, index), rel=1e-12, abs=1e-12)
    projection = gaussian_projection(7, 5, 3)  # entry (i, j) is value i·rank + j, scaled by rank^-1/2, rounded once
    expected = torch.tensor(
        [[_normal_reference(7, 3 * i + j) for j in range(3)] for i in range(5)], dtype=torch.float64
    )
    expected = expected * 3**-0.5
    torch.testing.assert_close(projection, expected.float(), rtol=0, atol=0)


def test_philox_normals_have_gaussian_moments():
    n = 400_000
    z = philox_normal(3, n)
    other = philox_normal(4, n)
    # Standard errors with n draws: mean 1/√n, variance √(2/n), E z⁴ √(96/n), correlations 1/√n. Tolerance 5 SE.
    se = n**-0.5
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float(z.pow(4).mean()) - 3) < 5 * (96 / n) ** 0.5
    assert abs(float(z.pow(3).mean())) < 5 * (15 / n) ** 0.5
    for a, b in ((z[:-1], z[1:]), (z[:-4], z[4:]), (z, other)):  # within a counter, across counters, across seeds
        assert abs(float((a * b).mean())) < 5 * se
    tail = float((z.abs() > 1.959964).double().mean())  # P(|z| > 1.96) = 0.05
    assert abs(tail - 0.05) < 5 * (0.05 * 0.95 / n) ** 0.5


def test_old_checkpoints_keep_the_legacy_cpu_generator():
    """A FloraAdamW state written before the on-device generator (tests/fixtures/flora_state_v0.pt, made with
    hf_galore 20d5ce6: weights 6×20 and 20×6, rank 3, kappa 100, lr 1e-2, wd 0.1, six steps, saved after three) has no
    "generator" key: it resumes with the CPU generator it was written with and continues exactly as that version."""
    from pathlib import Path

    fixture = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "flora_state_v0.pt", weights_only=True)
    weights = [torch.nn.Parameter(w.clone()) for w in fixture["weights_after_3"]]
    optimizer = FloraAdamW([{"params": weights, "low_rank": True}], lr=1e-2, rank=3, kappa=100, weight_decay=0.1)
    optimizer.load_state_dict(fixture["state_dict_after_3"])
    # Its groups carried GaLore's refresh knobs (FLoRA had no config of its own then); they are not carried over,
    # so the next save holds FLoRA's keys only and an optimizer can be rebuilt from the groups.
    assert "update_proj_gap" in fixture["state_dict_after_3"]["param_groups"][0]
    assert set(optimizer.param_groups[0]) - {"params"} <= set(optimizer.defaults)
    state = optimizer.state[weights[0]]
    assert "generator" not in state
    legacy = gaussian_projection(mix_seed(state["seed"], MOMENTUM_STREAM, 0), 6, 3, generator=GENERATOR_TORCH_CPU)
    assert torch.equal(optimizer.projection(state, MOMENTUM_STREAM, 0, 3), legacy)
    for grads in fixture["grads"][3:]:
        for w, g in zip(weights, grads):
            w.grad = g.clone()
        optimizer.step()
    for w, expected in zip(weights, fixture["weights_after_6"]):
        assert _rel(w.detach(), expected) < 1e-6
    # New states use the on-device generator; a version this code does not know is a clear error.
    fresh = torch.nn.Parameter(torch.randn(6, 20))
    other = FloraAdamW([{"params": [fresh], "low_rank": True}], rank=3)
    fresh.grad = torch.randn(6, 20)
    other.step()
    assert other.state[fresh]["generator"] == GENERATOR_PHILOX
    other.state[fresh]["generator"] = 7
    with pytest.raises(InvalidConfigError, match=r"generator 7.*newer version"):
        other.step()


def test_full_rank_orthogonal_compression_equals_plain_accumulation():
    torch.manual_seed(0)
    grads = [torch.randn(5, 9, dtype=torch.float64) for _ in range(4)]
    for side, dim in ((Side.LEFT, 5), (Side.RIGHT, 9)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
        accumulator = sum(compress(g, side, q) for g in grads)
        torch.testing.assert_close(decompress(accumulator, side, q), sum(grads))


def test_transfer_equals_scaled_up_then_down():
    low = torch.randn(3, 11)
    old, new = gaussian_projection(1, 7, 3), gaussian_projection(2, 7, 3)
    scale = transfer_scale(7, 3)
    assert scale == pytest.approx((3 / 11) ** 0.5)
    torch.testing.assert_close(
        transfer(low, Side.LEFT, old, new), scale * compress(decompress(low, Side.LEFT, old), Side.LEFT, new)
    )
    low = torch.randn(11, 3)
    torch.testing.assert_close(
        transfer(low, Side.RIGHT, old, new), scale * compress(decompress(low, Side.RIGHT, old), Side.RIGHT, new)
    )


@pytest.mark.parametrize("side", [Side.LEFT, Side.RIGHT])
def test_transfer_keeps_the_expected_norm(side):
    """E‖transfer(C)‖² = E‖C‖² for C = down_old(X) (#14 item 2; the paper's unscaled transfer multiplies it by
    (d + r + 1)/r = 17.25 here, which compounds at every resampling)."""
    dim, rank, other, draws = 64, 4, 16, 800
    generator = torch.Generator().manual_seed(0)
    projections = _projections(11, 2 * draws, dim, rank)
    before, after = torch.empty(draws, dtype=torch.float64), torch.empty(draws, dtype=torch.float64)
    for s in range(draws):
        x = torch.randn((dim, other) if side == Side.LEFT else (other, dim), generator=generator)
        old, new = projections[2 * s], projections[2 * s + 1]
        low = compress(x, side, old)
        before[s], after[s] = low.square().sum(), transfer(low, side, old, new).square().sum()
    ratio = float(after.mean() / before.mean())
    # Standard error of a ratio of means (delta method): sd(after − ratio·before) / (√N · mean(before)), measured
    # from the same draws: ≈ 0.017 here, so 5 SE ≈ 0.08 separates 1 from the unscaled 17.25 and from a scale 20 % off
    # (0.64 or 1.44) while a correct scale fails with probability < 1e-6.
    se = float((after - ratio * before).std() / (draws**0.5 * before.mean()))
    assert se < 0.05
    assert abs(ratio - 1) < 5 * se, (ratio, se)
    assert ratio / transfer_scale(dim, rank) ** 2 == pytest.approx((dim + rank + 1) / rank, rel=5 * se)


def test_momentum_stays_bounded_under_frequent_resampling():
    """#14 item 2 as reported: rank 4, kappa 10, a 64×64 weight under a fixed gradient for 200 steps (before the fix
    ‖exp_avg‖ grew from 7 to ~9e4 and ‖W‖ to ~5e4)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
    optimizer = FloraAdamW([{"params": [weight], "low_rank": True}], lr=1e-2, rank=4, kappa=10)
    grad = torch.randn(64, 64)
    norms = []
    for _ in range(200):
        weight.grad = grad.clone()
        optimizer.step()
        norms.append(float(optimizer.state[weight]["exp_avg"].norm()))
    assert optimizer.state[weight]["resample_count"] == 20
    # Stationary EMA of down(G): E‖·‖ ≈ ‖G‖ ≈ 64; the last window must be no larger than a few times that.
    assert max(norms[-50:]) < 4 * float(grad.norm()), max(norms[-50:])
    # A sign-consistent gradient moves each entry by at most ~lr per step (Adam-normalised): 200·0.01·64 = 128.
    assert float(weight.detach().norm()) < 200 * 1e-2 * 64 + 10


# ------------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("shape", [(6, 20), (20, 6)], ids=["left", "right"])
@pytest.mark.parametrize("cls,kind", [(FloraAdafactor, "adafactor"), (FloraAdamW, "adamw")])
def test_optimizer_matches_the_slow_reference(cls, kind, shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    ref_weight = weight.detach().clone()
    optimizer = cls([{"params": [weight], "low_rank": True}], lr=0.01, rank=3, kappa=3, weight_decay=0.1)
    side = "left" if shape[0] < shape[1] else "right"
    dim = min(shape)
    grads = [torch.randn(shape) for _ in range(10)]
    reference = None
    for g in grads:
        weight.grad = g.clone()
        optimizer.step()
        if reference is None:  # the weight's seed exists once its state does
            seed = optimizer.state[weight]["seed"]
            reference = ReferenceFlora(ref_weight, 0.01, side, lambda k, seed=seed: gaussian_projection(
                mix_seed(seed, MOMENTUM_STREAM, k), dim, 3), kind=kind, kappa=3, weight_decay=0.1)  # fmt: skip
        reference.step(g)
        assert_close_on_scale(weight.detach(), ref_weight)
        assert_close_on_scale(optimizer.state[weight]["exp_avg"], reference.M)
    state = optimizer.state[weight]
    assert state["resample_count"] == 3 and state["step"] == 10  # resampled at steps 3, 6, 9
    assert state["exp_avg"].shape == ((3, 20) if side == "left" else (20, 3))
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values())


@pytest.mark.parametrize("cls", [FloraAdafactor, FloraAdamW])
def test_second_moment_stays_non_negative_across_resamplings(cls):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 30))
    optimizer = cls([{"params": [weight], "low_rank": True}], lr=1e-2, rank=2, kappa=1)
    for _ in range(6):
        weight.grad = torch.randn(8, 30)
        optimizer.step()
        state = optimizer.state[weight]
        assert (state["exp_avg_sq_row"] > 0).all() and (state["exp_avg_sq_col"] > 0).all()
        assert state["exp_avg_sq_row"].shape == (8,) and state["exp_avg_sq_col"].shape == (30,)
    assert torch.isfinite(weight).all() and state["resample_count"] == 6


def test_momentum_transfer_equals_the_reference_formula():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 12))
    optimizer = FloraAdamW([{"params": [weight], "low_rank": True}], lr=1e-3, rank=2, kappa=2)
    weight.grad = torch.randn(5, 12)
    optimizer.step()
    state = optimizer.state[weight]
    before = state["exp_avg"].clone()
    grad = torch.randn(5, 12)
    weight.grad = grad.clone()
    optimizer.step()  # step 2: resample, transfer, then add the fresh gradient
    old = gaussian_projection(mix_seed(state["seed"], MOMENTUM_STREAM, 0), 5, 2)
    new = gaussian_projection(mix_seed(state["seed"], MOMENTUM_STREAM, 1), 5, 2)
    expected = 0.9 * transfer_scale(5, 2) * (new.T @ (old @ before)) + 0.1 * (new.T @ grad)
    assert_close_on_scale(state["exp_avg"], expected)


def test_non_target_parameters_follow_torch_adamw_exactly():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    b.data.copy_(a.data)
    ours = FloraAdamW([a], lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(4, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ compressed GA
def _layerwise(cls, weight, flag, **kwargs):
    return cls([{"params": [weight], "low_rank": True}], lr=1e-2, rank=2, kappa=5, sync_gradients=lambda: flag[0],
               **kwargs)  # fmt: skip


@pytest.mark.parametrize("cls", [FloraAdamWLayerwise, FloraAdafactorLayerwise])
def test_layerwise_accumulates_compressed_and_matches_the_decompressed_sum(cls):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    weight = torch.nn.Parameter(torch.randn(6, 16))  # m < n: left, accumulator r×n
    twin = torch.nn.Parameter(weight.detach().clone())
    flag = [False]
    optimizer = _layerwise(cls, weight, flag)
    plain = (FloraAdamW if cls is FloraAdamWLayerwise else FloraAdafactor)(
        [{"params": [twin], "low_rank": True}], lr=1e-2, rank=2, kappa=5
    )
    micro = [torch.randn(6, 4) for _ in range(3)]
    for i, upstream in enumerate(micro):
        flag[0] = i == len(micro) - 1
        (weight @ x.T).backward(upstream)
        if not flag[0]:
            assert weight.grad is None  # the full gradient is freed at every micro-step
            accumulator = optimizer._low_rank_grads[weight]
            assert accumulator.shape == (2, 16) and accumulator.dtype == torch.float32
            assert accumulator.numel() * 4 == 2 * 16 * 4  # r×n fp32 bytes, not m×n
    optimizer.step()
    assert not optimizer._low_rank_grads
    state = optimizer.state[weight]
    assert state["step"] == 1
    # The same update from the decompressed accumulated gradient on the non-layer-wise optimizer.
    proj = gaussian_projection(mix_seed(state["seed"], ACCUMULATION_STREAM, 0), 6, 2)
    total = sum(compress(u @ x, Side.LEFT, proj) for u in micro)
    twin.grad = decompress(total, Side.LEFT, proj)
    plain.step()
    assert_close_on_scale(weight.detach(), twin.detach())


def test_layerwise_without_accumulation_uses_the_exact_gradient():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(12, 5))  # m ≥ n: right, accumulator m×r
    twin = torch.nn.Parameter(weight.detach().clone())
    optimizer = _layerwise(FloraAdamWLayerwise, weight, [True])
    plain = FloraAdamW([{"params": [twin], "low_rank": True}], lr=1e-2, rank=2, kappa=5)
    for _ in range(3):
        g = torch.randn(12, 5)
        weight.grad = None
        (weight * g).sum().backward()
        optimizer.step()
        twin.grad = g
        plain.step()
    assert torch.equal(weight.detach(), twin.detach())
    assert optimizer.state[weight]["exp_avg"].shape == (12, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize(
    "cls,plain", [(FloraAdamWAccumulating, FloraAdamW), (FloraAdafactorAccumulating, FloraAdafactor)]
)
def test_plain_names_accumulate_compressed_and_equal_one_big_batch(cls, plain):
    """#14 item 9: the plain names' hooks accumulate r×n / m×r gradients over 4 micro-batches and step() updates once;
    the trajectory equals one big batch whose gradient goes through the same window's compression (a sum of
    compressed gradients is the compression of the sum)."""
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)  # 11×16 (left: r×16 accumulator), 13×11 (right: 13×r), then a plain head
        return torch.nn.Sequential(torch.nn.Linear(16, 11), torch.nn.Tanh(), torch.nn.Linear(11, 13),
                                   torch.nn.Tanh(), torch.nn.Linear(13, 3))  # fmt: skip

    def groups(model):
        low = [model[0].weight, model[2].weight]
        rest = [p for p in model.parameters() if all(p is not q for q in low)]
        return [{"params": low, "low_rank": True}, {"params": rest}]

    model, twin = build(), build()
    flag = [False]
    kwargs = dict(lr=1e-2, rank=3, kappa=2, weight_decay=0.1)
    optimizer = cls(groups(model), sync_gradients=lambda: flag[0], **kwargs)
    reference = plain(groups(twin), **kwargs)
    low_rank = {model[0].weight: (3, 16), model[2].weight: (13, 3)}
    for step in range(5):  # resamplings of the momentum projection at steps 2 and 4
        batches = [torch.randn(2, 16) for _ in range(4)]
        for i, x in enumerate(batches):
            flag[0] = i == 3
            model(x).square().sum().backward()
            if not flag[0]:
                for weight, shape in low_rank.items():
                    assert weight.grad is None and optimizer._low_rank_grads[weight].shape == shape
                assert model[4].weight.grad is not None  # plain parameters accumulate full-size, as usual
        optimizer.step()
        assert not optimizer._low_rank_grads
        twin(torch.cat(batches)).square().sum().backward()
        for weight in (twin[0].weight, twin[2].weight):
            group = reference.param_groups[0]
            state = reference._state_for(weight, group)
            side = Side(state["side"])
            projection = reference.projection(state, ACCUMULATION_STREAM, state["step"], 3)
            weight.grad = decompress(compress(weight.grad, side, projection), side, projection)
        reference.step()
        reference.zero_grad()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert _rel(a.detach(), b.detach()) < 1e-5, (step, name)
    state = optimizer.state[model[0].weight]
    assert state["step"] == 5 and state["resample_count"] == 2
    assert all(isinstance(v, (int, torch.Tensor)) for v in state.values())


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_raises_clear_errors():
    weight = torch.nn.Parameter(torch.randn(4, 6))
    with pytest.raises(InvalidConfigError, match=r"rank=5 exceeds.*\(4, 6\).*at most 4"):
        FloraAdamW([{"params": [weight], "low_rank": True}], rank=5)
    with pytest.raises(InvalidConfigError, match="kappa"):
        FloraAdamW([weight], kappa=0)
    with pytest.raises(InvalidConfigError, match=r"kappa must be a positive integer.*got -1"):
        FloraConfig(kappa=-1)
    with pytest.raises(InvalidConfigError, match="rank must be a positive integer, got 0"):
        FloraConfig(rank=0)
    with pytest.raises(InvalidConfigError, match="proj_type='full' is not valid for FLoRA"):
        FloraConfig(proj_type="full")
    with pytest.raises(InvalidConfigError, match=r"unknown argument.*update_proj_gap"):
        FloraAdafactor([weight], update_proj_gap=10)


def test_bad_optim_args_fail_in_the_trainer(tmp_path):
    model, dataset = _model("roberta")
    args = training_args(tmp_path, "flora_adamw", optim_args="rank=4, kappa=0")
    with pytest.raises(InvalidConfigError, match="kappa"):
        make_trainer(model, args, dataset).train()
    args = training_args(tmp_path, "flora_adamw", optim_args="rank=64")
    with pytest.raises(InvalidConfigError, match="exceeds the smaller dimension"):
        make_trainer(model, args, dataset).train()


# ------------------------------------------------------------------------------------------------ Trainer
def _model(kind: str):
    torch.manual_seed(0)
    if kind == "roberta":
        return RobertaForSequenceClassification(tiny_roberta_config()), classification_dataset()
    return LlamaForCausalLM(tiny_llama_config()), lm_dataset()


def _args(path, name, accumulation="compressed", **overrides):
    optim_args = "rank=4, kappa=3" + (", accumulation=full" if accumulation == "full" else "")
    values = dict(optim_args=optim_args, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                  max_steps=12, learning_rate=1e-2)  # fmt: skip
    values.update(overrides)
    return training_args(path, name, **values)


@pytest.mark.parametrize(
    "name,accumulation",
    [(n, "compressed") for n in FLORA_NAMES] + [("flora_adamw", "full"), ("flora_adafactor", "full")],
)
@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_trainer_with_gradient_accumulation_trains(tmp_path, name, accumulation, kind, monkeypatch):
    from hf_galore.methods.flora.optimizer import _FloraLayerwiseMixin

    if accumulation == "full" and kind == "llama":
        pytest.skip("full-size accumulation is the Trainer's own; one model is enough")
    compressed_shapes = set()
    original = _FloraLayerwiseMixin._compress_gradient

    def spy(self, p, grad, state):
        low = original(self, p, grad, state)
        compressed_shapes.add((tuple(p.shape), tuple(low.shape)))
        return low

    monkeypatch.setattr(_FloraLayerwiseMixin, "_compress_gradient", spy)
    model, dataset = _model(kind)
    args = _args(tmp_path, name, accumulation)
    trainer = make_trainer(model, args, dataset)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before
    optimizer = trainer.optimizer.optimizer
    spec = REGISTRY[name]
    expected = (spec.hooked_cls(args) if spec.hooked_cls else None) or spec.optimizer_cls
    assert type(optimizer) is expected
    assert (expected is spec.optimizer_cls) == (spec.layerwise or accumulation == "full")
    compressed = [s for s in optimizer.state.values() if s.get("side", 0)]
    assert len(compressed) == (12 if kind == "roberta" else 14)
    assert all(s["step"] == 12 and s["resample_count"] == 4 for s in compressed)
    if accumulation == "compressed":  # micro-step gradients were accumulated as r×n / m×r inside the Trainer
        assert compressed_shapes and all(min(low) == 4 and max(low) == max(full) for full, low in compressed_shapes)
    else:  # accumulation=full leaves accumulation to the Trainer (full-size p.grad)
        assert not compressed_shapes


def test_plain_and_layerwise_names_take_the_same_compressed_trajectory(tmp_path):
    """The plain name's hooks accumulate exactly what the layer-wise name's do; only where the update runs differs."""
    final = []
    for name in ("flora_adamw", "flora_adamw_layerwise"):
        model, dataset = _model("roberta")
        make_trainer(model, _args(tmp_path / name, name, max_steps=4, max_grad_norm=0.0), dataset).train()
        final.append(dict(model.named_parameters()))
    for n, p in final[0].items():
        assert _rel(p.detach(), final[1][n].detach()) < 1e-5, n


@pytest.mark.parametrize(
    "name,accumulation", [("flora_adamw", "compressed"), ("flora_adamw", "full"), ("flora_adafactor_layerwise", "")]
)
def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, name, accumulation):
    # Checkpoints are written at optimizer-step boundaries, where the compressed accumulators are empty.
    args = dict(accumulation=accumulation, max_steps=8, save_strategy="steps", save_steps=5, logging_steps=1)
    model, dataset = _model("roberta")
    make_trainer(model, _args(tmp_path / "full", name, **args), dataset).train()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed_model, _ = _model("roberta")
    trainer = make_trainer(resumed_model, _args(tmp_path / "full", name, **args), dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n
    state = torch.load(tmp_path / "full" / "checkpoint-5" / "optimizer.pt", weights_only=True)
    assert any("resample_count" in s for s in state["state"].values())


def test_compressed_accumulation_refuses_what_it_cannot_do(tmp_path):
    from types import SimpleNamespace

    from hf_galore.errors import UnsupportedSetupError

    model, dataset = _model("roberta")
    with pytest.raises(UnsupportedSetupError, match="accumulation=full is for the non-layer-wise"):
        make_trainer(model, _args(tmp_path, "flora_adamw_layerwise", "full"), dataset).train()
    from hf_galore.integrations.transformers import check_supported_setup

    def check(args):
        check_supported_setup(args, "flora_adamw")

    args = dict(optim_args="rank=4", gradient_accumulation_steps=4, fp16=False, n_gpu=1, world_size=1)
    check(SimpleNamespace(**args))
    with pytest.raises(UnsupportedSetupError, match=r"fp16=True.*optim_args='accumulation=full'"):
        check(SimpleNamespace(**{**args, "fp16": True}))
    with pytest.raises(UnsupportedSetupError, match="DataParallel over 2 GPUs"):
        check(SimpleNamespace(**{**args, "n_gpu": 2}))
    # Without accumulation, or with accumulation=full, the hooks are not used and nothing is refused.
    check(SimpleNamespace(**{**args, "fp16": True, "gradient_accumulation_steps": 1}))
    check(SimpleNamespace(**{**args, "fp16": True, "optim_args": "rank=4, accumulation=full"}))
    assert REGISTRY["flora_adamw"].hooked_cls(SimpleNamespace(**{**args, "gradient_accumulation_steps": 1})) is None
