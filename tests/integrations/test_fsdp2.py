"""GaLoreAdamW(8bit) and WeLoreAdamW(8bit) on FSDP2 row shards (`fully_shard`, gloo, CPU) against one unsharded process.

The launched script (distributed/fsdp2_galore.py) trains a tiny MLP for 8 steps with `update_proj_gap=3` (refreshes
at steps 0, 3 and 6): two processes × batch 4 under `fully_shard` with the default `proj_type="std"` (which means
the right side under sharding), one process × batch 8 unsharded with `proj_type="right"`. Both runs put a NaN in a
gradient row that rank 1 holds, once at an ordinary step and once at a refresh step.

Tolerances: the sharded run sums the sketches Gᵀ Ω and the Gram matrix in another order than one process and skips
one QR (see `sharded_right_basis`), so bases differ by fp32 round-off (measured ≤ 1.6e-6) and the parameters by
≤ 7.5e-7 of each tensor's largest entry (`FP32_RTOL` = 1e-5). With 8-bit moments whose blocks fall on the same
elements in both runs (each shard holds whole blocks; 1-D states fp32 through `min_8bit_size`), a round-off can move
a value across a code: measured 3.3e-7 of a tensor's norm in this run, 5.1e-5 in a run without the NaNs; compared at
`EIGHT_BIT_RTOL` = 1e-3. A rank using only its own rows' sketch (the sketch all-reduce removed) fails the losses
already; 8-bit blocks that straddle the shards (min_8bit_size=0 here) differ by up to 1.2e-2, another quantisation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import relative_error
from script_utils import launch

from hf_galore.projection.subspace import Side, choose_side, compute_bases, row_sharded_side, sharded_right_basis

SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_galore.py"

FP32_RTOL = 1e-5
EIGHT_BIT_RTOL = 1e-3
LOSS_RTOL = 1e-5
BASIS_ATOL = 1e-4  # bases are orthonormal: entries of order 1/sqrt(n)

#: The projected weights of the script's model: (name, rows m, columns n); rank 4, oversample 4 -> w = 8.
WEIGHTS = {"0.weight": (64, 24), "3.weight": (32, 64), "5.weight": (9, 32)}
WIDTH = 8
#: fp32 moment bytes of the script's model (two moments): projected m×4 plus every 1-D parameter (64, 64, 64, 32, 9).
FP32_MOMENT_BYTES = 2 * 4 * (sum(m * 4 for m, _ in WEIGHTS.values()) + 64 * 3 + 32 + 9)


def _run(out: Path, processes: int, *args: str, nan: bool = True) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    return launch(SCRIPT, out, processes, *(["--nan"] if nan else []), *args)


def _max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|, in float64."""
    reference = reference.double()
    return float((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _check_sharded_run(single: dict, ranks: list[dict], error, rtol: float, chunks: int = 1) -> None:
    rank0, rank1 = ranks
    assert rank0["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
    for name, value in single["params"].items():
        assert error(rank0["params"][name], value) <= rtol, (name, error(rank0["params"][name], value))
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    # Every projected weight (the wide 32×64 and 9×32 ones too: std means right under sharding) on the right side.
    assert {name: rank0["sides"][name] for name in WEIGHTS} == dict.fromkeys(WEIGHTS, int(Side.RIGHT))
    assert {name: single["sides"][name] for name in WEIGHTS} == dict.fromkeys(WEIGHTS, int(Side.RIGHT))
    # At least two refreshes after the first basis; the same bases on both ranks after every one, close to one
    # process' bases.
    assert sum(rank0["refreshed"]) >= 3 and rank0["refreshed"] == single["refreshed"]
    assert sorted(rank0["bases"]) == sorted(rank1["bases"]) == sorted(single["bases"])
    for key, basis in rank0["bases"].items():
        assert torch.equal(basis, rank1["bases"][key]), key
        assert float((basis - single["bases"][key]).abs().max()) <= BASIS_ATOL, key
    # The NaN in rank 1's rows skipped the weight's update on both ranks, as one process skips it.
    assert rank0["skips"] == rank1["skips"] == single["skips"]
    assert single["skips"]["0.weight"] == single["skips"]["3.weight"] == 1
    assert rank0["steps"] == rank1["steps"] == single["steps"]
    # State: moments sharded by rows (each rank about half, together the one-process bytes), bases replicated.
    halves = [r["state_bytes"]["moments"] for r in ranks]
    assert sum(halves) == single["state_bytes"]["moments"]
    assert all(0.45 <= h / single["state_bytes"]["moments"] <= 0.55 for h in halves), halves
    assert rank0["state_bytes"]["bases"] == rank1["state_bytes"]["bases"] == single["state_bytes"]["bases"]
    # Collectives of optimizer.step(): none but all-reduces; on an ordinary step only the non-finite flags (one
    # number per projected weight), on a refresh step nothing larger than one weight's n×w sketch.
    largest_sketch = max(n * WIDTH for _, n in WEIGHTS.values())
    for step, (calls, refreshed) in enumerate(zip(rank0["collectives"], rank0["refreshed"])):
        assert {name for name, _ in calls} <= {"all_reduce"}, (step, calls)
        limit = largest_sketch if refreshed else len(WEIGHTS)
        assert all(numel <= limit for _, numel in calls), (step, calls)
        if not refreshed:
            assert len(calls) == chunks, (step, calls)
    assert rank0["collectives"] == rank1["collectives"]


@pytest.mark.distributed
def test_galore_adamw_on_fsdp2_equals_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1, "--optim", "galore_adamw", "--proj-type", "right")
    ranks = _run(tmp_path / "fsdp2", 2, "--optim", "galore_adamw", "--refusals")
    _check_sharded_run(single, ranks, _max_error, FP32_RTOL)
    # Refused at construction, before any step, naming what works.
    refusals = ranks[0]["refusals"]
    for label in ("left", "full", "reverse_std"):
        assert "proj_type='std' or 'right'" in refusals[label], (label, refusals[label])
    assert "svd='randomized'" in refusals["exact"]
    assert "GaLoreAdamW and GaLoreAdamW8bit" in refusals["layerwise"], refusals["layerwise"]
    assert refusals["adafactor"] == ""  # GaLoreAdafactor steps on row shards: see test_fsdp2_adafactor.py
    # The per-parameter path, with the projected gradients cut into several chunks (each a non-finite check), and
    # each process' optimizer state saved and loaded (weights_only) into a new optimizer after step 4: the same
    # training. Chunks are cut on global sizes, so both ranks run the same collectives.
    loop = ("--no-foreach", "--chunk-elements", "300", "--reload-at", "4")
    ranks = _run(tmp_path / "loop", 2, "--optim", "galore_adamw", *loop)
    _check_sharded_run(single, ranks, _max_error, FP32_RTOL, chunks=2)


@pytest.mark.distributed
def test_galore_adamw_8bit_on_fsdp2_equals_one_process(tmp_path):
    # min_8bit_size=65: the 64×4 and 32×4 moments are 8-bit (blocks of 64 that each shard holds whole), the 1-D states
    # and the 9×4 moments fp32; the decision uses the global size, so it is the same in both runs. Two power
    # iterations (each an n×w all-reduce) and sign alignment instead of the moment rotation, for coverage.
    extra = '{"power_iters": 2, "refresh_signs": "aligned"}'
    common = ("--optim", "galore_adamw_8bit", "--min-8bit-size", "65", "--extra", extra)
    (single,) = _run(tmp_path / "single", 1, *common, "--proj-type", "right")
    ranks = _run(tmp_path / "fsdp2", 2, *common)
    _check_sharded_run(single, ranks, relative_error, EIGHT_BIT_RTOL)
    assert single["state_bytes"]["moments"] < FP32_MOMENT_BYTES  # 8-bit codes really in use


#: WeLore's split of the script's model (`welore.compress(model, target_compression=0.5)`): the trainable LRC factors.
WELORE_FACTORS = {"0.down.weight": (9, 24), "0.up.weight": (64, 9), "3.down.weight": (10, 64),
                  "3.up.weight": (32, 10), "5.down.weight": (4, 32), "5.up.weight": (9, 4)}  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("optim", ["welore_adamw", "welore_adamw_8bit"])
def test_welore_adamw_on_fsdp2_equals_one_process(tmp_path, optim):
    """WeLore's factors are ordinary parameters split before `fully_shard`: elementwise AdamW on each process' rows.

    Measured: fp32 parameters within 1.4e-7 of a tensor's largest entry, losses 1.9e-7 relative. 8-bit with
    `min_8bit_size=600`: only the 10×64 factor is 8-bit, and each shard (5×64) holds whole 64-element blocks; a
    round-off moved a value across a code: 1.7e-4 of a tensor's norm (with `min_8bit_size=0`, blocks straddling the
    shards: 3.5e-3, another quantisation). One step moves each factor by 13-31 % of its norm, so a missed or wrong
    update fails by orders of magnitude. WeLore projects nothing, so it has no non-finite skip (plain AdamW), and
    its step needs no collective at all.
    """
    eight_bit = optim.endswith("_8bit")
    args = ("--optim", optim, *(("--min-8bit-size", "600") if eight_bit else ()))
    (single,) = _run(tmp_path / "single", 1, *args, nan=False)
    runs = [_run(tmp_path / "fsdp2", 2, *args, nan=False)]
    if not eight_bit:  # the per-parameter path, and each process' state saved and loaded after step 4
        runs.append(_run(tmp_path / "loop", 2, *args, "--no-foreach", "--reload-at", "4", nan=False))
    error, rtol = (relative_error, EIGHT_BIT_RTOL) if eight_bit else (_max_error, FP32_RTOL)
    for rank0, rank1 in runs:
        assert rank0["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
        for name, value in single["params"].items():
            assert error(rank0["params"][name], value) <= rtol, (name, error(rank0["params"][name], value))
            assert torch.equal(rank0["params"][name], rank1["params"][name]), name
        # Only the factors train (biases and the norm frozen by the split); each stepped 8 times on both ranks.
        assert rank0["steps"] == rank1["steps"] == single["steps"] == dict.fromkeys(WELORE_FACTORS, 8)
        # No collective inside optimizer.step().
        assert rank0["collectives"] == rank1["collectives"] == [[]] * 8
        # Moments sharded by rows: about half on each rank, together the one-process bytes.
        halves = [r["state_bytes"]["moments"] for r in (rank0, rank1)]
        assert sum(halves) == single["state_bytes"]["moments"]
        assert all(0.45 <= h / single["state_bytes"]["moments"] <= 0.55 for h in halves), halves
    fp32_bytes = 2 * 4 * sum(m * n for m, n in WELORE_FACTORS.values())
    assert (
        (single["state_bytes"]["moments"] < fp32_bytes)
        if eight_bit
        else (single["state_bytes"]["moments"] == fp32_bytes)
    )


@pytest.mark.distributed
def test_flora_adamw_on_fsdp2_equals_one_process(tmp_path):
    """FloraAdamW on row shards: compressed on the right (the n×r projection regenerated from the same seed on every
    process, the m_k×r momentum local), the factored second moment's column statistics and row mean summed over all
    rows: one all-reduce of n + 1 numbers per weight and step. `kappa=3`: resamplings at steps 3 and 6.

    Measured: parameters within 2.1e-7 of a tensor's largest entry, losses 2.1e-7 relative (NaNs in rank 1's rows
    at steps 4 and 6 skipped on both ranks as in one process). One process × batch 8 with proj_type="right". Without
    the n + 1 all-reduce (each process' own rows' statistics) the parameters are off by 0.12, the losses by 2.5e-3.
    """
    (single,) = _run(tmp_path / "single", 1, "--optim", "flora_adamw", "--proj-type", "right")
    runs = [
        _run(tmp_path / "fsdp2", 2, "--optim", "flora_adamw", "--refusals"),
        _run(tmp_path / "loop", 2, "--optim", "flora_adamw", "--no-foreach", "--reload-at", "4"),
    ]
    for rank0, rank1 in runs:
        assert rank0["losses"] == pytest.approx(single["losses"], rel=LOSS_RTOL)
        for name, value in single["params"].items():
            assert _max_error(rank0["params"][name], value) <= FP32_RTOL, (
                name,
                _max_error(rank0["params"][name], value),
            )
            assert torch.equal(rank0["params"][name], rank1["params"][name]), name
        assert {name: rank0["sides"][name] for name in WEIGHTS} == dict.fromkeys(WEIGHTS, int(Side.RIGHT))
        assert rank0["skips"] == rank1["skips"] == single["skips"]
        assert single["skips"]["0.weight"] == single["skips"]["3.weight"] == 1
        assert rank0["steps"] == rank1["steps"] == single["steps"]
        # Collectives of step(): the non-finite flags (one number per weight) and one n + 1 all-reduce per weight
        # updated at that step (a skipped weight's is not run).
        for step, calls in enumerate(rank0["collectives"]):
            assert {name for name, _ in calls} <= {"all_reduce"}, (step, calls)
            sizes = sorted(numel for _, numel in calls)
            assert sizes[0] == len(WEIGHTS) and set(sizes[1:]) <= {n + 1 for _, n in WEIGHTS.values()}, (step, calls)
        assert rank0["collectives"] == rank1["collectives"]
        # Momentum and row statistics sharded by rows; the column statistics (n per weight) on every process.
        columns = 4 * sum(n for _, n in WEIGHTS.values())
        halves = [r["state_bytes"]["moments"] for r in (rank0, rank1)]
        assert sum(halves) == single["state_bytes"]["moments"] + columns
        assert all(0.45 <= (h - columns) / (single["state_bytes"]["moments"] - columns) <= 0.55 for h in halves)
    refusals = runs[0][0]["refusals"]
    assert "'std' or 'right'" in refusals["flora_left"]
    assert refusals["flora_adafactor"] == ""  # steps on row shards too: see test_fsdp2_adafactor.py


# ---------------------------------------------------------------------------------------------- single process
def test_row_sharded_side_is_right_for_std_and_refuses_the_left_side():
    assert row_sharded_side((8, 32), "std", 4) == Side.RIGHT  # wide: std alone would pick the left
    assert choose_side((8, 32), "std", 4) == Side.LEFT  # single-process std is unchanged
    assert row_sharded_side((8, 32), "reverse_std", 4) == Side.RIGHT
    assert row_sharded_side((8, 32), "right", 8) == Side.NONE  # rank ≥ min(m, n): plain update
    for proj_type, shape in (("left", (32, 8)), ("full", (32, 8)), ("reverse_std", (32, 8))):
        with pytest.raises(ValueError, match="'std' or 'right'"):
            row_sharded_side(shape, proj_type, 4)


def test_sharded_right_basis_on_one_shard_equals_the_one_process_basis():
    # One "process" holding every row (the all-reduces are identities): the same Ω and the same basis as
    # compute_bases' right side, up to the QR the sharded version skips in the power iteration.
    grad = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(0, -2, 24))
    for power_iters in (0, 1, 2):
        _, expected = compute_bases(grad, Side.RIGHT, 4, "randomized", power_iters, 4,
                                    torch.Generator().manual_seed(3))  # fmt: skip
        got = sharded_right_basis(grad, 0, 40, 4, power_iters, 4, torch.Generator().manual_seed(3),
                                  lambda t: None, lambda t: None)  # fmt: skip
        assert torch.allclose(got, expected, atol=1e-5), (power_iters, (got - expected).abs().max())
