"""Global gradient clipping and FSDP2's bf16 `MixedPrecisionPolicy` with GaLoreAdamW / FloraAdamW on `fully_shard` row
shards (gloo, CPU), against one unsharded process (issue #15, items 1 and 6).

The launched script (distributed/fsdp2_features.py) trains fsdp2_galore.py's MLP for 8 steps: two processes × batch 4
under `fully_shard` (`proj_type="std"`, which means the right side under sharding) against one process × batch 8
with `proj_type="right"`. `clip_grad_norm_(model.parameters(), 0.2)` runs before every step; the gradient norms are
0.36-1.09, so every step is clipped (asserted).

Clipping (fp32): on DTensor gradients `clip_grad_norm_` reduces the norm over all processes' rows. Measured: total
norms within 1.1e-7 relative of one process' at every step, parameters within 5.0e-7 of each tensor's largest entry
(GaLore; FLoRA 2.9e-7), losses 1.9e-7 relative. Clipping each process' rows by their own norm instead (the script's
`--local-clip`, the mistake a sharded clip could make; run by hand, not a test) gives norms 30 % off and parameters
1.4e-2 off (relative to each tensor's norm), far outside these tolerances.

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
from script_utils import launch, run_script
from trainer_utils import training_args

from hf_galore.errors import UnsupportedSetupError
from hf_galore.registry import row_sharding_names

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


# ----------------------------------------------------------------------------------- the Trainer under FSDP2
TRAINER_SCRIPT = Path(__file__).parent / "distributed" / "fsdp2_trainer.py"

#: optim_args of the Trainer runs; the one-process reference adds proj_type="right" where the method projects.
TRAINER_OPTIM_ARGS = {"galore_adamw": "rank=4, update_proj_gap=3, scale=1", "flora_adamw": "rank=4, kappa=3",
                      "welore_adamw": "target_compression=0.5, min_reduction=0.5"}  # fmt: skip


#: The FSDP2 Trainer runs save checkpoints at this step (and at the last, 8); the resume test continues from it. GaLore
#: refreshes at steps 0, 3 and 6 and FLoRA resamples at 3 and 6, so one of each lies on either side of the save.
SAVE_STEPS = "4"
TRAINER_ROUTES = [("galore_adamw", "args"), ("flora_adamw", "env"), ("welore_adamw", "args")]


@pytest.fixture(scope="module")
def saving_fsdp2_runs(tmp_path_factory):
    """`run(optim, route) -> (folder, [rank0, rank1])`: the 2-process FSDP2 Trainer run saving SHARDED_STATE_DICT
    checkpoints every `SAVE_STEPS` steps, launched once per module (the equivalence test and the resume test share
    it)."""
    runs = {}

    def run(optim: str, route: str) -> tuple[Path, list[dict]]:
        if (optim, route) not in runs:
            out = tmp_path_factory.mktemp(f"fsdp2_{optim}_{route}")
            results = launch(TRAINER_SCRIPT, out, 2, "--optim", optim, "--optim-args", TRAINER_OPTIM_ARGS[optim],
                             "--fsdp", route, "--save-steps", SAVE_STEPS)  # fmt: skip
            runs[optim, route] = out, results
        return runs[optim, route]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize(("optim", "route"), TRAINER_ROUTES)
def test_trainer_with_accelerate_fsdp2_equals_one_process(tmp_path, saving_fsdp2_runs, optim, route):
    """The stock Trainer under accelerate's FSDP2 (`TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})` or
    the accelerate launch config's environment) on 2 gloo CPU processes × batch 4 against 1 process × batch 8, 8 steps,
    `max_grad_norm=0.5`: accelerate clips every step of GaLore and FLoRA (logged norms 0.81-1.14) and none of WeLore
    (0.06-0.10). The script's one test-only patch keeps accelerate's FSDP plugin on CPU (see fsdp2_trainer.py).

    Measured: losses within 2.2e-7 relative, logged gradient norms within 1.5e-7, parameters within 2.6e-6 of a
    tensor's largest entry (GaLore's lm_head; FLoRA 4.5e-7, WeLore 1.5e-6). Without the optimizer following the
    swapped-in DTensor parameters (hf_galore/optim/base.py `_follow_replaced_params`) the first step fails (KeyError
    on the new parameter).
    """
    optim_args = TRAINER_OPTIM_ARGS[optim]
    reference_args = optim_args if optim.startswith("welore") else optim_args + ", proj_type=right"
    out = tmp_path / "single"
    out.mkdir()
    (single,) = launch(TRAINER_SCRIPT, out, 1, "--optim", optim, "--optim-args", reference_args)
    _, (rank0, rank1) = saving_fsdp2_runs(optim, route)  # saving checkpoints along the way changes nothing
    # The FSDP2 path really ran: accelerate sharded the model (FSDPModule wrappers: 2 decoder layers + the root...),
    # swapped DTensor parameters into our optimizer, clipped through accelerate at every step, and stayed FSDP2.
    assert rank0["fsdp2"] and not single["fsdp2"]
    assert rank0["fsdp_modules"] >= 3 and single["fsdp_modules"] == 0
    assert rank0["dtensor_params"] == rank0["params_in_optimizer"] == single["params_in_optimizer"] > 0
    assert rank0["fsdp2_clips"] == 8
    assert rank0["optimizer"] == single["optimizer"] and rank0["steps"] == single["steps"] == [8]
    # The groups (by parameter name) are the one-process groups, and our grouping rerun on the sharded model agrees.
    assert rank0["groups"] == single["groups"] == rank0["regrouped"]
    assert _relative(rank0["losses"], single["losses"]) <= LOSS_RTOL
    assert _relative(rank0["grad_norms"], single["grad_norms"]) <= LOSS_RTOL
    for name, value in single["params"].items():
        assert _max_error(rank0["params"][name], value) <= FP32_RTOL, (name, _max_error(rank0["params"][name], value))
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name


@pytest.mark.distributed
@pytest.mark.parametrize(("optim", "route"), TRAINER_ROUTES)
def test_trainer_fsdp2_checkpoint_resumes_as_the_uninterrupted_run(tmp_path, saving_fsdp2_runs, optim, route):
    """`trainer.train(resume_from_checkpoint=...)` from the FSDP2 Trainer checkpoint of step 4 (model and optimizer
    state in accelerate's DCP folders `pytorch_model_fsdp_0`/`optimizer_0`) on 2 processes continues exactly as the
    uninterrupted run: GaLore refreshes its bases at step 6 and FLoRA resamples there, after the resume, from the saved
    seeds and counters (and each did at step 3, before the save).

    Measured: losses and parameters bit-identical to the uninterrupted run (also GaLore with FULL_STATE_DICT's gathered
    `pytorch_model_fsdp.bin`/`optimizer.bin`, the script's `--state-dict-type`, run by hand). GaLore also resumes on one process (`torchrun --nproc_per_node 1`, FSDP2 over a process group of one:
    DCP reshards the 2-process checkpoint): losses within 1.1e-7 relative, parameters within 1.3e-7 of a tensor's
    largest entry. Resuming with another rank fails before anything is loaded, naming the saved and current shapes
    (our check of the DCP metadata, called from the Trainer's optimizer loading); without it DCP's bare size mismatch
    of one tensor.
    """
    folder, (uninterrupted, _) = saving_fsdp2_runs(optim, route)
    checkpoint = str(folder / f"checkpoint-{SAVE_STEPS}")
    optim_args = TRAINER_OPTIM_ARGS[optim]
    common = ("--optim", optim, "--optim-args", optim_args, "--fsdp", route, "--resume", checkpoint)
    out = tmp_path / "resumed"
    out.mkdir()
    rank0, rank1 = launch(TRAINER_SCRIPT, out, 2, *common)
    # The optimizer state was loaded (a fresh optimizer would count 4 steps) and the run went on from step 4.
    assert rank0["steps"] == uninterrupted["steps"] == [8] and rank0["fsdp2"]
    assert len(rank0["losses"]) == len(uninterrupted["losses"]) == 8
    assert _relative(rank0["losses"], uninterrupted["losses"]) <= LOSS_RTOL
    for name, value in uninterrupted["params"].items():
        assert _max_error(rank0["params"][name], value) <= FP32_RTOL, (name, _max_error(rank0["params"][name], value))
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    if optim != "galore_adamw":
        return
    # 2 → 1: one process resumes the 2-process checkpoint under FSDP2 (a process group of one, batch 8).
    out = tmp_path / "one"
    out.mkdir()
    (one,) = launch(TRAINER_SCRIPT, out, 1, *common, torchrun=True)
    assert one["steps"] == [8] and one["fsdp2"]
    assert _relative(one["losses"], uninterrupted["losses"]) <= LOSS_RTOL
    for name, value in uninterrupted["params"].items():
        assert _max_error(one["params"][name], value) <= FP32_RTOL, (name, _max_error(one["params"][name], value))
    # Another rank shapes the state differently: refused before loading, naming the shapes and the settings.
    out = tmp_path / "other_rank"
    out.mkdir()
    other = [a if a != optim_args else optim_args.replace("rank=4", "rank=2") for a in common]
    result = run_script(TRAINER_SCRIPT, out, 1, *other, torchrun=True)
    assert result.returncode != 0
    assert "does not fit this optimizer" in result.stderr and "saved with shape (32, 4)" in result.stderr
    assert "settings that shape the state (rank" in result.stderr


# ---------------------------------------------------------------------------------------------- single process
def _fsdp_args(tmp_path, name: str, version: int | None = 2, **overrides):
    fsdp = {} if version is None else {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": version}}
    values = {"save_strategy": "no", **fsdp, **overrides}
    if name.endswith("layerwise"):
        values.setdefault("max_grad_norm", 0.0)
    if name.startswith("flora"):
        values.setdefault("optim_args", "rank=4")
    return training_args(tmp_path, name, **values)


def test_trainer_accepts_fsdp2_for_row_sharding_optimizers_and_refuses_the_rest(tmp_path, monkeypatch):
    from hf_galore.integrations import transformers as integration

    names = row_sharding_names()
    assert {"galore_adamw", "galore_adamw_8bit", "welore_adamw", "welore_adamw_8bit", "flora_adamw"} <= set(names)
    assert not [n for n in names if n.endswith("layerwise") or n.startswith("q_galore")]
    for name in ("galore_adamw", "flora_adamw"):
        integration.check_supported_setup(_fsdp_args(tmp_path, name), name)
    # Checkpoints, model-only or with the optimizer state (saved as Shard(0) DTensors, see the resume test below).
    sharded = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}}
    for only_model in (True, False):
        for name in ("galore_adamw", "galore_adamw_8bit", "flora_adamw", "welore_adamw"):
            saving = _fsdp_args(tmp_path, name, save_strategy="steps", save_only_model=only_model, **sharded)
            integration.check_supported_setup(saving, name)
    # FULL_STATE_DICT (accelerate's default) saves GaLore's checkpoints, not WeLore's factorized model (its quantizer's
    # state dict replaces the gathered one in save_pretrained): refused before training, unless nothing is saved.
    integration.check_supported_setup(_fsdp_args(tmp_path, "galore_adamw", save_strategy="steps"), "galore_adamw")
    integration.check_supported_setup(_fsdp_args(tmp_path, "welore_adamw"), "welore_adamw")
    with pytest.raises(UnsupportedSetupError, match=r"'welore_adamw'.*FULL_STATE_DICT.*'SHARDED_STATE_DICT'"):
        integration.check_supported_setup(_fsdp_args(tmp_path, "welore_adamw", save_strategy="steps"), "welore_adamw")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    welore = _fsdp_args(tmp_path, "welore_adamw", version=None, save_strategy="steps")
    with pytest.raises(UnsupportedSetupError, match="FULL_STATE_DICT"):
        integration.check_supported_setup(welore, "welore_adamw")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    integration.check_supported_setup(welore, "welore_adamw")
    for variable in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_STATE_DICT_TYPE"):
        monkeypatch.delenv(variable)
    # FSDP1 points to FSDP2.
    with pytest.raises(UnsupportedSetupError, match=r"FSDP1.*fsdp_version': 2"):
        integration.check_supported_setup(_fsdp_args(tmp_path, "galore_adamw", version=1), "galore_adamw")
    # Layer-wise names, FLoRA's compressed accumulation and optimizers without row sharding name the alternatives.
    with pytest.raises(UnsupportedSetupError, match=r"backward hooks.*optim='galore_adamw' runs under FSDP2"):
        integration.check_supported_setup(_fsdp_args(tmp_path, "galore_adamw_layerwise"), "galore_adamw_layerwise")
    flora = _fsdp_args(tmp_path, "flora_adamw", gradient_accumulation_steps=2)
    with pytest.raises(UnsupportedSetupError, match="accumulation=full"):
        integration.check_supported_setup(flora, "flora_adamw")
    flora = _fsdp_args(tmp_path, "flora_adamw", gradient_accumulation_steps=2, optim_args="rank=4, accumulation=full")
    integration.check_supported_setup(flora, "flora_adamw")
    with pytest.raises(UnsupportedSetupError, match=r"Q-GaLore keeps each target weight as INT8.*Use DDP"):
        integration.check_supported_setup(_fsdp_args(tmp_path, "q_galore_adamw_8bit"), "q_galore_adamw_8bit")
    # accelerate's launch config: FSDP_VERSION=2 is accepted, its default (1) is FSDP1.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        integration.check_supported_setup(_fsdp_args(tmp_path, "galore_adamw", version=None), "galore_adamw")
    monkeypatch.setenv("FSDP_VERSION", "2")
    integration.check_supported_setup(_fsdp_args(tmp_path, "galore_adamw", version=None), "galore_adamw")


def test_optimizer_follows_parameters_replaced_after_construction():
    """accelerate's FSDP2 preparation builds nothing new: it puts other tensors (the DTensor shards) into the
    optimizer's `param_groups` after construction. The optimizer must step the new tensors with the seeds of the ones
    they replace, and must not keep the replaced (unsharded) tensors alive."""
    import gc
    import weakref

    from hf_galore import GaLoreAdamW

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(3)]
    grads = [[torch.randn(16, 8) for _ in weights] for _ in range(4)]
    group = {"low_rank": True, "rank": 2, "update_proj_gap": 2}
    replaced = GaLoreAdamW([{"params": weights, **group}], lr=1e-2)
    new = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    direct_params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    direct = GaLoreAdamW([{"params": direct_params, **group}], lr=1e-2)
    replaced.param_groups[0]["params"] = new
    old = weakref.ref(weights[0])
    del weights
    gc.collect()
    assert old() is None  # the optimizer held no reference to the replaced tensors
    for step_grads in grads:
        for params, optimizer in ((new, replaced), (direct_params, direct)):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(new, direct_params):
        assert torch.equal(a, b)
    assert [replaced.state[p]["seed"] for p in new] == [direct.state[p]["seed"] for p in direct_params]
