"""Optimizer checkpoints of FSDP2 runs through torch.distributed.checkpoint (DCP), resumed on another number of
processes.

The launched script (distributed/fsdp2_checkpoint.py) trains fsdp2_galore.py's MLP for 8 steps (refreshes at steps 0,
3 and 6; FLoRA resamples at steps 3 and 6; NaNs in rank 1's rows at steps 4 and 6) and saves the model and the
optimizer after step 4 with the calls accelerate makes for FSDP2 (`get_optimizer_state_dict` → `dcp.save`;
`get_optimizer_state_dict` as the template → `dcp.load` → `set_optimizer_state_dict`); the `*_full_state_dict` cases
use `StateDictOptions(full_state_dict=True)` instead (a gathered state dict, `torch.save`d, loaded whole on every
process: accelerate's FULL_STATE_DICT). Four launches cover every case:

* one process (`proj_type="right"`), saving after step 4 and going on: the uninterrupted reference;
* two processes under `fully_shard` (`proj_type="std"`, which means right there), saving after step 4;
* one process resuming the two-process checkpoint (2 → 1), two resuming the one-process checkpoint (1 → 2).

Tolerances as in test_fsdp2.py: the sharded steps differ from one process' by fp32 round-off (sketch sums in another
order), measured ≤ 8e-7 of a tensor's largest entry (`FP32_RTOL` = 1e-5). A fifth launch loads the first process' rows
on both processes (a broken reshard): the parameters are then off by more than 1e-3 of their scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import relative_error
from script_utils import launch

from hf_galore.projection.subspace import Side

SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_checkpoint.py"
SAVE_AT = "4"
FP32_RTOL = 1e-5
LOSS_RTOL = 1e-5
EIGHT_BIT_RTOL = 1e-3
#: Every case of the script's launches; "galore_adamw_8bit" has aligned blocks, "..._straddling" blocks across shards.
CASES = ("galore_adamw", "galore_adamw_8bit", "galore_adamw_8bit_straddling", "flora_adamw", "welore_adamw",
         "galore_adafactor", "flora_adafactor", "galore_adamw_full_state_dict",
         "galore_adamw_8bit_straddling_full_state_dict")  # fmt: skip
#: The GaLore/FLoRA weights of the model (WeLore's factors have other names) and their rows.
WEIGHTS = {"0.weight": 64, "3.weight": 32, "5.weight": 9}


def _max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value − reference| / max |reference|, in float64."""
    reference = reference.double()
    return float((value.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _launch(out: Path, processes: int, *args: str, cases: tuple[str, ...] = CASES) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    return launch(SCRIPT, out, processes, "--cases", ",".join(cases), "--nan", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp2_checkpoint")
    one, two = root / "ckpt_one", root / "ckpt_two"
    (single,) = _launch(root / "single", 1, "--proj-type", "right", "--save-at", SAVE_AT, "--save-dir", str(one))
    sharded = _launch(root / "sharded", 2, "--save-at", SAVE_AT, "--save-dir", str(two))
    resume = ("--resume-at", SAVE_AT)
    (two_to_one,) = _launch(root / "two_to_one", 1, "--proj-type", "right", "--resume-from", str(two), *resume)
    one_to_two = _launch(root / "one_to_two", 2, "--resume-from", str(one), *resume)
    return {"single": single, "sharded": sharded, "two_to_one": two_to_one, "one_to_two": one_to_two,
            "one": one, "root": root}  # fmt: skip


def _check_continues(single: dict, resumed: dict, error=_max_error, rtol: float = FP32_RTOL) -> None:
    """`resumed` (steps 5-7 after loading) ends where the uninterrupted one-process run does."""
    assert sorted(resumed["losses"]) == [5, 6, 7]
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(single["losses"][step], rel=LOSS_RTOL), step
    for name, value in single["params"].items():
        assert error(resumed["params"][name], value) <= rtol, (name, error(resumed["params"][name], value))
    assert resumed["steps"] == single["steps"]
    assert resumed["skips"] == single["skips"]
    # The loaded counters are the saved ones: 5 updates (step 4's NaN skipped on 3.weight), refreshed at 0 and 3.
    for name, state in resumed["loaded"].items():
        expected = 4 if name == "3.weight" and "side" in state and state["side"] != Side.NONE else 5
        assert state["step"] == expected, (name, state["step"])
        if "refresh_count" in state:
            assert state["refresh_count"] == 2, name


@pytest.mark.distributed
@pytest.mark.parametrize(
    "case",
    [
        "galore_adamw",
        "flora_adamw",
        "welore_adamw",
        "galore_adafactor",
        "flora_adafactor",
        "galore_adamw_full_state_dict",
    ],
)
def test_fp32_checkpoint_saved_on_two_processes_resumes_on_one_and_back(runs, case):
    single = runs["single"][case]
    _check_continues(single, runs["two_to_one"][case])
    rank0, rank1 = (r[case] for r in runs["one_to_two"])
    _check_continues(single, rank0)
    for name in single["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    if case != "welore_adamw":  # every projected weight stays on the right side, as saved
        sides = {name: int(Side.RIGHT) for name in WEIGHTS}
        assert {n: runs["two_to_one"][case]["sides"][n] for n in WEIGHTS} == sides
        assert {n: rank0["sides"][n] for n in WEIGHTS} == sides
    # 1 → 2: each process loaded exactly its rows of the one-process state saved after step 4 (torch.chunk's split:
    # 64 → 32 + 32, 9 → 5 + 4), and the replicated tensors (bases, FLoRA's column statistics) whole.
    saved = single["saved"]
    for rank, resumed in enumerate((rank0, rank1)):
        for name, state in resumed["loaded"].items():
            for key, value in state.items():
                whole = saved[name].get(key, 0)  # nonfinite_skips: always in a saved state, 0 if none
                if not torch.is_tensor(value):
                    assert value == whole, (name, key)
                elif key.startswith("proj_") or key == "exp_avg_sq_col":
                    assert torch.equal(value, whole), (name, key)
                else:
                    chunk = -(-whole.shape[0] // 2)
                    assert torch.equal(value, whole[rank * chunk : (rank + 1) * chunk]), (name, key)


@pytest.mark.distributed
def test_8bit_checkpoint_with_aligned_blocks_reshards_exactly(runs):
    """min_8bit_size=65, block 64: the 64×4 and 32×4 moments are 8-bit, and each shard (32×4, 16×4) holds whole
    blocks, so the checkpoint is the one-process layout and resharding moves codes and absmax without
    requantising: the loaded codes and scales are exactly the saved ones, in either direction."""
    single, sharded = runs["single"]["galore_adamw_8bit"], [r["galore_adamw_8bit"] for r in runs["sharded"]]
    two_to_one = runs["two_to_one"]["galore_adamw_8bit"]
    one_to_two = [r["galore_adamw_8bit"] for r in runs["one_to_two"]]
    _check_continues(single, two_to_one, relative_error, EIGHT_BIT_RTOL)
    _check_continues(single, one_to_two[0], relative_error, EIGHT_BIT_RTOL)
    for name in ("0.weight", "3.weight"):
        for moment in ("exp_avg", "exp_avg_sq"):
            codes, absmax = f"{moment}_q", f"{moment}_absmax"
            # 2 → 1: the concatenation of the two processes' codes and scales.
            for key in (codes, absmax):
                joined = torch.cat([rank["saved"][name][key] for rank in sharded])
                assert torch.equal(two_to_one["loaded"][name][key], joined), (name, key)
            # 1 → 2: each process its rows of the codes, its blocks of the scales.
            blocks = single["saved"][name][absmax].numel() // 2
            rows = single["saved"][name][codes].shape[0] // 2
            for rank, resumed in enumerate(one_to_two):
                assert torch.equal(resumed["loaded"][name][codes], single["saved"][name][codes][rank * rows :][:rows])
                assert torch.equal(
                    resumed["loaded"][name][absmax], single["saved"][name][absmax][rank * blocks :][:blocks]
                )


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["galore_adamw_8bit_straddling", "galore_adamw_8bit_straddling_full_state_dict"])
def test_8bit_checkpoint_with_blocks_across_shards_requantises_within_a_code(runs, case):
    """min_8bit_size=0: the 1-D states (64 = 32 + 32 elements, one 64-element block in one process) and the 9-row
    states (5 + 4 rows) have blocks that straddle the shards. The save requantises each process' values on the
    one-process blocks (block maxima all-reduced); a loader with straddling blocks dequantises its rows and
    requantises them into its own blocks. Each is one more rounding to the dynamic 8-bit map.

    Measured: loaded moments (dequantised) within 7.4e-3 (1 → 2) and 8.3e-3 (2 → 1) of the norm of the saved ones;
    the continued runs within 3.8e-3 (1 → 2, of one process' parameters) and 7.4e-3 (2 → 1, of the two-process
    run's, itself another quantisation than one process': 1.2e-2) of a tensor's largest entry.
    """
    from hf_galore.optim._quant8 import Blockwise8bitStore

    store = Blockwise8bitStore()
    single, two_to_one = runs["single"][case], runs["two_to_one"][case]
    sharded, one_to_two = [r[case] for r in runs["sharded"]], [r[case] for r in runs["one_to_two"]]
    for name, saved in single["saved"].items():
        for moment, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            whole = store.load(saved, moment, signed)
            parts = torch.cat([store.load(r["loaded"][name], moment, signed) for r in one_to_two])
            assert relative_error(parts, whole) <= 2e-2, (name, moment, relative_error(parts, whole))
            parts = torch.cat([store.load(r["saved"][name], moment, signed) for r in sharded])
            loaded = store.load(two_to_one["loaded"][name], moment, signed)
            assert relative_error(loaded, parts) <= 2e-2, (name, moment, relative_error(loaded, parts))
    for resumed, reference in ((one_to_two[0], single), (two_to_one, sharded[0])):
        assert sorted(resumed["losses"]) == [5, 6, 7]
        for name, value in reference["params"].items():
            assert _max_error(resumed["params"][name], value) <= 2e-2, (
                name,
                _max_error(resumed["params"][name], value),
            )


@pytest.mark.distributed
def test_a_broken_reshard_fails_the_comparison(runs):
    """Loading the first process' rows on every process (what ignoring the sharding would do) moves the continued run
    far outside the tolerance: the comparison above does detect a wrong reshard."""
    root = runs["root"]
    broken = _launch(root / "broken", 2, "--resume-from", str(runs["one"]), "--resume-at", SAVE_AT,
                     "--break-resharding", cases=("galore_adamw", "flora_adamw"))  # fmt: skip
    for case in ("galore_adamw", "flora_adamw"):
        single, rank0 = runs["single"][case], broken[0][case]
        worst = max(_max_error(rank0["params"][n], v) for n, v in single["params"].items())
        assert worst > 100 * FP32_RTOL, (case, worst)


# ---------------------------------------------------------------------------------------------- single process
def _wide_model_and_optimizer(proj_type: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A wide 32×64 weight: one process' `std` projects it on the left, FSDP2's (and `right`) on the right."""
    from hf_galore import GaLoreAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    groups = [{"params": [model[0].bias]}, {"params": [model[0].weight], "low_rank": True}]
    return model, GaLoreAdamW(groups, lr=1e-2, rank=4, update_proj_gap=3, proj_type=proj_type)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 64, generator=torch.Generator().manual_seed(2))).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP on one process
def test_a_right_side_state_refuses_to_load_where_std_means_left_naming_the_fix(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from hf_galore.errors import InvalidConfigError
    from hf_galore.optim import check_dcp_checkpoint

    # A right-side state, as FSDP2 writes it (here one process with proj_type="right").
    saver_model, saver = _wide_model_and_optimizer("right")
    _step(saver_model, saver)
    state = saver.state_dict()
    dcp.save({"optimizer": get_optimizer_state_dict(saver_model, saver)}, checkpoint_id=tmp_path)

    # torch.save / load_state_dict: refused by the per-weight side check, naming the fix.
    model, optimizer = _wide_model_and_optimizer("std")
    with pytest.raises(InvalidConfigError, match=r"saved projected on the right side.*proj_type='right'"):
        optimizer.load_state_dict(state)
    # DCP: dcp.load itself refuses the other shapes with a bare size mismatch; the check names the fix first.
    model, optimizer = _wide_model_and_optimizer("std")
    with pytest.raises(InvalidConfigError, match=r"'0.weight'.*proj_type='right'"):
        check_dcp_checkpoint(model, optimizer, tmp_path)
    with pytest.raises(CheckpointException, match=r"Size mismatch .* for optimizer\.state\.0\.weight"):
        template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(template, checkpoint_id=tmp_path)
    # With proj_type="right" both load, and the loaded state is the saved one.
    model, optimizer = _wide_model_and_optimizer("right")
    check_dcp_checkpoint(model, optimizer, tmp_path)
    template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(model, optimizer, template["optimizer"])
    for key, value in saver.state[saver_model[0].weight].items():
        loaded = optimizer.state[model[0].weight][key]
        assert torch.equal(loaded, value) if torch.is_tensor(value) else loaded == value, key
