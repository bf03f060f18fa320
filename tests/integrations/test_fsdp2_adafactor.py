"""GaLoreAdafactor and FloraAdafactor on FSDP2 row shards (`fully_shard`, gloo, CPU) against one unsharded process.

The launched script (distributed/fsdp2_galore.py, as in test_fsdp2.py) trains the tiny MLP for 8 steps: two
processes × batch 4 under `fully_shard` (`proj_type="std"`, the right side under sharding) against one process ×
batch 8 unsharded with `proj_type="right"`, with NaNs in gradient rows that rank 1 holds at steps 4 and 6 (the
second at a GaLore refresh step). GaLore refreshes every 3 steps (`update_proj_gap=3`), FLoRA resamples its momentum
projection every 3 steps (`kappa=3`). `scale_parameter=True` and momentum, so every global number Adafactor uses is
exercised: the column statistics of the factored second moment (projected m×r gradients: r columns; FLoRA's full
gradient: n), the mean of the row statistics, the update's RMS (clipping) and the weight's RMS (step size), of the
projected weights and of the 1-D biases and LayerNorm parameters, which are sharded too.

Measured: GaLoreAdafactor's parameters within 1.7e-7 of a tensor's largest entry, losses 1.2e-7 relative;
FloraAdafactor's within 2.3e-7 and 1.2e-7 (`FP32_RTOL` = 1e-5, as for AdamW). Each of the all-reduced numbers
replaced by the process' own rows' value (the sums not all-reduced) fails the comparison:

| left local | GaLoreAdafactor: parameters (of the largest entry), losses | FloraAdafactor: parameters, losses |
|---|---|---|
| column statistics | 8.6e-4, 1.7e-5 | 6.5e-3, 3.0e-5 |
| mean of the row statistics | 4.3e-4, 9.5e-6 | 1.7e-3, 2.7e-5 |
| RMS of 2-D tensors (update clipping, weight RMS) | 2.1e-4, 4.3e-6 | 5.3e-3, 3.4e-5 |
| RMS of 1-D tensors (biases and norms: update clipping, weight RMS) | 1.1e-2, 3.5e-5 | 1.1e-2, 3.5e-5 |

Without `scale_parameter` (the update RMS of the clipping alone) left local: 2-D 1.5e-3, 3.0e-5 (GaLore) and
2.5e-2, 4.4e-4 (FLoRA); 1-D 1.0e-2, 7.5e-5 and 1.4e-2, 6.2e-5. Tolerances: parameters 1e-5 of a tensor's largest
entry (`FP32_RTOL`), losses 1e-5 relative (`LOSS_RTOL`), so every case fails on the parameters.

Adafactor has no `foreach` knob (it updates parameter by parameter); its per-parameter path under sharding is one
parameter per chunk (`--chunk-elements 1`), where each parameter's rounds are their own all-reduces.
"""

from __future__ import annotations

import pytest
import torch
from test_fsdp2 import BASIS_ATOL, FP32_RTOL, LOSS_RTOL, WEIGHTS, WIDTH, _max_error, _run

from hf_galore.projection.subspace import Side

RANK = 4
#: Both optimizers: the weight's RMS (`scale_parameter`) and momentum (GaLore's `beta1` is off by default).
EXTRA = '{"scale_parameter": true, "beta1": 0.9}'
#: Chunks of one parameter: the per-parameter path, and the state of each process reloaded after step 4.
LOOP = ("--chunk-elements", "1", "--reload-at", "4")
#: The 1-D parameters of the script's model (biases, LayerNorm): elementwise second moment, global RMS only.
PLAIN = 5


