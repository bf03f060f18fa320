"""Two gloo processes on CPU through the stock Trainer (torch.distributed.run) against one process.

Each run trains a tiny RoBERTa classifier with a sequential sampler, so the two processes' per-device batches
together are exactly the single process' batch; every run has refreshes at steps 0, 4 and 8.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "distributed" / "train_tiny.py"

pytestmark = pytest.mark.distributed

# The attention key bias has a mathematically zero gradient (softmax is invariant to it); Adam turns its fp32
# round-off into ±lr steps, so its value is noise in every optimizer, AdamW included. It is compared separately.
ZERO_GRADIENT = "attention.self.key.bias"


def _free_port() -> int:
    """A port that is free now (each launch gets its own, so back-to-back launches never collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(out: Path, processes: int, *args: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(_free_port()), str(SCRIPT)]  # fmt: skip
    result = subprocess.run([*command, "--out", str(out), *args], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]


def assert_same_training(reference: dict, other: dict, rtol: float = 1e-5) -> None:
    assert other["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    for name, value in reference["params"].items():
        if ZERO_GRADIENT in name:
            continue
        error = (other["params"][name] - value).norm() / value.norm().clamp_min(1e-12)
        assert error <= rtol, (name, float(error))
    assert other["optimizer_steps"] == reference["optimizer_steps"]
    assert other["refreshes"] == reference["refreshes"]


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_8bit", "galore_adafactor"])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, optim):
    optim_args = "rank=4, update_proj_gap=4, scale=1" + (", min_8bit_size=0" if "8bit" in optim else "")
    (single,) = _run(tmp_path / "single", 1, "--optim", optim, "--batch", "8", "--optim-args", optim_args)
    rank0, rank1 = _run(tmp_path / "ddp", 2, "--optim", optim, "--batch", "4", "--optim-args", optim_args)
    # 8-bit states round to a code book: a last-bit difference between a two-process all-reduce and a one-process
    # sum can land on the other side of a code, so the 8-bit comparison is looser (a rank using its local gradient
    # instead of the all-reduced one would be off by ~1e-1).
    assert_same_training(single, rank0, rtol=1e-3 if "8bit" in optim else 1e-5)
    # Replicas are identical bit for bit: parameters, bases and moments (every rank computes the basis from the
    # same all-reduced gradient with the same seeded range finder).
    assert rank0["checksums"] == rank1["checksums"]
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])
    assert set(rank0["refreshes"].values()) >= {3}


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    (large,) = _run(tmp_path / "large", 1, "--optim", "galore_adamw", "--batch", "8")
    (accumulated,) = _run(tmp_path / "ga", 1, "--optim", "galore_adamw", "--batch", "2", "--ga", "4")
    assert_same_training(large, accumulated)


def test_layerwise_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    (large,) = _run(tmp_path / "large", 1, "--optim", "galore_adamw", "--batch", "8")
    (accumulated,) = _run(tmp_path / "ga", 1, "--optim", "galore_adamw_layerwise", "--batch", "2", "--ga", "4")
    # Same trajectory; every weight stepped 10 times (not 40) and projected weights refreshed at steps 0, 4, 8.
    assert_same_training(large, accumulated)
    assert set(accumulated["optimizer_steps"].values()) == {10}


def test_layerwise_clipping_equals_the_trainer_clipping(tmp_path):
    (reference,) = _run(tmp_path / "ref", 1, "--optim", "galore_adamw", "--batch", "8", "--max-grad-norm", "0.05")
    (layerwise,) = _run(tmp_path / "lw", 1, "--optim", "galore_adamw_layerwise", "--batch", "8", "--max-grad-norm",
                        "0.05")  # fmt: skip
    assert max(reference["grad_norms"]) > 0.05  # clipping really happens
    assert layerwise["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5)
    assert_same_training(reference, layerwise)


def test_layerwise_two_processes_with_accumulation_equal_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", 1, "--optim", "galore_adamw", "--batch", "8")
    rank0, rank1 = _run(tmp_path / "ddp", 2, "--optim", "galore_adamw_layerwise", "--batch", "2", "--ga", "2")
    assert_same_training(single, rank0)
    assert rank0["checksums"] == rank1["checksums"]
    assert all(torch.equal(rank0["params"][n], rank1["params"][n]) for n in rank0["params"])


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise"])
def test_checkpoints_resume_on_another_number_of_processes(tmp_path, optim):
    common = ("--optim", optim, "--save-steps", "6")
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
        assert resumed["losses"][6:] == pytest.approx(reference["losses"][6:], rel=1e-5)
        for name, value in reference["params"].items():
            if ZERO_GRADIENT not in name:
                error = (resumed["params"][name] - value).norm() / value.norm()
                assert error <= 1e-5, (name, float(error))


def test_flora_compressed_accumulation_on_two_processes_equals_one_process(tmp_path):
    # The accumulation projection is seeded from (weight seed, step): every rank compresses with the same matrix, so
    # all-reducing the r×n accumulators equals compressing the one-process sum.
    common = ("--optim", "flora_adamw_layerwise", "--optim-args", "rank=4, kappa=3", "--ga", "2")
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "4")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", "2")
    assert_same_training(single, rank0)
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
    common = ("--optim", "welore_adamw", "--optim-args", "target_compression=0.5, min_reduction=0.5")
    (single,) = _run(tmp_path / "single", 1, *common, "--batch", "8")
    rank0, rank1 = _run(tmp_path / "ddp", 2, *common, "--batch", "4")
    assert_same_training(single, rank0)
    assert rank0["checksums"] == rank1["checksums"]
    assert any(name.endswith(".down.weight") for name in rank0["params"])  # the split really happened


def test_layerwise_ddp_with_weights_unused_on_some_ranks(tmp_path):
    # Collectives run in step() in a fixed order after a flags all-reduce, so a weight that only rank 0 uses does not
    # pair rank 1's collectives with the wrong tensor (or hang): both ranks equal the one-process mean-loss reference.
    script = Path(__file__).parent / "distributed" / "unused_weight.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in ranks:
        torch.testing.assert_close(out["a"], out["ra"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["b"], out["rb"], rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0]["a"], ranks[1]["a"]) and torch.equal(ranks[0]["b"], ranks[1]["b"])
