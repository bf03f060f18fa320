"""Two gloo processes on CPU through the stock Trainer (torch.distributed.run) against one process.

Each run trains a tiny RoBERTa classifier with a sequential sampler, so the two processes' per-device batches
together are exactly the single process' batch; every run has refreshes at steps 0, 4 and 8.

Tolerances: two runs that are mathematically equal differ by reduction-order round-off (an all-reduce sums in
another order than one process, an accumulated gradient in another order than a large batch), and Adam's
normalisation amplifies it on coordinates with tiny gradients: in fp32 a bias differed by 1.5e-5 of its norm, on
some CPUs just above a 1e-5 tolerance. So every optimizer that supports it runs in float64 (`--float64`), where the
same comparison measures ~5e-15, and is compared at `FLOAT64_RTOL` = 1e-9 of each tensor's norm: 5 orders above the
round-off on any CPU, and still 4 orders below what a real difference (one micro-batch dropped, a rank using its
local gradient) produces. Two comparisons keep an fp32 stage inside a float64 run and use `FP32_STAGE_RTOL` = 1e-5
(measured worst 5.6e-7 and 7.4e-7; a dropped micro-batch is ~1e-1): FLoRA, whose optimizer arithmetic is fp32 by
design, and layer-wise clipping, whose bases come (in fp32, as always) from the unclipped gradient while the
reference's come from the clipped one. The 8-bit optimizers keep fp32 and their looser, explained tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import relative_error
from script_utils import launch

SCRIPT = Path(__file__).parent / "distributed" / "train_tiny.py"

pytestmark = pytest.mark.distributed

# The attention key bias has a mathematically zero gradient (softmax is invariant to it); Adam turns its fp32
# round-off into ±lr steps, so its value is noise in every optimizer, AdamW included. It is compared separately.
ZERO_GRADIENT = "attention.self.key.bias"

#: Train in float64; see the module docstring for why and for `FLOAT64_RTOL`.
FLOAT64 = ("--float64",)
FLOAT64_RTOL = 1e-9
FP32_STAGE_RTOL = 1e-5
LOSS_RTOL = 1e-5


def _run(out: Path, processes: int, *args: str) -> list[dict]:
    return launch(SCRIPT, out, processes, *args)


def assert_same_training(reference: dict, other: dict, rtol: float = FLOAT64_RTOL) -> None:
    """Same losses, parameters (each on its own norm), optimizer step counts and refresh counts."""
    # The Trainer sums the logged loss in an fp32 tensor whatever the model's dtype (round-off measured ≤ 1e-7).
    assert other["losses"] == pytest.approx(reference["losses"], rel=LOSS_RTOL)
    for name, value in reference["params"].items():
        if ZERO_GRADIENT in name:
            continue
        error = relative_error(other["params"][name], value)
        assert error <= rtol, (name, error)
    assert other["optimizer_steps"] == reference["optimizer_steps"]
    assert other["refreshes"] == reference["refreshes"]


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_8bit", "galore_adafactor"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, optim):
    eight_bit = "8bit" in optim
    optim_args = "rank=4, update_proj_gap=4, scale=1" + (", min_8bit_size=0" if eight_bit else "")
    common = ("--optim", optim, "--optim-args", optim_args, *(() if eight_bit else FLOAT64))
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "8")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", "4")
    # 8-bit states round to a code book (fp32 only): a last-bit difference between a two-process all-reduce and a
    # one-process sum can land on the other side of a code, so the 8-bit comparison is looser (a rank using its local
    # gradient instead of the all-reduced one would be off by ~1e-1).
    assert_same_training(single, rank0, rtol=1e-3 if eight_bit else FLOAT64_RTOL)
    # Replicas are identical bit for bit: parameters, bases and moments (every rank computes the basis from the
    # same all-reduced gradient with the same seeded range finder).
    assert rank0["checksums"] == rank1["checksums"]
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])
    assert set(rank0["refreshes"].values()) >= {3}


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    (large,) = _run(tmp_path / "large", 1, "--optim", "galore_adamw", "--batch", "8", *FLOAT64)
    (accumulated,) = _run(tmp_path / "ga", 1, "--optim", "galore_adamw", "--batch", "2", "--ga", "4", *FLOAT64)
    assert_same_training(large, accumulated)


def test_layerwise_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    (large,) = _run(tmp_path / "large", 1, "--optim", "galore_adamw", "--batch", "8", *FLOAT64)
    (accumulated,) = _run(tmp_path / "ga", 1, "--optim", "galore_adamw_layerwise", "--batch", "2", "--ga", "4",
                          *FLOAT64)  # fmt: skip
    # Same trajectory; every weight stepped 10 times (not 40) and projected weights refreshed at steps 0, 4, 8.
    assert_same_training(large, accumulated)
    assert set(accumulated["optimizer_steps"].values()) == {10}


def test_layerwise_clipping_equals_the_trainer_clipping(tmp_path):
    common = ("--batch", "8", "--max-grad-norm", "0.05", *FLOAT64)
    (reference,) = _run(tmp_path / "ref", 1, "--optim", "galore_adamw", *common)
    (layerwise,) = _run(tmp_path / "lw", 1, "--optim", "galore_adamw_layerwise", *common)
    assert max(reference["grad_norms"]) > 0.05  # clipping really happens
    assert layerwise["grad_norms"] == pytest.approx(reference["grad_norms"], rel=FP32_STAGE_RTOL)
    assert_same_training(reference, layerwise, rtol=FP32_STAGE_RTOL)


def test_layerwise_two_processes_with_accumulation_equal_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1, "--optim", "galore_adamw", "--batch", "8", *FLOAT64)
    rank0, rank1 = _run(tmp_path / "ddp", 2, "--optim", "galore_adamw_layerwise", "--batch", "2", "--ga", "2",
                        *FLOAT64)  # fmt: skip
    assert_same_training(single, rank0)
    assert rank0["checksums"] == rank1["checksums"]
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise"])
def test_checkpoints_resume_on_another_number_of_processes(tmp_path, optim):
    common = ("--optim", optim, "--save-steps", "6", *FLOAT64)
    (reference,) = _run(tmp_path / "one", 1, *common, "--batch", "8")
    _run(tmp_path / "two", 2, *common, "--batch", "4")
    # two processes -> one process
    (resumed_on_one,) = _run(tmp_path / "two_to_one", 1, *common, "--batch", "8", "--resume",
                             str(tmp_path / "two" / "checkpoint-6"))  # fmt: skip
    # one process -> two processes
    resumed_on_two, _ = _run(tmp_path / "one_to_two", 2, *common, "--batch", "4", "--resume",
                             str(tmp_path / "one" / "checkpoint-6"))  # fmt: skip
    for resumed in (resumed_on_one, resumed_on_two):
        # The resumed log history starts with the checkpoint's six entries.
        assert resumed["losses"][6:] == pytest.approx(reference["losses"][6:], rel=LOSS_RTOL)
        for name, value in reference["params"].items():
            if ZERO_GRADIENT not in name:
                error = relative_error(resumed["params"][name], value)
                assert error <= FLOAT64_RTOL, (name, error)


def test_flora_compressed_accumulation_on_two_processes_equals_one_process(tmp_path):
    # The accumulation projection is seeded from (weight seed, step): every rank compresses with the same matrix, so
    # all-reducing the r×n accumulators equals compressing the one-process sum.
    common = ("--optim", "flora_adamw_layerwise", "--optim-args", "rank=4, kappa=3", "--ga", "2", *FLOAT64)
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "4")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", "2")
    assert_same_training(single, rank0, rtol=FP32_STAGE_RTOL)  # FLoRA computes in fp32 (module docstring)
    assert rank0["checksums"] == rank1["checksums"]


@pytest.mark.parametrize("optim", ["q_galore_adamw_8bit", "q_galore_adamw_8bit_layerwise"])
def test_q_galore_gradient_accumulation_equals_the_large_batch(tmp_path, optim):
    optim_args = ("--optim-args", "rank=4, update_proj_gap=4, scale=1, min_8bit_size=0")
    (large,) = _run(tmp_path / "large", 1, "--optim", optim, "--batch", "8", *optim_args)
    (accumulated,) = _run(tmp_path / "ga", 1, "--optim", optim, "--batch", "2", "--ga", "4", *optim_args)
    # 8-bit states and stochastically rounded INT8 weights: a last-bit difference can cross a code (see above). The
    # worst relative error is on zero-initialised biases, measured against only ten steps of updates (3.3e-3 with
    # the exact-width sketch that oversample=32 gives this 32-wide model); the losses still agree to 1e-5.
    assert_same_training(large, accumulated, rtol=5e-3)
    assert set(accumulated["optimizer_steps"].values()) == {10}


def test_welore_two_processes_equal_one_process(tmp_path):
    # Every rank splits the same pretrained weights at Trainer init (deterministic SVD), so the factor shapes agree
    # and DDP's broadcast at wrap time starts every rank from rank 0's factors.
    common = ("--optim", "welore_adamw", "--optim-args", "target_compression=0.5, min_reduction=0.5", *FLOAT64)
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "8")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", "4")
    assert_same_training(single, rank0)
    assert rank0["checksums"] == rank1["checksums"]
    assert any(name.endswith(".down.weight") for name in rank0["params"])  # the split really happened


@pytest.mark.parametrize("reduction", ["layerwise", "backward_all_reduce"])
def test_ddp_without_the_reducer_with_weights_unused_on_some_ranks(tmp_path, reduction):
    # Collectives run in a fixed order after a flags all-reduce (layer-wise: in step(); BackwardAllReduce, which
    # q_galore_adamw_8bit uses for its carriers: at the end of backward), so a weight that only rank 0 uses does not
    # pair rank 1's collectives with the wrong tensor (or hang): both ranks equal the one-process mean-loss reference.
    args = ("--backward-all-reduce",) if reduction == "backward_all_reduce" else ()
    ranks = launch(Path(__file__).parent / "distributed" / "unused_weight.py", tmp_path, 2, *args)
    for out in ranks:  # the script runs in float64 (see the module docstring)
        assert relative_error(out["a"], out["ra"]) <= FLOAT64_RTOL
        assert relative_error(out["b"], out["rb"]) <= FLOAT64_RTOL
    assert torch.equal(ranks[0]["a"], ranks[1]["a"]) and torch.equal(ranks[0]["b"], ranks[1]["b"])


#: Q-GaLore under DDP (measured on 10 steps, 3 refreshes): the dequantized INT8 weights of 2 processes × batch 4
#: differ from 1 process × batch 8 by at most 4.3e-3 of each weight's norm (about one code of its group's scale at
#: the worst element: stochastic rounding uses the same seeded draws, and an fp32 last-bit difference between the
#: all-reduce and the one-process sum can still cross a code), the float parameters by 1.2e-3, the losses by 1.5e-6.
#: Summing the ranks' gradients instead of averaging them measured 2.3e-2, 1.8e-2 and 1.6e-5: the tolerances below
#: are 2-4× the correct run's error and fail the summed one.
Q_GALORE_INT8_RTOL = 1e-2
Q_GALORE_PARAM_RTOL = 5e-3


def _int8_weight_errors(reference: dict, other: dict) -> dict[str, float]:
    return {name: relative_error(other["int8_weights"][name], w) for name, w in reference["int8_weights"].items()}


@pytest.mark.parametrize(("batch", "ga"), [(4, 1), (2, 2)])
def test_q_galore_layerwise_two_processes_equal_one_process(tmp_path, batch, ga):
    # The carriers leave DDP's reducer; the optimizer all-reduces their (projected, or full on refresh steps)
    # gradients itself, and every rank requantizes with the generator seeded from (sr_seed, step, weight index).
    optim_args = ("--optim-args", "rank=4, update_proj_gap=4, scale=1, min_8bit_size=0")
    (single,) = _run(tmp_path / "single", 1, "--optim", "q_galore_adamw_8bit", "--batch", "8", *optim_args)
    rank0, rank1 = _run(tmp_path / "ddp", 2, "--optim", "q_galore_adamw_8bit_layerwise", "--batch", str(batch),
                        "--ga", str(ga), *optim_args)  # fmt: skip
    assert single["int8_weights"] and set(single["refreshes"].values()) >= {3}
    # With accumulation the micro-batches add up in another order again (measured 1.2e-2 and 5.3e-3); the strict
    # tolerances (which catch a summed reduction) are the no-accumulation case's.
    loose = 1 if ga == 1 else 3
    errors = _int8_weight_errors(single, rank0)
    assert max(errors.values()) <= loose * Q_GALORE_INT8_RTOL, errors
    assert_same_training(single, rank0, rtol=loose * Q_GALORE_PARAM_RTOL)
    # The replicas' INT8 codes, scales and zeros are identical bit for bit (the last step's requantization is not
    # followed by any broadcast, so this is the seeded rounding's doing), and so is every optimizer state tensor.
    assert rank0["buffers"].keys() == rank1["buffers"].keys()
    assert all(torch.equal(rank0["buffers"][n], rank1["buffers"][n]) for n in rank0["buffers"])
    assert rank0["checksums"] == rank1["checksums"]
    assert any(key.endswith("/weight_q") for key in rank0["checksums"])


#: Plain `q_galore_adamw_8bit` under DDP, clipping active (`max_grad_norm=0.3` clips 9 of the 10 steps), measured on
#: 10 steps with 3 refreshes against 1 process × batch 8: the dequantized INT8 weights differ by at most 4.9e-7 of
#: each weight's norm (7.7e-7 with 2 accumulation steps), the float parameters by 2.8e-7 (7.3e-7), the logged
#: grad_norm by 1.1e-7 and the losses by 1.7e-7. Every process averages the same full gradients as one process
#: sums, so no INT8 code crosses (unlike the layer-wise form, whose projected reduction rounds differently).
#: Broken on purpose, the same comparison measured (INT8 weights, float parameters, grad_norm): local gradients
#: (no all-reduce) 2.0e-1, 2.7e-1, 2.4e-2; summed instead of averaged 2.3e-2, 1.6e-2, 7.5e-4; averaged in
#: `step()`, after the Trainer clipped each process' local gradient with its local norm, 1.2e-2, 3.3e-3, 1.0e-3.
#: The tolerances leave 1000× room for round-off and still fail every one of those.
Q_GALORE_DDP_RTOL = 1e-3
GRAD_NORM_RTOL = 1e-4


@pytest.mark.parametrize(("batch", "ga"), [(4, 1), (2, 2)])
def test_q_galore_two_processes_equal_one_process(tmp_path, batch, ga):
    # The carriers and INT8 buffers stay out of DDP; the optimizer averages the carriers' full gradients at the end of
    # the last micro-batch's backward, before the Trainer clips: its clipping and logged grad_norm see the global
    # gradient, as one process' do.
    common = ("--optim", "q_galore_adamw_8bit", "--max-grad-norm", "0.3", "--optim-args",
              "rank=4, update_proj_gap=4, scale=1, min_8bit_size=0")  # fmt: skip
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "8")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", str(batch), "--ga", str(ga))
    assert single["int8_weights"] and set(single["refreshes"].values()) >= {3}
    assert sum(norm > 0.3 for norm in single["grad_norms"]) >= 5  # clipping really happens
    assert rank0["grad_norms"] == pytest.approx(single["grad_norms"], rel=GRAD_NORM_RTOL)
    errors = _int8_weight_errors(single, rank0)
    assert max(errors.values()) <= Q_GALORE_DDP_RTOL, errors
    assert_same_training(single, rank0, rtol=Q_GALORE_DDP_RTOL)
    assert set(rank0["optimizer_steps"].values()) == {10}
    # Replicas: INT8 codes, scales and zeros identical bit for bit although DDP never broadcasts them after the wrap
    # (same averaged gradient, same seeded rounding), and so is every optimizer state tensor and parameter.
    int8_buffers = {
        n for n in rank0["buffers"] if n.rpartition(".")[2] in ("qweight", "weight_scales", "weight_zeros")
    }
    assert int8_buffers and int8_buffers <= set(rank0["ddp_ignored"])
    assert all(torch.equal(rank0["buffers"][n], rank1["buffers"][n]) for n in rank0["buffers"])
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])
    assert rank0["checksums"] == rank1["checksums"]


def test_q_galore_checkpoint_of_one_process_resumes_on_two(tmp_path):
    # Every rank loads the same INT8 weights (through the optimizer state) and the same moments, then averages the
    # same gradients: the resumed two-process run equals the uninterrupted one-process run (measured 3.9e-7).
    common = ("--optim", "q_galore_adamw_8bit", "--max-grad-norm", "0.3", "--save-steps", "6", "--optim-args",
              "rank=4, update_proj_gap=4, scale=1, min_8bit_size=0")  # fmt: skip
    (reference,) = _run(tmp_path / "one", 1, *common, "--batch", "8")
    rank0, rank1 = _run(tmp_path / "resumed", 2, *common, "--batch", "4", "--resume",
                        str(tmp_path / "one" / "checkpoint-6"))  # fmt: skip
    assert rank0["losses"][6:] == pytest.approx(reference["losses"][6:], rel=LOSS_RTOL)
    errors = _int8_weight_errors(reference, rank0)
    assert max(errors.values()) <= Q_GALORE_DDP_RTOL, errors
    for name, value in reference["params"].items():
        if ZERO_GRADIENT not in name:
            assert relative_error(rank0["params"][name], value) <= Q_GALORE_DDP_RTOL, name
    assert all(torch.equal(rank0["buffers"][n], rank1["buffers"][n]) for n in rank0["buffers"])
