"""Optimizers the benchmark compares against: fused AdamW, bitsandbytes' AdamW8bit and the published packages.

The published packages (`galore-torch`, `q-galore-torch`, `flora-opt`) are **benchmark-only** baselines: they are
never runtime dependencies of hf_galore. Install them next to the benchmark (``pip install --no-deps galore-torch
q-galore-torch flora-opt``; their own dependencies, torch, transformers and bitsandbytes, are ours too). A method
whose package is missing or fails is reported as such in the table, not silently dropped.

Every builder receives the same targets as hf_galore's ``optim_target_modules="all-linear"`` (resolved by
`hf_galore.targeting`), so the projected weights are identical across implementations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Baseline name -> (Python package, pip name) it needs; None for torch itself.
PACKAGES: dict[str, tuple[str, str] | None] = {
    "adamw": None,
    "bnb_adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "galore_torch_adamw": ("galore_torch", "galore-torch"),
    "galore_torch_adamw8bit": ("galore_torch", "galore-torch"),
    "galore_torch_adafactor": ("galore_torch", "galore-torch"),
    "galore_torch_adamw8bit_layerwise": ("galore_torch", "galore-torch"),
    "q_galore_torch_adamw8bit": ("q_galore_torch", "q-galore-torch"),
    "flora_opt": ("flora_opt", "flora-opt"),
}


class PerParameterHooks:
    """The layer-wise pattern transformers uses for galore-torch: one optimizer per parameter, stepped in its
    post-accumulate-grad hook. `step()`/`zero_grad()` are no-ops (the hooks did the work)."""

    def __init__(self, optimizers: dict[nn.Parameter, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.handles = []

        def hook(param: nn.Parameter) -> None:
            if param.grad is not None:
                optimizers[param].step()
                optimizers[param].zero_grad(set_to_none=True)

        for param in optimizers:
            self.handles.append(param.register_post_accumulate_grad_hook(hook))

    def step(self) -> None:
        """Nothing left to do: every parameter was updated in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients were freed by the hooks."""

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    @property
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for optimizer in self.optimizers.values():
            merged.update(optimizer.state)
        return merged


def _split(model: nn.Module, targets: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    target_ids = {id(p) for p in targets}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in target_ids], [p for p in trainable if id(p) not in target_ids]


def _galore_groups(model: nn.Module, targets: list[nn.Parameter], rank: int, gap: int, scale: float) -> list[dict]:
    projected, regular = _split(model, targets)
    galore = {"rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}
    return [{"params": regular}, {"params": projected, **galore}]


def build_baseline(
    name: str,
    model: nn.Module,
    targets: list[nn.Parameter],
    *,
    rank: int,
    gap: int,
    scale: float,
    lr: float,
    device: str,
) -> Any:
    """The optimizer of baseline `name` over `model`'s trainable parameters (projecting `targets` where it projects).

    Raises:
        ImportError: when the baseline's package is not installed (the message names the pip package).
        KeyError: for an unknown baseline name.
    """
    if name not in PACKAGES:
        raise KeyError(f"Unknown baseline {name!r}; choose one of {sorted(PACKAGES)}.")
    builders: dict[str, Callable[[], Any]] = {
        "adamw": lambda: _adamw(model, lr, device),
        "bnb_adamw8bit": lambda: _bnb_adamw8bit(model, lr),
        "galore_torch_adamw": lambda: _galore_torch("GaLoreAdamW", model, targets, rank, gap, scale, lr),
        "galore_torch_adamw8bit": lambda: _galore_torch("GaLoreAdamW8bit", model, targets, rank, gap, scale, lr),
        "galore_torch_adafactor": lambda: _galore_torch("GaLoreAdafactor", model, targets, rank, gap, scale, lr),
        "galore_torch_adamw8bit_layerwise": lambda: _galore_torch_layerwise(model, targets, rank, gap, scale, lr),
        "q_galore_torch_adamw8bit": lambda: _q_galore_torch(model, targets, rank, gap, scale, lr),
        "flora_opt": lambda: _flora_opt(model, rank, gap, lr),
    }
    return builders[name]()


def _import(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The baseline needs {pip_name} (benchmark-only): pip install --no-deps {pip_name}"
        ) from error


def _adamw(model: nn.Module, lr: float, device: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.startswith("cuda"):
        return torch.optim.AdamW(params, lr=lr, fused=True)
    return torch.optim.AdamW(params, lr=lr, foreach=True)


def _bnb_adamw8bit(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    bnb = _import("bitsandbytes", "bitsandbytes")
    return bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr)


def _galore_torch(cls_name: str, model, targets, rank, gap, scale, lr) -> torch.optim.Optimizer:
    galore_torch = _import("galore_torch", "galore-torch")
    groups = _galore_groups(model, targets, rank, gap, scale)
    if cls_name == "GaLoreAdafactor":
        return galore_torch.GaLoreAdafactor(groups, lr=lr, scale_parameter=False, relative_step=False)
    return getattr(galore_torch, cls_name)(groups, lr=lr)


def _galore_torch_layerwise(model, targets, rank, gap, scale, lr) -> PerParameterHooks:
    galore_torch = _import("galore_torch", "galore-torch")
    projected, regular = _split(model, targets)
    # As transformers builds `galore_adamw_8bit_layerwise` for galore-torch: one GaLoreAdamW8bit per parameter.
    galore = {"rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std"}
    optimizers = {p: galore_torch.GaLoreAdamW8bit([{"params": [p], **galore}], lr=lr) for p in projected}
    optimizers.update({p: galore_torch.GaLoreAdamW8bit([p], lr=lr) for p in regular})
    return PerParameterHooks(optimizers)


def _q_galore_torch(model, targets, rank, gap, scale, lr) -> torch.optim.Optimizer:
    q_galore_torch = _import("q_galore_torch", "q-galore-torch")
    projected, regular = _split(model, targets)
    group = {
        "params": projected, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": "std",
        "quant": True, "quant_group_size": 256, "quant_n_bit": 4, "cos_threshold": 0.4, "gamma_proj": 2,
        "queue_size": 5,
    }  # fmt: skip
    return q_galore_torch.QGaLoreAdamW8bit([{"params": regular}, group], lr=lr)


def _flora_opt(model, rank, kappa, lr) -> torch.optim.Optimizer:
    flora_opt = _import("flora_opt.optimizers.torch", "flora-opt")
    params = [p for p in model.parameters() if p.requires_grad]
    return flora_opt.Flora(params, lr=lr, rank=rank, kappa=kappa, relative_step=False, scale_parameter=False)
