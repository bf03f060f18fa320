"""The memory estimator's per-process optimizer-state bytes under FSDP2 (`estimate_memory(..., fsdp2=True)`) against
what each process of a real `fully_shard` run holds (gloo, CPU).

The launched script (distributed/fsdp2_galore.py) builds a tiny MLP (weights 64×24, 32×64, 9×32, so the 9-row weight
and bias split 5 + 4 over two processes, 3 + 3 + 3 + 0 over four, and a shard can hold no more rows than the rank),
shards it, steps the optimizer and writes each rank's `state_bytes` (every tensor in `optimizer.state`). The
estimator gets the same model (built by the script's own `build_model`, WeLore-split like the script does) and the
script's optimizer settings as `optim_args`; the prediction must equal the measurement exactly, on every rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from script_utils import launch, load_script

from hf_galore.memory import estimate_memory
from hf_galore.utils.imports import is_bitsandbytes_available

SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_galore.py"
needs_bnb = pytest.mark.skipif(not is_bitsandbytes_available(), reason="needs bitsandbytes")

#: The script's settings (`optim_kwargs` in its `main`) as `optim_args`, per name, and its extra script arguments.
GALORE = "rank=4, update_proj_gap=3, scale=1.0, oversample=4"
CASES = {
    "galore_adamw": (GALORE, ()),
    # Blocks of 64 that straddle the shards; every state 8-bit (the script's default min_8bit_size=0).
    "galore_adamw_8bit": (f"{GALORE}, block_size=64, min_8bit_size=0", ()),
    # 8-bit decided on the global size: the 9×4 state (36) is 8-bit on shards of 20 and 16 elements; the 1-D
    # states (64, 32, 9) stay fp32.
    "galore_adamw_8bit_threshold": (f"{GALORE}, block_size=64, min_8bit_size=36", ("--min-8bit-size", "36")),
    "flora_adamw": ("rank=4, kappa=3", ()),
    # Adafactor: the column statistics of the projected m×4 gradient (4 numbers) replicated, the row ones sharded.
    "galore_adafactor": (GALORE, ()),
    "flora_adafactor": ("rank=4, kappa=3", ()),
    "welore_adamw": (None, ()),
    "welore_adamw_8bit": ("block_size=64, min_8bit_size=0", ()),
}


def _predicted(optim: str, optim_args: str | None, world_size: int) -> list[int]:
    script = load_script(SCRIPT, "fsdp2_galore_script")
    model = script.build_model(torch.float32)
    if optim.startswith("welore"):
        from hf_galore import welore

        welore.compress(model, target_compression=0.5)  # as the script: deterministic SVDs of the same weights
    estimate = estimate_memory(
        model, optim, optim_args=optim_args, target_modules=["0", "3", "5"], fsdp2=True, world_size=world_size
    )
    return estimate.per_process_state_bytes


def _measured(tmp_path: Path, optim: str, extra: tuple[str, ...], processes: int) -> list[int]:
    ranks = launch(SCRIPT, tmp_path, processes, "--optim", optim, "--steps", "2", "--global-batch", "4", *extra)
    return [sum(rank["state_bytes"].values()) for rank in ranks]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "case",
    [
        "galore_adamw",
        pytest.param("galore_adamw_8bit", marks=needs_bnb),
        pytest.param("galore_adamw_8bit_threshold", marks=needs_bnb),
        "flora_adamw",
        "galore_adafactor",
        "flora_adafactor",
        "welore_adamw",
        pytest.param("welore_adamw_8bit", marks=needs_bnb),
    ],
)
def test_predicted_state_bytes_per_process_equal_the_measured_ones(tmp_path, case):
    optim = case.removesuffix("_threshold")
    optim_args, extra = CASES[case]
    measured = _measured(tmp_path, optim, extra, processes=2)
    assert _predicted(optim, optim_args, world_size=2) == measured
    assert measured[0] > measured[1]  # process 0 holds the 5 rows of the 9-row tensors: the largest


@pytest.mark.distributed
@needs_bnb
def test_shards_with_no_more_rows_than_the_rank_and_empty_shards_are_predicted(tmp_path):
    # Four processes: the 9×32 weight splits 3 + 3 + 3 + 0 rows at rank 4, yet stays projected (its global shape).
    optim_args, extra = CASES["galore_adamw_8bit"]
    measured = _measured(tmp_path, "galore_adamw_8bit", extra, processes=4)
    assert _predicted("galore_adamw_8bit", optim_args, world_size=4) == measured
