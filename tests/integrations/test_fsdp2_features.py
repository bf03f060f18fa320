"""Global gradient clipping and FSDP2's bf16 `MixedPrecisionPolicy` with GaLoreAdamW / FloraAdamW on `fully_shard` row
shards (gloo, CPU), against one unsharded process (issue #15, items 1 and 6).

The launched script (distributed/fsdp2_features.py) trains fsdp2_galore.py's MLP for 8 steps: two processes × batch 4
under `fully_shard` (`proj_type="std"`, which means the right side under sharding) against one process × batch 8
with `proj_type="right"`. `clip_grad_norm_(model.parameters(), 0.2)` runs before every step; the gradient norms are
0.36-1.09, so every step is clipped (asserted).

Clipping (fp32): on DTensor gradients `clip_grad_norm_` reduces the norm over all processes' rows. Measured: total
norms within 1.5e-7 relative of one process' at every step, parameters within 8.4e-7 of each tensor's largest entry,
losses 2e-7 relative. Clipping each process' rows by their own norm instead (`--local-clip`, the mistake a sharded
clip could make) gives norms 30 % off and parameters 1.4e-2 off (relative to each tensor's norm): the test fails.

Mixed precision (`param_dtype=bf16`, `reduce_dtype=fp32` or None = bf16): the reference runs each half of the batch
on a bf16 copy of the fp32 weights and averages the bf16 gradients in the reduce dtype, which is what FSDP2 computes:
the gradients of step 0 are bit-identical (checked once by hand, all 8 tensors, both reduce dtypes). Later steps start
from parameters that differ by the optimizers' fp32 round-off (GaLore's sharded range finder, FLoRA's all-reduced
column statistics: ~1e-7), and where such a difference moves a weight across a bf16 rounding boundary, the bf16
forward differs by one bf16 step from then on. Measured over 8 steps: GaLore (fp32 reduce) parameters 1.9e-7 relative
to each tensor's norm (no such crossing), FLoRA (fp32 reduce) 7.2e-4, GaLore (bf16 reduce) 1.9e-4; losses at most
1.5e-4 relative. So the whole run is compared at a bf16 tolerance (`BF16_RTOL` = 4e-3 ≈ 2⁻⁸, bf16's relative
precision), and step 0, before any optimizer round-off, at fp32 round-off (`STEP0_RTOL` = 1e-6; measured ≤ 1.7e-7):
there a run computed in fp32 differs from the bf16 reference by 1.1e-4 (loss) and 6.6e-5 (norm), and a bf16 reduction
from an fp32 one by 4.5e-5 (norm), so a missing or wrong precision fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import relative_error
from script_utils import launch

SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_features.py"

MAX_NORM = 0.2
FP32_RTOL = 1e-5
NORM_RTOL = 1e-6
LOSS_RTOL = 1e-5
STEP0_RTOL = 1e-6
BF16_RTOL = 4e-3
BF16_LOSS_RTOL = 1e-3


def _run(out: Path, processes: int, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    return launch(SCRIPT, out, processes, "--clip", str(MAX_NORM), *args)


def _max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|, in float64."""
    reference = reference.double()
    return float((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _relative(values: list[float], references: list[float]) -> float:
    return max(abs(v - r) / abs(r) for v, r in zip(values, references, strict=True))


def _check_ranks_agree(rank0: dict, rank1: dict) -> None:
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    assert rank0["norms"] == rank1["norms"]  # the global norm, the same number on every process
    assert sorted(rank0["bases"]) == sorted(rank1["bases"])
    for key, basis in rank0["bases"].items():
        assert torch.equal(basis, rank1["bases"][key]), key


@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["galore_adamw", "flora_adamw"])
def test_clip_grad_norm_on_fsdp2_is_global(tmp_path, optim):
    (single,) = _run(tmp_path / "single", 1, "--optim", optim, "--proj-type", "right")
    rank0, rank1 = _run(tmp_path / "fsdp2", 2, "--optim", optim)
    assert min(single["norms"]) > MAX_NORM  # every step clipped
    assert _relative(rank0["norms"], single["norms"]) <= NORM_RTOL
    assert _relative(rank0["losses"], single["losses"]) <= LOSS_RTOL
    for name, value in single["params"].items():
        assert _max_error(rank0["params"][name], value) <= FP32_RTOL, (name, _max_error(rank0["params"][name], value))
    _check_ranks_agree(rank0, rank1)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("optim", "mp"), [("galore_adamw", "bf16-fp32"), ("flora_adamw", "bf16-fp32"), ("galore_adamw", "bf16")]
)
def test_bf16_mixed_precision_on_fsdp2_equals_the_bf16_reference(tmp_path, optim, mp):
    (single,) = _run(tmp_path / "single", 1, "--optim", optim, "--proj-type", "right", "--mp", mp)
    rank0, rank1 = _run(tmp_path / "fsdp2", 2, "--optim", optim, "--mp", mp)
    # FSDP2 computed in bf16, and the optimizer saw fp32 sharded parameters and gradients (FSDP2 casts the reduced
    # gradient back to the sharded parameter's dtype, whatever the reduce dtype) and kept fp32 state and bases.
    assert rank0["output_dtypes"] == ["torch.bfloat16"]
    fp32 = ["torch.float32"]
    assert rank0["dtypes"] == {
        "grads": fp32,
        "params": fp32,
        "moments": fp32,
        "bases": fp32 if "galore" in optim else [],
    }
    assert min(single["norms"]) > MAX_NORM
    # Step 0: the same bf16 arithmetic, so the same loss and global norm up to fp32 round-off.
    assert _relative(rank0["losses"][:1], single["losses"][:1]) <= STEP0_RTOL
    assert _relative(rank0["norms"][:1], single["norms"][:1]) <= STEP0_RTOL
    # The run: within bf16 precision of the reference (see the module docstring for the measured errors).
    assert _relative(rank0["losses"], single["losses"]) <= BF16_LOSS_RTOL
    assert _relative(rank0["norms"], single["norms"]) <= BF16_LOSS_RTOL
    for name, value in single["params"].items():
        assert relative_error(rank0["params"][name], value) <= BF16_RTOL, (
            name,
            relative_error(rank0["params"][name], value),
        )
    _check_ranks_agree(rank0, rank1)
    if "galore" in optim:  # a basis after every refresh (steps 0, 3, 6), as in one process
        assert sorted(rank0["bases"]) == sorted(single["bases"]) and len(single["bases"]) == 9
