"""CUDA checks: the same algorithms on the GPU as on the CPU reference, and the Trainer end to end in bf16.

Marked `gpu`: excluded from the default suite and from CI; run with `python -m pytest -m gpu` on a CUDA machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when CUDA first initialises

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from trainer_utils import lm_dataset, make_trainer, training_args

from hf_galore.methods.galore import GaLoreAdamW
from hf_galore.optim._reference import ReferenceGaLoreAdamW
from hf_galore.projection.random import gaussian_projection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _pair(shape, device):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    return nn.Parameter(w.clone().to(device)), nn.Parameter(w.clone())


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_galore_adamw_on_cuda_follows_the_cpu_reference(shape):
    kwargs = dict(lr=1e-2, weight_decay=0.01, eps=1e-8, rank=4, update_proj_gap=3, scale=0.5)
    ours_w, ref_w = _pair(shape, "cuda")
    ours = GaLoreAdamW([{"params": [ours_w], "low_rank": True}], svd="exact", **kwargs)
    reference = ReferenceGaLoreAdamW([ref_w], proj_type="std", **kwargs)
    for _ in range(8):
        grad = torch.randn(*shape)
        ours_w.grad, ref_w.grad = grad.to("cuda"), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(ours_w.detach().cpu(), ref_w.detach(), rtol=1e-4, atol=1e-5)


def test_randomized_refresh_is_the_same_on_cuda_and_cpu_up_to_rounding():
    shape = (256, 512)
    cuda_w, cpu_w = _pair(shape, "cuda")
    optimizers = [
        GaLoreAdamW([{"params": [w], "low_rank": True}], lr=1e-3, rank=16, update_proj_gap=50) for w in (cuda_w, cpu_w)
    ]
    grad = torch.randn(*shape)
    cuda_w.grad, cpu_w.grad = grad.to("cuda"), grad.clone()
    for optimizer in optimizers:
        optimizer.step()
    torch.testing.assert_close(cuda_w.detach().cpu(), cpu_w.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit", "q_galore_adamw_8bit", "flora_adamw"])
def test_batched_step_on_cuda_follows_the_per_parameter_loop(name):
    """CUDA's multi-tensor kernels may round differently from the per-tensor ones: the batched path must stay within
    rounding of the loop (on CPU the two are bitwise equal, `tests/optim/test_foreach.py`)."""
    from transformers import LlamaForCausalLM

    from hf_galore.builder import make_optimizer_kwargs

    models, optimizers = [], []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).cuda()
        gap = "kappa=3" if name.startswith("flora") else "update_proj_gap=3"
        cls, kwargs = make_optimizer_kwargs(
            name, model, lr=1e-3, weight_decay=0.01, target_modules="all-linear",
            optim_args=f"rank=4,{gap},foreach={foreach}" + (",min_8bit_size=0" if "8bit" in name else ""),
        )  # fmt: skip
        models.append(model)
        optimizers.append(cls(**kwargs))
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(0, 99, (2, 16), generator=generator).cuda()
        for model, optimizer in zip(models, optimizers):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)


def test_flora_projections_are_bitwise_identical_on_every_device():
    for seed in (0, 7, 2**40 + 3):
        cpu = gaussian_projection(seed, 300, 16, device="cpu")
        cuda = gaussian_projection(seed, 300, 16, device="cuda")
        assert cuda.device.type == "cuda"
        assert torch.equal(cuda.cpu(), cpu)


def test_8bit_states_on_cuda_track_the_32bit_optimizer():
    from hf_galore.methods.galore import GaLoreAdamW8bit

    shape = (512, 256)
    a, _ = _pair(shape, "cuda")
    b = nn.Parameter(a.detach().clone())
    initial = a.detach().clone()
    eight = GaLoreAdamW8bit([{"params": [a], "low_rank": True}], lr=1e-3, rank=32, update_proj_gap=5)
    full = GaLoreAdamW([{"params": [b], "low_rank": True}], lr=1e-3, rank=32, update_proj_gap=5)
    for _ in range(12):
        grad = torch.randn(*shape, device="cuda")
        a.grad, b.grad = grad, grad.clone()
        eight.step()
        full.step()
    assert eight.state[a]["exp_avg_q"].dtype == torch.uint8
    drift = (a - b).norm() / (b.detach() - initial).norm()
    assert drift < 0.05  # the 8-bit moments move the weights like the fp32 ones, to within 5 % of the total update


@pytest.fixture
def deterministic():
    """Embedding backward and some reductions use atomics on CUDA: without deterministic algorithms two identical runs
    already differ, and a resume comparison would test the hardware, not the resume."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit_layerwise", "q_galore_adamw_8bit", "flora_adamw"])
def test_trainer_bf16_on_cuda_trains_and_resumes_exactly(tmp_path, name, deterministic):
    def run(output_dir, resume=None):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config())
        args = training_args(output_dir, name, use_cpu=False, bf16=True, max_steps=8, save_strategy="steps",
                             save_steps=4, max_grad_norm=0.0 if name.endswith("layerwise") else 1.0)  # fmt: skip
        trainer = make_trainer(model, args, lm_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {n: p.detach().float().cpu() for n, p in model.named_parameters()}

    from transformers import LlamaForCausalLM

    trainer, full = run(tmp_path / "full")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    assert next(trainer.model.parameters()).device.type == "cuda"
    _, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    for key, value in full.items():
        assert torch.equal(resumed[key], value), key