def _check_run(single: dict, ranks: list[dict], replicated_bytes: int) -> None:
    """What both optimizers must hold: the same training as one process, on both ranks alike."""
    rank0, rank1 = ranks
    assert rank0["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
    for name, value in single["params"].items():
        assert _max_error(rank0["params"][name], value) <= FP32_RTOL, (name, _max_error(rank0["params"][name], value))
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    assert {name: rank0["sides"][name] for name in WEIGHTS} == dict.fromkeys(WEIGHTS, int(Side.RIGHT))
    # The NaNs in rank 1's rows skipped those weights' updates on both ranks, as one process skips them.
    assert rank0["skips"] == rank1["skips"] == single["skips"]
    assert single["skips"]["0.weight"] == single["skips"]["3.weight"] == 1
    assert rank0["steps"] == rank1["steps"] == single["steps"]
    # Moments sharded by rows, about half on each rank; the column statistics of the projected (or compressed)
    # weights are replicated (every process holds them whole).
    moments = single["state_bytes"]["moments"]
    halves = [r["state_bytes"]["moments"] for r in ranks]
    assert sum(halves) == moments + replicated_bytes, halves
    assert all(0.45 <= (h - replicated_bytes) / (moments - replicated_bytes) <= 0.55 for h in halves), halves
    # The same collectives on both ranks (the same decisions), all of them all-reduces.
    assert rank0["collectives"] == rank1["collectives"]
    assert all(name == "all_reduce" for calls in rank0["collectives"] for name, _ in calls)


def _ordinary_steps(run: dict) -> list[list[int]]:
    """Sizes of the collectives of the steps without a refresh or a NaN (GaLore: steps 1, 2, 5)."""
    nan_steps = (4, 6)
    return [
        [numel for _, numel in calls]
        for step, (calls, refreshed) in enumerate(zip(run["collectives"], run["refreshed"]))
        if not refreshed and step not in nan_steps
    ]


@pytest.mark.distributed
def test_galore_adafactor_on_fsdp2_equals_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1, "--optim", "galore_adafactor", "--proj-type", "right", "--extra", EXTRA)
    runs = [
        _run(tmp_path / "fsdp2", 2, "--optim", "galore_adafactor", "--extra", EXTRA),
        _run(tmp_path / "loop", 2, "--optim", "galore_adafactor", "--extra", EXTRA, *LOOP),
    ]
    for chunked, ranks in enumerate(runs):
        rank0, rank1 = ranks
        _check_run(single, ranks, replicated_bytes=4 * RANK * len(WEIGHTS))
        # Two refreshes after the first basis; the same bases on both ranks, close to one process' bases.
        assert sum(rank0["refreshed"]) >= 3 and rank0["refreshed"] == single["refreshed"]
        assert sorted(rank0["bases"]) == sorted(rank1["bases"]) == sorted(single["bases"])
        for key, basis in rank0["bases"].items():
            assert torch.equal(basis, rank1["bases"][key]), key
            assert float((basis - single["bases"][key]).abs().max()) <= BASIS_ATOL, key
        ordinary = _ordinary_steps(rank0)
        assert len(ordinary) >= 2
        for sizes in ordinary:
            if chunked:  # one parameter per chunk: its flag, its r + 2 statistics and its update's RMS
                assert max(sizes) == RANK + 2, sizes
            else:
                # One all-reduce per round and group: the 1-D parameters' weight RMS, then their update RMS; the
                # projected weights' non-finite flags, their r column sums + row-statistics sum + weight RMS, then
                # their update RMS. 34 numbers, 136 bytes per step.
                assert sizes == [PLAIN, PLAIN, len(WEIGHTS), len(WEIGHTS) * (RANK + 2), len(WEIGHTS)], sizes
        # A refresh step adds the range finder's sketches (n×w, as GaLoreAdamW's), never more.
        largest_sketch = max(n * WIDTH for _, n in WEIGHTS.values())
        assert all(numel <= largest_sketch for calls in rank0["collectives"] for _, numel in calls)


@pytest.mark.distributed
def test_flora_adafactor_on_fsdp2_equals_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1, "--optim", "flora_adafactor", "--proj-type", "right", "--extra", EXTRA)
    runs = [
        _run(tmp_path / "fsdp2", 2, "--optim", "flora_adafactor", "--extra", EXTRA),
        _run(tmp_path / "loop", 2, "--optim", "flora_adafactor", "--extra", EXTRA, *LOOP),
    ]
    columns = sum(n for _, n in WEIGHTS.values())
    for chunked, ranks in enumerate(runs):
        rank0, _ = ranks
        # FLoRA's second moment is of the full m×n gradient: its n column statistics are replicated.
        _check_run(single, ranks, replicated_bytes=4 * columns)
        # At least two resamplings of every weight's momentum projection (kappa=3).
        assert all(rank0["steps"][name] // 3 >= 2 for name in WEIGHTS), rank0["steps"]
        for step, calls in enumerate(rank0["collectives"]):
            sizes = [numel for _, numel in calls]
            if chunked:
                assert max(sizes) <= max(n for _, n in WEIGHTS.values()) + 2, (step, sizes)
            elif step not in (4, 6):  # NaN steps: the skipped weight's rounds are not run
                # The weights' n column sums + row-statistics sum + weight RMS: 126 numbers, less than the
                # smallest weight (9×32); 146 numbers, 584 bytes per step with the flags and RMS.
                expected = [PLAIN, PLAIN, len(WEIGHTS), columns + 2 * len(WEIGHTS), len(WEIGHTS)]
                assert sizes == expected, (step, sizes)
            assert sum(sizes) < min(m * n for m, n in WEIGHTS.values()), (step, sizes)
