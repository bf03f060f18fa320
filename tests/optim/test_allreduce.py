"""`BackwardAllReduce`: when its reduction runs (once, at the end of a synchronising backward pass) and its hooks'
lifetime, on a one-process gloo group. The averaging across processes itself is tested on two processes through
the Trainer (`tests/integrations/test_distributed.py::test_q_galore_two_processes_equal_one_process`)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist

from hf_galore.optim.allreduce import BackwardAllReduce


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class RecordingReduction(BackwardAllReduce):
    """Records, at each reduction, which parameters hold a gradient and their values."""

    def __init__(self, *args, **kwargs) -> None:
        self.seen: list[list[torch.Tensor | None]] = []
        super().__init__(*args, **kwargs)

    def reduce(self) -> None:
        self.seen.append([None if p.grad is None else p.grad.clone() for p in self.params])
        super().reduce()


def _loss(a: torch.Tensor, b: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    return (a * 2).sum() + (b * a).sum()


def test_reduces_once_per_synchronising_backward_after_every_gradient(one_process_group):
    a, b, unused = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    sync = {"value": False}
    reduction = RecordingReduction([a, b, unused], lambda: sync["value"])
    _loss(a, b, unused).backward()  # a micro-step that only accumulates
    assert reduction.seen == []
    sync["value"] = True
    _loss(a, b, unused).backward()
    # One reduction, when both used gradients were complete (a's accumulates two terms), of the accumulated sum; an
    # unused parameter stays without a gradient (no process has one).
    assert len(reduction.seen) == 1
    first_a, first_b, first_unused = reduction.seen[0]
    assert torch.equal(first_a, torch.full((3,), 6.0)) and torch.equal(first_b, torch.full((3,), 2.0))
    assert first_unused is None and unused.grad is None
    assert torch.equal(a.grad, torch.full((3,), 6.0))  # the mean over one process


def test_hooks_come_off_and_go_with_the_object(one_process_group):
    a = torch.nn.Parameter(torch.ones(2))
    reduction = RecordingReduction([a])
    reduction.remove_hooks()
    assert not reduction.hooks_installed
    a.sum().backward()
    assert reduction.seen == []
    reduction.install_hooks()
    a.sum().backward()
    assert len(reduction.seen) == 1
    del reduction
    gc.collect()
    assert not a._post_accumulate_grad_hooks  # the finalizer took the hook off


def test_a_failed_backward_does_not_stop_later_reductions(one_process_group):
    a = torch.nn.Parameter(torch.ones(2))
    reduction = RecordingReduction([a])
    failing = {"value": True}

    def fail_once(p: torch.Tensor) -> None:  # runs after the reduction's hook: its callback is queued, then dropped
        if failing.pop("value", False):
            raise RuntimeError("simulated out-of-memory")

    a.register_post_accumulate_grad_hook(fail_once)
    with pytest.raises(RuntimeError, match="simulated"):
        a.sum().backward()
    assert reduction.seen == []
    a.grad = None
    a.sum().backward()
    assert len(reduction.seen) == 1
