"""The batched step (`foreach=True`, the default) against the per-parameter loop (`foreach=False`) and the reference.

On CPU both paths run the same kernels in the same order for every parameter, so trajectories must agree bit for
bit: weights, INT8 codes and every optimizer-state tensor, over refreshes, with parameters that miss a step, with
chunks forced small and with 8-bit states whose sizes are not multiples of the block size.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_on_scale, tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from hf_galore.builder import make_optimizer_kwargs
from hf_galore.errors import InvalidConfigError
from hf_galore.methods.galore import GaLoreAdamW, GaLoreAdamW8bit
from hf_galore.optim._quant8 import Blockwise8bitStore
from hf_galore.optim._reference import ReferenceGaLoreAdamW
from hf_galore.optim.base import LowRankOptimizer

CASES = {
    "galore_adamw": "rank=4,update_proj_gap=3",
    "galore_adamw_8bit": "rank=4,update_proj_gap=3,min_8bit_size=0,block_size=64",
    "q_galore_adamw_8bit": "rank=4,update_proj_gap=3,min_8bit_size=0,block_size=64,queue_size=2,proj_group_size=32",
    "flora_adamw": "rank=4,kappa=3",
    "galore_adamw_layerwise": "rank=4,update_proj_gap=3",
}


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors


def _trajectory(name: str, optim_args: str, foreach: bool, steps: int = 7) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    layerwise = name.endswith("_layerwise")
    cls, kwargs = make_optimizer_kwargs(
        name,
        model,
        lr=1e-2,
        weight_decay=0.01,
        target_modules="all-linear",
        optim_args=f"{optim_args},foreach={foreach}",
    )
    optimizer = cls(**kwargs, **({"max_grad_norm": 1.0} if layerwise else {}))
    generator = torch.Generator().manual_seed(1)
    skipped = [model.model.layers[0].mlp.up_proj, model.model.layers[1].input_layernorm]
    snapshots = []
    for step in range(steps):
        ids = torch.randint(0, 99, (3, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 2 and not layerwise:  # two parameters miss a step: their step counts (and bias corrections) lag
            for module in skipped:
                for p in module.parameters():
                    p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshots.append(_snapshot(model, optimizer))
    return snapshots


def _assert_same(expected: list[dict[str, torch.Tensor]], actual: list[dict[str, torch.Tensor]]) -> None:
    for step, (a, b) in enumerate(zip(expected, actual)):
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert differ == [], f"step {step}: {differ[:5]}"


@pytest.mark.parametrize("name", list(CASES))
def test_batched_step_equals_the_per_parameter_loop_bitwise(name, monkeypatch):
    per_parameter = _trajectory(name, CASES[name], foreach=False)
    _assert_same(per_parameter, _trajectory(name, CASES[name], foreach=True))
    # Chunks of a few hundred elements: many chunks, padded 8-bit segments, and every parameter larger than a chunk
    # (the 3,168-element embedding and output head) updated in slices, in both paths.
    monkeypatch.setattr(LowRankOptimizer, "foreach_chunk_elements", 300)
    _assert_same(per_parameter, _trajectory(name, CASES[name], foreach=True))
    _assert_same(per_parameter, _trajectory(name, CASES[name], foreach=False))


def test_large_plain_parameters_are_updated_in_slices(monkeypatch):
    """The slicing really happens (and is what the equality above covers): a 1-D view per slice reaches the update."""
    shapes = []
    original = GaLoreAdamW8bit._apply_plain

    def spy(self, p, *args, **kwargs):
        shapes.append(tuple(p.shape))
        return original(self, p, *args, **kwargs)

    monkeypatch.setattr(GaLoreAdamW8bit, "_apply_plain", spy)
    monkeypatch.setattr(LowRankOptimizer, "foreach_chunk_elements", 1000)
    embedding = nn.Parameter(torch.randn(99, 32))
    optimizer = GaLoreAdamW8bit([embedding], lr=1e-3, block_size=64, min_8bit_size=0, foreach=False)
    embedding.grad = torch.randn(99, 32)
    optimizer.step()
    assert shapes == [(960,), (960,), (960,), (288,)]  # slices of whole 64-element blocks (1000 // 64 * 64)


def test_trajectories_differ_when_an_update_is_wrong(monkeypatch):
    """The comparison above can fail: a batched path that drops the weight decay of plain parameters is caught."""
    expected = _trajectory("galore_adamw", CASES["galore_adamw"], foreach=False, steps=2)

    def no_decay(self, params, exp_avgs, denoms, step_size, states, group):
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size)

    monkeypatch.setattr(GaLoreAdamW, "_apply_plain_many", no_decay)
    with pytest.raises(AssertionError, match="step 0"):
        _assert_same(expected, _trajectory("galore_adamw", CASES["galore_adamw"], foreach=True, steps=2))


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_batched_step_with_half_and_fp32_parameters_in_one_group(cls):
    """Plain bf16/fp16 parameters keep half-precision moments and projected weights fp32 ones: several dtype buckets
    per chunk. The decay factor 1 − lr·wd = 0.997 and β2 = 0.99 are not representable in bf16/fp16, so a batched
    multiply that rounded its scalar to the tensor dtype would show here."""

    def run(foreach: bool) -> list[torch.Tensor]:
        torch.manual_seed(3)
        weights = [nn.Parameter(torch.randn(s)) for s in [(20, 33), (33, 20), (17, 17)]]
        plain = [
            nn.Parameter(torch.randn(70, dtype=torch.bfloat16)),
            nn.Parameter(torch.randn(40, dtype=torch.float16)),
            nn.Parameter(torch.randn(5, 9)),
        ]
        extra = {"min_8bit_size": 0, "block_size": 64} if cls is GaLoreAdamW8bit else {}
        groups = [{"params": weights, "low_rank": True}, {"params": plain}]
        optimizer = cls(
            groups, lr=1e-2, weight_decay=0.3, betas=(0.9, 0.99), rank=3, update_proj_gap=2, foreach=foreach, **extra
        )
        generator = torch.Generator().manual_seed(0)
        for _ in range(5):
            for p in weights + plain:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            optimizer.step()
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [p.detach().clone() for p in weights + plain] + states

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_batched_galore_matches_the_reference_on_many_weights():
    shapes = [(23, 11), (11, 23), (16, 16), (30, 7)]
    torch.manual_seed(0)
    ours_params = [nn.Parameter(torch.randn(s)) for s in shapes] + [nn.Parameter(torch.randn(9))]
    ref_params = [nn.Parameter(p.detach().clone()) for p in ours_params]
    kwargs = dict(lr=1e-2, weight_decay=0.05, rank=4, update_proj_gap=3, scale=0.5)
    ours = GaLoreAdamW(
        [{"params": ours_params[:4], "low_rank": True}, {"params": ours_params[4:]}], svd="exact", **kwargs
    )
    ref = ReferenceGaLoreAdamW(ref_params, project=[True] * 4 + [False], **kwargs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        for a, b in zip(ours_params, ref_params):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        assert_close_on_scale(a, b)


@pytest.mark.parametrize("block", [64, 256])
@pytest.mark.parametrize(
    "shapes", [[(4, 64)], [(3, 50)], [(4, 37), (2, 64), (5, 300), (1, 1)]], ids=["one", "padded", "many"]
)
def test_packed_quantisation_equals_one_call_per_state(block, shapes):
    store = Blockwise8bitStore()
    generator = torch.Generator().manual_seed(0)
    for signed in (True, False):
        singles, packed = [], []
        for shape in shapes:
            for states in (singles, packed):
                state: dict = {}
                store.init(state, "m", shape, torch.device("cpu"), block, signed)
                states.append(state)
        values = [torch.randn(s, generator=generator) * 3 for s in shapes]
        values = [v if signed else v.abs() for v in values]
        for state, value in zip(singles, values):
            store.save(state, "m", value, signed)
        for state, value in zip(packed, values):
            store.save(state, "m", value, signed)
        views, handle = store.load_many(packed, "m", signed)
        for view, state in zip(views, singles):
            assert torch.equal(view, store.load(state, "m", signed))
        updates = [torch.randn(s, generator=generator) for s in shapes]
        for view, state, update in zip(views, singles, updates):
            new = store.load(state, "m", signed).mul_(0.9).add_(update.abs() if not signed else update)
            store.save(state, "m", new, signed)
            view.mul_(0.9).add_(update.abs() if not signed else update)
        store.save_many(handle, signed)
        for a, b in zip(singles, packed):
            assert torch.equal(a["m_q"], b["m_q"]) and torch.equal(a["m_absmax"], b["m_absmax"])


def test_foreach_is_validated_and_reaches_the_groups():
    weight = nn.Parameter(torch.randn(8, 8))
    with pytest.raises(InvalidConfigError, match="foreach"):
        GaLoreAdamW([weight], foreach="yes")
    model = LlamaForCausalLM(tiny_llama_config())
    cls, kwargs = make_optimizer_kwargs(
        "galore_adamw_8bit", model, lr=1e-3, weight_decay=0.0, target_modules="all-linear", optim_args="foreach=false"
    )
    assert all(group["foreach"] is False for group in cls(**kwargs).param_groups)
    with pytest.raises(InvalidConfigError, match="foreach"):
        make_optimizer_kwargs(
            "galore_adafactor", model, lr=1e-3, weight_decay=0.0, target_modules="all-linear", optim_args="foreach=1"
        )


def test_a_checkpoint_without_foreach_loads_with_the_default():
    weight = nn.Parameter(torch.randn(8, 8))
    optimizer = GaLoreAdamW([{"params": [weight], "low_rank": True}], rank=2)
    weight.grad = torch.randn(8, 8)
    optimizer.step()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["foreach"]
    fresh = GaLoreAdamW([{"params": [weight], "low_rank": True}], rank=2)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["foreach"] is True
    fresh.step()
