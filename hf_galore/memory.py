"""Memory estimator: bytes of weights, gradients, optimizer states, projection bases, refresh workspace and
activations of one training step, for any GaLore-family `optim=` name and the plain AdamW baselines.

The model is built from its config on the meta device (by [`hf_galore.loading.build_meta_model`]), so nothing is
allocated. Everything but the activations is *counted* from the parameter shapes by one generic loop that asks the
chosen optimizer class for the bytes of each parameter ([`LowRankOptimizer.param_bytes`], a [`ParamBytes`]). Each
rule lives next to the storage it describes, so the optimizer-state prediction equals the bytes that
`optimizer.state` holds after the first step:

* `hf_galore.optim.adamw`: two fp32 moments of the projected shape (param dtype for non-projected parameters);
  8-bit: two uint8 codes + one fp32 absmax per `block_size` elements each, fp32 below `min_8bit_size` elements.
* `hf_galore.optim.adafactor`: fp32 row + column statistics (the full vector for 1-D tensors) + `exp_avg` when
  `beta1` is set.
* `hf_galore.optim.base`: the bases P (m×r) and/or Q (n×r) in the gradient dtype, or with `basis_bits` 8/4 packed
  (INT4: half a byte per element, INT8: one) with fp32 scale and zero per `basis_group_size` elements; the refresh
  workspace (randomized range finder: 2·(m + n)·(r + oversample) fp32; exact SVD: min(m, n)·(m + n + 1) fp32; plus
  an fp32 copy of a gradient that is not fp32).
* Q-GaLore (`methods/q_galore/optimizer.py`): INT8 target weights (m·n codes + fp32 scale/zero per
  `weight_group_size` elements + a one-element carrier), bases packed with `proj_bits`/`proj_group_size`, the fp32
  leading singular vector per side and the fp32 `cos_queue`; its state's references to the INT8 weights are weights.
* FLoRA (`methods/flora/optimizer.py`): per compressed weight the fp32 compressed momentum (r×n or m×r) and the fp32
  factored second moment (m + n), no stored basis; its update reads the full gradient.
* WeLore (`methods/welore/optimizer.py`): AdamW over the trainable parameters of the split model, built from a
  WeLore checkpoint's config with its recorded factors and trainable set. A dense model is refused: its split
  depends on the weights' spectra (`hf-galore welore analyze` reports that memory).

What the loop adds up (bytes; `e` is the element size of `dtype`):

* **gradients**: non-layer-wise, one gradient per trainable parameter (dense m·n for Q-GaLore's carriers), in the
  parameter's dtype. Layer-wise, each gradient is consumed and freed in its own backward hook, so at most one full
  gradient is alive at a time (the largest), plus the full gradients of tied weights (updated in `step()`), plus,
  with gradient accumulation, one accumulator per projected weight; with clipping (`max_grad_norm > 0`) instead
  every prepared gradient (projected for GaLore targets, full otherwise), which waits for `step()` to know the
  global norm.
* **baselines**: `adamw_torch`: two moments in param dtype + a 4-byte `step` tensor per parameter; `adamw_8bit`
  (bitsandbytes): the 8-bit rule with blocks of 256 plus the two shared 256-entry quantization maps.
* **step workspace**: temporaries of the update itself: the prepared gradients of one chunk (of one parameter in
  the layer-wise hooks), and per element of the parameters updated together the optimizer's
  `update_workspace_bytes` (8: Adam's denominator and low-rank direction; 18 for 8-bit states, which also
  dequantise both moments and concatenate their codes). The batched path (`foreach=True`) updates up to 2**23
  elements together (a larger single parameter alone), the per-parameter loop and the layer-wise hooks one
  parameter at a time; an AdamW-style plain update of a parameter larger than 2**23 elements runs in slices.
* **activations** (approximate, order of magnitude only): per layer b·s·h·(34 + 5·a·s/h)·e/2 bytes (Korthikanti et
  al., 2022, with the a·s² attention-score term kept; fused SDPA kernels store less), plus the logits (b·s·V in `e`
  and the fp32 copy the loss makes). With gradient checkpointing, each layer keeps its input (b·s·h·e) and one layer
  is recomputed at a time.
* **FSDP2** (`fsdp2=True`, `world_size` processes): the bytes of one process. Weights, gradients and every
  row-wise state cover its rows of each parameter (torch.chunk's split, process 0 the most); replicated state
  (GaLore's Q, FLoRA's column statistics) is whole on each process; the class's rule is applied to the shard with
  the decisions the optimizer takes on the global shape (the right side for every projected weight, 8-bit on the
  global size), see [`row_sharded_param_bytes`]. Names whose class lacks `supports_row_sharding` are refused.
* **peak**: weights + states + bases + gradients + max(activations, refresh transient, step workspace); for
  layer-wise names the refresh and the update run inside backward while activations are alive, so activations and
  the larger of the two are added. This is an upper-end estimate:
  activations are freed while gradients appear, and allocator fragmentation is not modelled.

Example:
    ```python
    >>> from hf_galore.memory import estimate_memory
    >>> est = estimate_memory("./llama-60m/config.json", "galore_adamw", rank=128, batch=8, seq=256, dtype="bf16")
    >>> print(est.table())
    ```
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import methods  # noqa: F401 - registers every method's optim= names
from .configs import Blockwise8bitConfig, optimizer_kwargs, parse_optim_args, split_optim_args
from .errors import InvalidConfigError, UnknownOptimizerError, UnsupportedSetupError
from .loading import build_meta_model
from .optim.adamw import LowRankAdamW8bit
from .optim.base import LowRankOptimizer, ParamBytes
from .projection.subspace import row_sharded_side
from .registry import REGISTRY, get_spec, row_sharding_names
from .targeting import TargetSpec, resolve_target_modules

#: Plain optimizers the estimator knows, as transformers names them (for comparison with the GaLore family).
BASELINES = ("adamw_torch", "adamw_8bit")

#: dtype spellings accepted by [`estimate_memory`] and the CLI.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

_BNB_QMAP_BYTES = 2 * 256 * 4  # bitsandbytes' signed and unsigned dynamic maps, shared by every 8-bit parameter


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return int(numel) * torch.empty((), dtype=dtype).element_size()


@dataclass
class MemoryEstimate:
    """Bytes of one training step, per category (see the module docstring for the rules).

    Attributes:
        optim: The `optim=` name estimated.
        model: The model class.
        dtype: The weights' dtype.
        rank, batch, seq: The rank (None for the baselines) and the batch shape.
        layerwise: Whether the layer-wise gradient rule was used.
        grad_checkpointing: Whether activations assume gradient checkpointing.
        num_parameters: Unique parameter elements (Q-GaLore's carriers counted at their m·n).
        num_projected: Projected weights (with min(m, n) > rank).
        weights, gradients, optimizer_states, projection_bases, refresh_transient, activations, step_workspace:
            Bytes.
        notes: Caveats of this estimate.
        world_size: Processes of the setup (1 unless `fsdp2`).
        fsdp2: Whether the bytes are one process' under FSDP2 (`fully_shard`): those of process 0, which holds
            the most rows of every parameter (torch.chunk's split), hence the largest of all processes.
        per_process_state_bytes: `state_bytes` of each process in rank order (one entry without FSDP2).
    """

    optim: str
    model: str
    dtype: str
    rank: int | None
    batch: int
    seq: int
    layerwise: bool
    grad_checkpointing: bool
    num_parameters: int
    num_projected: int
    weights: int
    gradients: int
    optimizer_states: int
    projection_bases: int
    refresh_transient: int
    activations: int
    step_workspace: int = 0
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    fsdp2: bool = False
    per_process_state_bytes: list[int] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        """Bytes held by `optimizer.state` after the first step: moments + bases (Q-GaLore's references to the
        model's INT8 weights excluded: they are counted as weights)."""
        return self.optimizer_states + self.projection_bases

    @property
    def total_peak(self) -> int:
        """Estimated peak bytes of a training step (see the module docstring)."""
        resident = self.weights + self.state_bytes + self.gradients
        transient = max(self.refresh_transient, self.step_workspace)
        if self.layerwise:
            return resident + self.activations + transient
        return resident + max(self.activations, transient)

    def to_dict(self) -> dict[str, Any]:
        """The estimate as a JSON-serialisable dict, including `state_bytes` and `total_peak`."""
        return {**dataclasses.asdict(self), "state_bytes": self.state_bytes, "total_peak": self.total_peak}

    def table(self) -> str:
        """A plain-text table of the categories in MiB and bytes."""
        rank = "" if self.rank is None else f" rank={self.rank}"
        header = (
            f"{self.model} optim={self.optim}{rank} dtype={self.dtype} batch={self.batch}x{self.seq}"
            f"{' layer-wise' if self.layerwise else ''}{' grad-checkpointing' if self.grad_checkpointing else ''}"
        )
        if self.fsdp2:
            header += f"\nFSDP2 on {self.world_size} processes: bytes of process 0 (the most rows of every parameter)"
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("projection bases", self.projection_bases),
            ("refresh transient", self.refresh_transient),
            ("step workspace", self.step_workspace),
            ("activations (approx.)", self.activations),
            ("total peak (approx.)", self.total_peak),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [
            header,
            f"parameters: {self.num_parameters:,}   projected weights: {self.num_projected}",
            "",
            f"{'category'.ljust(width)}  {'MiB':>12}  {'bytes':>16}",
        ]
        lines += [f"{name.ljust(width)}  {value / 2**20:>12.2f}  {value:>16,}" for name, value in rows]
        if self.fsdp2 and self.world_size > 1:
            shown = self.per_process_state_bytes
            listed = ", ".join(f"{b:,}" for b in shown[:8]) + (", ..." if len(shown) > 8 else "")
            lines.append(f"states + bases per process (rank order): {listed}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------- model
#: State keys that reference the model's own weight buffers (Q-GaLore's INT8 weights): weights, not optimizer state.
#: Collected from the registered optimizer classes' `weight_state_keys`.
WEIGHT_REFERENCE_KEYS = tuple(
    sorted({key for spec in REGISTRY.values() for key in getattr(spec.optimizer_cls, "weight_state_keys", ())})
)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Measured bytes of the tensors in `optimizer.state`: the quantity [`MemoryEstimate.state_bytes`] predicts.

    Works for any optimizer exposing `.state` (accelerate's wrapper included). Each storage is counted once,
    Q-GaLore's references to the INT8 weights ([`WEIGHT_REFERENCE_KEYS`]) are left out, and tensors held by objects
    inside the state (e.g. a third-party projector's basis matrix) are counted.
    """
    seen: set[tuple[int, torch.dtype, int]] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            ident = (value.untyped_storage().data_ptr(), value.dtype, value.numel())
            if ident not in seen:
                seen.add(ident)
                total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        elif hasattr(value, "__dict__") and not isinstance(value, nn.Module):
            for item in vars(value).values():
                if isinstance(item, (torch.Tensor, list, tuple)):
                    add(item)

    for param_state in optimizer.state.values():
        for key, value in param_state.items():
            if key not in WEIGHT_REFERENCE_KEYS:
                add(value)
    return total


def _build_model(model_or_config: Any, converted: bool = False) -> nn.Module:
    """An `nn.Module` as is; a `PretrainedConfig` or a config path built on the meta device (no memory), with the
    converted modules its config records when `converted` (see [`hf_galore.loading.build_meta_model`])."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if isinstance(model_or_config, (str, os.PathLike)) or _is_pretrained_config(model_or_config):
        return build_meta_model(model_or_config, converted=converted)
    raise InvalidConfigError(
        f"model_or_config={type(model_or_config).__name__} is not supported; pass an nn.Module, a transformers "
        "PretrainedConfig, or the path of a config.json (or of a directory holding one)."
    )


def _is_pretrained_config(value: Any) -> bool:
    # By duck type (`to_json_string` + `model_type`), so that this module does not import transformers.
    return hasattr(value, "to_json_string") and hasattr(value, "model_type")


def _unique_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _tied_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {pid for pid, count in counts.items() if count > 1}


# ----------------------------------------------------------------------------------------------------------- rules
def _step_workspace(sizes: list[int], grad_elem: int, per_element: int, chunked: bool, layerwise: bool) -> int:
    """Temporaries of the optimizer update. `step()` prepares (projects) the gradients of up to
    `foreach_chunk_elements` elements (more if one parameter is larger) before applying them, so those prepared
    gradients (gradient dtype) are alive together; the layer-wise hooks prepare one at a time. The update then
    needs `per_element` bytes per element updated together (the optimizer's `update_workspace_bytes`): the batched
    path updates the whole chunk together, the loop and the hooks one parameter."""
    if not sizes:
        return 0
    largest = max(sizes)
    chunk = min(sum(sizes), max(largest, LowRankOptimizer.foreach_chunk_elements))
    prepared = largest if layerwise else chunk
    together = chunk if chunked else largest
    return prepared * grad_elem + together * per_element


#: A `min_8bit_size` no state reaches: makes an 8-bit rule keep a state fp32 whatever the shape it is evaluated on.
_NEVER_8BIT = sys.maxsize


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Rows each process holds of a parameter with `rows` rows under FSDP2 (`fully_shard`'s `Shard(0)`), in rank
    order: torch.chunk's split, ceil(rows / world_size) per process, the last ones fewer or none.

    Example:
        ```python
        >>> shard_rows(9, 2), shard_rows(3, 4)
        ([5, 4], [1, 1, 1, 0])
        ```
    """
    chunk = -(-rows // world_size)
    return [max(0, min(chunk, rows - k * chunk)) for k in range(world_size)]


def row_sharded_param_bytes(
    optimizer_cls: type[LowRankOptimizer],
    shape: tuple[int, ...],
    settings: dict[str, Any],
    dtype: torch.dtype,
    target: bool,
    rows: int,
) -> ParamBytes:
    """What one process allocates for a parameter of global `shape` of which it holds `rows` rows under FSDP2.

    The optimizer steps on the local rows, with the decisions that depend on the shape taken on the global one
    (`_init_state` on a DTensor): a projected weight (rank < min(m, n)) is projected on the right side whatever
    `proj_type="std"` picks for one process (`row_sharded_side`), with Q (n×r) replicated and the m_k×r moments
    local; a state is 8-bit when its global size reaches `min_8bit_size`, in blocks of the local rows. This applies
    the class's own byte rule ([`LowRankOptimizer.param_bytes`]) to the shard with those decisions fixed:

    * `proj_type` becomes `"right"` for a projected weight, and `min_8bit_size` 0 or never-reached after the
      global size;
    * a shard may hold no more rows than the rank, or none, while its weight is projected, and the rule would not
      project such a shape. It is evaluated on shapes with `extra` = (max(rank, n) + 1) · `block_size` more rows,
      and the shard's bytes are rule(rows + extra) + rule(extra) - rule(2 · extra): exact for what row sharding
      stores, a constant (replicated: Q, FLoRA's column statistics) plus a per-row part counted in blocks
      (`extra` · rank fills whole blocks, so adding `extra` rows adds the same bytes to any shard).

    Non-projected parameters (and every parameter of a class that projects nothing) take the rule of the plain
    update on the local shape; the global rule is evaluated first, so a shape the class refuses (e.g. FLoRA's rank
    above min(m, n)) is refused here too.

    Raises:
        [`UnsupportedSetupError`]: `proj_type` left/full (or `reverse_std` on a tall weight), or `svd="exact"`,
            for a projected weight: refused by the optimizer under FSDP2 as well.
    """
    whole = optimizer_cls.param_bytes(shape, settings, dtype, target)
    if not shape:  # a 0-d parameter has no rows to split: every process holds it whole
        return whole
    local = dict(settings)
    projected = whole.projected
    if projected:
        try:
            row_sharded_side(shape, settings["proj_type"], settings["rank"])
        except ValueError as err:
            raise UnsupportedSetupError(f"{optimizer_cls.__name__} under FSDP2: {err}") from None
        if settings.get("svd", "randomized") != "randomized":  # FLoRA has no svd knob
            raise UnsupportedSetupError(
                f"{optimizer_cls.__name__} under FSDP2: svd={settings['svd']!r} needs the whole gradient of a weight "
                "on one process; use svd='randomized' (the default), whose sketches are all-reduced."
            )
        local["proj_type"] = "right"
    if "min_8bit_size" in settings:
        row_size = settings["rank"] if projected else math.prod(shape[1:])
        local["min_8bit_size"] = 0 if shape[0] * row_size >= settings["min_8bit_size"] else _NEVER_8BIT
    if not projected:
        # target=False: the plain update's rule, which a non-projected target shares (and which checks nothing a
        # shard's shape could fail).
        return optimizer_cls.param_bytes((rows, *shape[1:]), local, dtype, False)

    def rule(num_rows: int) -> ParamBytes:
        return optimizer_cls.param_bytes((num_rows, *shape[1:]), local, dtype, True)

    # More rows than the rank and than n (so a refresh's sketch width min(rank + oversample, m, n) is the same in the
    # three evaluations: min(rank + oversample, n); the refresh workspace is an estimate anyway), in whole blocks of
    # `block_size` per row of the state.
    extra = (max(settings["rank"], *shape[1:]) + 1) * settings.get("block_size", 1)
    above, base, twice = rule(rows + extra), rule(extra), rule(2 * extra)
    counts = {
        f.name: getattr(above, f.name) + getattr(base, f.name) - getattr(twice, f.name)
        for f in dataclasses.fields(ParamBytes)
        if f.name != "projected"
    }
    return ParamBytes(projected=True, **counts)


def _fsdp2_refusal(name: str, spec: Any, configs: list[Any], gradient_accumulation_steps: int) -> str | None:
    """Why `optim=name` cannot step on FSDP2's row shards (the class it builds lacks `supports_row_sharding`), or
    None. With gradient accumulation a name may build another class (`hooked_cls`, e.g. FLoRA's accumulating one)."""
    built = spec.optimizer_cls
    if spec.hooked_cls is not None:
        args = SimpleNamespace(gradient_accumulation_steps=gradient_accumulation_steps, optim_args=None)
        built = spec.hooked_cls(args, configs) or built
    if getattr(built, "supports_row_sharding", False):
        return None
    with_accumulation = " with gradient_accumulation_steps > 1" if built is not spec.optimizer_cls else ""
    supported = ", ".join(row_sharding_names())
    return (
        f"optim={name!r}{with_accumulation} does not step on FSDP2 (fully_shard) row shards ({built.__name__} refuses "
        f"DTensor parameters). The names that do: {supported}, and the baseline adamw_torch (FLoRA's without "
        "gradient accumulation; WeLore's on a WeLore checkpoint). Pick one of them, or estimate without --fsdp2 (one "
        "process, or DDP: every process holds what one process holds)."
    )


def _resolve_name(optim: str, layerwise: bool | None) -> str:
    name = str(getattr(optim, "value", optim))
    if name not in REGISTRY and name not in BASELINES:
        choices = [*REGISTRY, *BASELINES]
        close = difflib.get_close_matches(name, choices, n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownOptimizerError(
            f"optim={name!r} is not known to the memory estimator.{hint} Choices: {', '.join(choices)}. Fix the "
            "--optim / optim value."
        )
    if layerwise is None or name in BASELINES:
        if layerwise and name in BASELINES:
            raise InvalidConfigError(
                f"layerwise=True is not available for optim={name!r}; drop --layerwise, or estimate a GaLore name "
                "with a layer-wise form, e.g. galore_adamw_layerwise."
            )
        return name
    base = name.removesuffix("_layerwise")
    target = f"{base}_layerwise" if layerwise else base
    if target not in REGISTRY:
        raise InvalidConfigError(
            f"optim={name!r} has no {'layer-wise' if layerwise else 'non-layer-wise'} form ({target!r} is not "
            f"registered); leave layerwise unset or pick one of: {', '.join(REGISTRY)}."
        )
    return target


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise InvalidConfigError(f"dtype={dtype!r} is not valid; choose one of {', '.join(DTYPES)}.")


def _activations(model: nn.Module, batch: int, seq: int, elem: int, grad_checkpointing: bool) -> tuple[int, str]:
    """Rough activation bytes of one forward pass kept for backward, and a note when the config lacks fields."""
    config = getattr(model, "config", None)

    def get(*names: str) -> int | None:
        for attr in names:
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return None

    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    if None in (hidden, heads, layers):
        return 0, "activations not estimated: the config has no hidden_size / num_attention_heads / num_hidden_layers"
    tokens = batch * seq
    per_layer = tokens * hidden * (34 + 5 * heads * seq / hidden) * elem / 2
    if grad_checkpointing:
        body = layers * tokens * hidden * elem + per_layer  # layer inputs + one layer being recomputed
    else:
        body = layers * per_layer
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_features = getattr(head, "out_features", None) or get("num_labels") or 0
    logits = tokens * out_features * (elem + 4)  # logits in `dtype` + the fp32 upcast of the loss
    return int(body + logits), ""


# ----------------------------------------------------------------------------------------------------------- main
def estimate_memory(
    model_or_config: Any,
    optim: str,
    rank: int | None = None,
    batch: int = 1,
    seq: int = 512,
    layerwise: bool | None = None,
    grad_checkpointing: bool = False,
    dtype: str | torch.dtype = "fp32",
    optim_args: str | dict[str, Any] | None = None,
    target_modules: TargetSpec = "all-linear",
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
    world_size: int = 1,
    fsdp2: bool = False,
) -> MemoryEstimate:
    """Estimate the memory of one training step with `optim`, without allocating the model.

    Args:
        model_or_config (`nn.Module`, `PretrainedConfig` or `str`): A model (only shapes are read; a meta-device
            model is fine), a config, or a `config.json` path / a directory holding one; configs are built on the
            meta device as `config.architectures[0]`.
        optim (`str`): A registered GaLore-family name or one of the baselines `adamw_torch`, `adamw_8bit`.
        rank (`int`, *optional*): Projection rank; overrides `rank` in `optim_args` (default: the config's 128).
        batch (`int`, defaults to 1), seq (`int`, defaults to 512): Per-device batch size and sequence length.
        layerwise (`bool`, *optional*): Force the layer-wise (`True`) or regular (`False`) form of `optim`; `None`
            follows the name.
        grad_checkpointing (`bool`, defaults to `False`): Activations under gradient checkpointing.
        dtype (`str` or `torch.dtype`, defaults to `"fp32"`): dtype of the weights and gradients (`bf16`, `fp32`,
            `fp16`).
        optim_args (`str` or `dict`, *optional*): As `TrainingArguments.optim_args` (e.g. `"rank=8, proj_type=full"`).
        target_modules (`str` or `list[str]`, defaults to `"all-linear"`): As `optim_target_modules`.
        gradient_accumulation_steps (`int`, defaults to 1): Adds the layer-wise projected accumulators when > 1.
        max_grad_norm (`float`, defaults to 1.0, `TrainingArguments`' default): With a layer-wise name and clipping
            on (> 0), every prepared gradient (projected for targets, full for the others) is held until `step()`
            knows the global norm; 0 disables clipping.
        world_size (`int`, defaults to 1): Processes; more than one only with `fsdp2=True` (under DDP every
            process holds what one process holds, so there is nothing else to estimate).
        fsdp2 (`bool`, defaults to `False`): Bytes of one process under FSDP2 (`fully_shard`, one `Shard(0)` over
            `world_size` processes): weights, gradients and row-wise optimizer state of its rows (torch.chunk's
            split), replicated state (GaLore's Q, FLoRA's column statistics) whole, each projected weight on the
            right side (see [`row_sharded_param_bytes`]). The categories are process 0's (the largest);
            `per_process_state_bytes` lists every process'. `batch` stays the per-process batch.

    Returns:
        [`MemoryEstimate`]

    Raises:
        [`UnknownOptimizerError`]: `optim` is neither registered nor a baseline (the message lists the choices).
        [`UnsupportedSetupError`]: a WeLore name on a model that is not split yet (the split needs the weights'
            spectra; a WeLore checkpoint's config, or a split model, is estimated); with `fsdp2`, a name whose
            optimizer does not step on row shards (the message names those that do) or settings it refuses there.
        [`InvalidConfigError`], [`NoTargetModulesError`]: bad `optim_args`, `dtype` or targets.
    """
    for label, value in (("batch", batch), ("seq", seq), ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not isinstance(value, int) or value < 1:
            raise InvalidConfigError(f"{label} must be a positive integer, got {value!r}.")
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidConfigError(f"world_size must be a positive integer, got {world_size!r}.")
    if world_size > 1 and not fsdp2:
        raise InvalidConfigError(
            f"world_size={world_size} without fsdp2: under DDP (or one process) every process holds the whole "
            "model, its gradients and the optimizer state, i.e. the one-process estimate. Drop --world-size, or add "
            "--fsdp2 for the per-process bytes of a fully_shard run."
        )
    name = _resolve_name(optim, layerwise)
    weight_dtype = _dtype(dtype)
    elem = _nbytes(1, weight_dtype)
    spec = None if name in BASELINES else get_spec(name)
    optimizer_cls = None if spec is None else spec.optimizer_cls
    model = _build_model(
        model_or_config, converted=optimizer_cls is not None and optimizer_cls.estimates_converted_model
    )
    notes: list[str] = []
    params = _unique_trainable(model)
    tied = _tied_ids(model)

    args: dict[str, Any] = split_optim_args(optim_args)
    if rank is not None:
        args["rank"] = rank

    if spec is None or optimizer_cls is None:
        return _estimate_baseline(
            model, name, params, weight_dtype, elem, args, batch, seq, grad_checkpointing, world_size if fsdp2 else 0
        )

    refusal = optimizer_cls.memory_estimate_refusal(model)
    if refusal:
        raise UnsupportedSetupError(f"estimate_memory cannot model optim={name!r} for this model: {refusal}.")
    configs = parse_optim_args(args, spec.config_classes, name)
    refusal = _fsdp2_refusal(name, spec, configs, gradient_accumulation_steps) if fsdp2 else None
    if refusal:
        raise UnsupportedSetupError(refusal)
    settings = _group_settings(optimizer_cls, configs)
    rank = settings.get("rank")

    resolution = resolve_target_modules(model, target_modules, include_heads=spec.transformers_name)
    target_ids = {id(m.weight) for _, m in resolution.modules}
    if optimizer_cls.converts_targets:
        tied_targets = [n for n, m in resolution.modules if id(m.weight) in tied]
        if tied_targets:
            raise InvalidConfigError(
                f"{spec.method} cannot convert {tied_targets}: their weights are tied to another module. Leave them "
                'out of target_modules ("all-linear" already excludes output heads).'
            )

    # One generic loop: the optimizer class states the bytes of each parameter (its own storage rules). Under FSDP2
    # the loop runs once per process over its rows; process 0 holds the most rows of every parameter.
    if fsdp2:
        # Processes holding the same rows of every parameter (most of them, with torch.chunk's split) share a tally.
        table = [
            shard_rows(p.shape[0], world_size) if p.dim() else [0] * world_size for _, p in model.named_parameters()
        ]
        shards = [tuple(rows[k] for rows in table) for k in range(world_size)]
    else:
        shards = [None]
    by_shard = {
        shard: _tally(model, optimizer_cls, settings, weight_dtype, target_ids, tied, shard) for shard in set(shards)
    }
    tallies = [by_shard[shard] for shard in shards]
    tally = tallies[0]
    weights, gradients, states, bases = tally.weights, tally.gradients, tally.states, tally.bases
    refresh, update_sizes = tally.refresh, tally.update_sizes
    largest_grad, tied_grads = tally.largest_grad, tally.tied_grads
    held_for_clipping, accumulators = tally.held_for_clipping, tally.accumulators
    num_params, num_projected = tally.num_params, tally.num_projected

    if spec.layerwise:
        gradients = largest_grad + tied_grads
        if max_grad_norm > 0:
            gradients += held_for_clipping
            notes.append(
                "layer-wise clipping holds every prepared gradient until step(); max_grad_norm=0 frees each in its hook"
            )
        elif gradient_accumulation_steps > 1:
            gradients += accumulators
            notes.append("layer-wise with accumulation: refresh steps keep full gradients of refreshing weights")
    elif gradient_accumulation_steps > 1:
        notes.append("gradient accumulation does not change the non-layer-wise gradient bytes")
    if num_projected == 0 and rank is not None:
        notes.append(f"no targeted weight has min(m, n) > rank={rank}: nothing is projected")
    activations, note = _activations(model, batch, seq, elem, grad_checkpointing)
    notes += [note] if note else []
    notes.append("activations are a rough transformer formula (±50%); everything else is counted from shapes")
    if fsdp2:
        notes.append(
            "FSDP2: not counted are the parameters it all-gathers and the gradients it reduce-scatters for the "
            "module being computed (a transformer layer, two with prefetching), nor a MixedPrecisionPolicy's copies"
        )
    chunked = bool(settings.get("foreach", False)) and not spec.layerwise
    return MemoryEstimate(
        optim=name,
        model=type(model).__name__,
        dtype=str(weight_dtype).removeprefix("torch."),
        rank=rank,
        batch=batch,
        seq=seq,
        layerwise=spec.layerwise,
        grad_checkpointing=grad_checkpointing,
        num_parameters=num_params,
        num_projected=num_projected,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        projection_bases=bases,
        refresh_transient=refresh,
        activations=activations,
        step_workspace=_step_workspace(
            update_sizes, elem, optimizer_cls.update_workspace_bytes, chunked, spec.layerwise
        ),
        notes=notes,
        world_size=world_size,
        fsdp2=fsdp2,
        per_process_state_bytes=[t.states + t.bases for t in tallies],
    )


@dataclass
class _Tally:
    """Sums of one process' [`ParamBytes`] over the model (see `_tally`)."""

    weights: int = 0
    gradients: int = 0
    states: int = 0
    bases: int = 0
    refresh: int = 0
    accumulators: int = 0
    held_for_clipping: int = 0  # layer-wise with clipping: every prepared gradient waits for step()
    largest_grad: int = 0
    tied_grads: int = 0
    num_params: int = 0
    num_projected: int = 0
    update_sizes: list[int] = field(default_factory=list)  # elements of each (projected) update: step workspace


def _tally(
    model: nn.Module,
    optimizer_cls: type[LowRankOptimizer],
    settings: dict[str, Any],
    dtype: torch.dtype,
    target_ids: set[int],
    tied: set[int],
    shard: tuple[int, ...] | None,
) -> _Tally:
    """Add up the optimizer class' bytes of every parameter: whole parameters (`shard=None`), or under FSDP2 the
    rows one process holds, `shard[i]` of the i-th parameter of `model.named_parameters()`
    ([`row_sharded_param_bytes`]). Counts (parameters, projected weights) are global either way."""
    tally = _Tally()
    elem = _nbytes(1, dtype)
    for i, (_, p) in enumerate(model.named_parameters()):
        shape = tuple(p.shape)
        tally.num_params += math.prod(shape)
        rows = shape[0] if shard is None or not shape else shard[i]
        local = (rows, *shape[1:]) if shape else shape
        if not p.requires_grad:
            tally.weights += optimizer_cls.weight_bytes(local, settings, dtype, False)
            continue
        target = id(p) in target_ids
        if shard is None:
            cost = optimizer_cls.param_bytes(shape, settings, dtype, target)
        else:
            cost = row_sharded_param_bytes(optimizer_cls, shape, settings, dtype, target, rows)
        tally.weights += cost.weights
        tally.states += cost.states
        tally.bases += cost.bases
        grad = math.prod(local) * elem  # FSDP2 reduce-scatters each gradient to the rows of its shard
        tally.gradients += grad
        if id(p) in tied:
            tally.tied_grads += grad
        else:
            tally.largest_grad = max(tally.largest_grad, grad)
        tally.update_sizes.append(cost.update_elements)
        tally.held_for_clipping += cost.prepared
        tally.accumulators += cost.accumulator
        tally.refresh = max(tally.refresh, cost.refresh)
        tally.num_projected += cost.projected
    return tally


def _group_settings(optimizer_cls: type[LowRankOptimizer], configs: list[Any]) -> dict[str, Any]:
    """The settings of the optimizer's param groups: its defaults overridden by the parsed `optim_args`, as
    `hf_galore.builder.plan_optimizer` passes them to the constructor (`configs.optimizer_kwargs`)."""
    return {
        "weight_decay": 0.0,
        **optimizer_cls.low_rank_defaults(),
        **optimizer_cls.inner_defaults,
        **optimizer_kwargs(configs),
    }


def _estimate_baseline(
    model: nn.Module,
    name: str,
    params: list[tuple[str, nn.Parameter]],
    weight_dtype: torch.dtype,
    elem: int,
    args: dict[str, Any],
    batch: int,
    seq: int,
    grad_checkpointing: bool,
    fsdp2_world_size: int = 0,
) -> MemoryEstimate:
    """`adamw_torch` (two moments in param dtype + a 4-byte `step` tensor) or bitsandbytes' `adamw_8bit`. With
    `fsdp2_world_size` > 0, `adamw_torch`'s bytes per process under FSDP2 (its moments follow the rows of the
    DTensor parameters; the `step` tensor is whole on each process)."""
    if fsdp2_world_size and name != "adamw_torch":
        raise UnsupportedSetupError(
            f"optim={name!r} under FSDP2 is not modelled (bitsandbytes' optimizers are not checked on DTensor "
            "parameters); estimate adamw_torch, or a GaLore-family name that steps on row shards, e.g. "
            "galore_adamw_8bit."
        )
    args = {k: v for k, v in args.items() if k != "rank"}  # a rank means nothing to a full-rank optimizer
    allowed = {"adamw_torch": (), "adamw_8bit": (Blockwise8bitConfig,)}[name]
    if name == "adamw_8bit" and "block_size" in args:
        raise InvalidConfigError(
            "optim_args key 'block_size' is fixed at 256 by bitsandbytes' AdamW8bit; remove it (min_8bit_size is valid)."
        )
    configs = parse_optim_args(args, allowed, name)
    world = max(fsdp2_world_size, 1)

    def numel(p: nn.Parameter, process: int = 0) -> int:  # elements of `process`' rows (the whole when unsharded)
        return p.numel() if p.dim() == 0 else shard_rows(p.shape[0], world)[process] * math.prod(p.shape[1:])

    weights = sum(numel(p) for p in model.parameters()) * elem
    states = 0
    for _, p in params:
        if name == "adamw_torch":
            states += 2 * numel(p) * elem + 4
        else:
            # bitsandbytes' AdamW8bit stores its moments as our 8-bit engine does (block 256, fp32 below min_8bit_size)
            states += LowRankAdamW8bit.inner_state_bytes(
                (p.numel(),), {"block_size": 256, "min_8bit_size": configs[0].min_8bit_size}, p.dtype, low_rank=False
            )
    if name == "adamw_8bit" and any(p.numel() >= configs[0].min_8bit_size for _, p in params):
        states += _BNB_QMAP_BYTES
    gradients = sum(numel(p) for _, p in params) * elem
    per_process = [states]
    if fsdp2_world_size:
        per_process = [sum(2 * numel(p, k) * elem + 4 for _, p in params) for k in range(world)]
    activations, note = _activations(model, batch, seq, elem, grad_checkpointing)
    notes = [note] if note else []
    notes.append("activations are a rough transformer formula (±50%); everything else is counted from shapes")
    return MemoryEstimate(
        optim=name,
        model=type(model).__name__,
        dtype=str(weight_dtype).removeprefix("torch."),
        rank=None,
        batch=batch,
        seq=seq,
        layerwise=False,
        grad_checkpointing=grad_checkpointing,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_projected=0,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        projection_bases=0,
        refresh_transient=0,
        activations=activations,
        notes=notes,
        world_size=world,
        fsdp2=bool(fsdp2_world_size),
        per_process_state_bytes=per_process,
    )
