"""hf_galore: GaLore-family memory-efficient optimizers as first-class `optim=` choices of the HF Trainer.

`import hf_galore` registers our optimizer names with the stock `transformers.TrainingArguments` / `Trainer`
(reversible with [`unregister`]); everything else is importable without side effects.

The public names below are imported lazily (PEP 562), on first access: registration imports the Trainer anyway, but
the `hf-galore` command line, which skips registration (see [`_started_by_console_script`]), then starts without
importing torch or transformers for `--help` and `--version`.

Layout, bottom to top (a module imports only from its own layer and those below; see `docs/contributing.md`):

* `errors.py`, `utils/`: the exception hierarchy, optional-dependency checks, aliases of moved names;
* `projection/`: pure tensor math (bases, seeded random projections, quantization, WeLore's spectra);
* `configs.py`: the option machinery every config shares (`OptionsMixin`, `parse_optim_args`) and the engine
  configs; `modules/`: `Int8Linear`, `LowRankLinear`;
* `optim/`: the engines (the low-rank skeleton, the AdamW / 8-bit AdamW / Adafactor inner engines, the layer-wise
  mixin); never imports transformers or a method;
* `registry.py` (a leaf: `OptimizerSpec`, `register_optimizer`, `get_spec`), `targeting.py` (target resolution and
  param groups), `builder.py` (settings checked, model transform, groups), `loading.py` (our checkpoint formats);
* `methods/<method>/` for GaLore, Q-GaLore, FLoRA and WeLore: `config.py`, `optimizer.py`, `transform.py` (where
  the method changes the model) and `spec.py` (registration of its `optim=` names); `hf_galore.q_galore` and
  `hf_galore.welore` are the packages `hf_galore.methods.q_galore` and `hf_galore.methods.welore`;
* `memory.py` (the estimator), `integrations/` (transformers registration, Trainer hooks, callbacks), and on top
  `cli.py` (`hf-galore`), which nothing imports.

Example:
    ```python
    >>> import hf_galore  # registers the galore_*, q_galore_*, flora_* and welore_* names (`hf-galore list`)
    >>> from transformers import Trainer, TrainingArguments
    >>> args = TrainingArguments("out", optim="galore_adamw", optim_target_modules="all-linear",
    ...                          optim_args="rank=8, update_proj_gap=200, scale=2")
    >>> Trainer(model=model, args=args, train_dataset=ds).train()
    ```
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Light (no torch): the errors are what every caller catches.
from .errors import (
    HfGaloreError,
    InvalidConfigError,
    MissingDependencyError,
    NotAPlaceholderError,
    NoTargetModulesError,
    OptimizerMismatchError,
    UnknownOptimizerError,
    UnsupportedSetupError,
    UnsupportedTransformersVersionError,
)
from .utils.deprecation import install_module_aliases

#: Public name -> the submodule (relative to this package) that defines it, imported on first access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        [
            "AdafactorConfig",
            "Blockwise8bitConfig",
            "MultiTensorConfig",
            "parse_optim_args",
        ],
        ".configs",
    ),
    "GaLoreConfig": ".methods.galore",
    "QGaLoreConfig": ".methods.q_galore",
    "FloraConfig": ".methods.flora",
    "WeLoreConfig": ".methods.welore",
    "WeLoreCallback": ".integrations.callbacks",
    **dict.fromkeys(
        ["is_registered", "optimizer_cls_and_kwargs", "register", "unregister"], ".integrations.transformers"
    ),
    "Int8Linear": ".modules.int8_linear",
    "LowRankLinear": ".modules.low_rank_linear",
    **dict.fromkeys(
        [
            "GaLoreAdafactor",
            "GaLoreAdafactorLayerwise",
            "GaLoreAdamW",
            "GaLoreAdamW8bit",
            "GaLoreAdamW8bitLayerwise",
            "GaLoreAdamWLayerwise",
        ],
        ".methods.galore",
    ),
    "LowRankOptimizer": ".optim",
    **dict.fromkeys(
        ["FloraAdafactor", "FloraAdafactorLayerwise", "FloraAdamW", "FloraAdamWLayerwise"], ".methods.flora"
    ),
    **dict.fromkeys(["QGaLoreAdamW8bit", "QGaLoreAdamW8bitLayerwise"], ".methods.q_galore"),
    **dict.fromkeys(["WeLoreAdamW", "WeLoreAdamW8bit"], ".methods.welore"),
    **dict.fromkeys(["REGISTRY", "OptimizerSpec", "get_spec", "register_optimizer"], ".registry"),
    **dict.fromkeys(["TargetResolution", "build_param_groups", "resolve_target_modules"], ".targeting"),
}
#: Submodules exposed as attributes (`hf_galore.welore.analyze(...)`): name -> module.
_SUBMODULES = {"loading": ".loading", "q_galore": ".methods.q_galore", "welore": ".methods.welore"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        if _LAZY[name] == ".registry":
            importlib.import_module(".methods", __name__)  # the methods register their names on import
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name], __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


if TYPE_CHECKING:  # what static analysis and IDEs see; at run time these come from __getattr__
    from . import loading
    from .configs import AdafactorConfig, Blockwise8bitConfig, MultiTensorConfig, parse_optim_args
    from .integrations.callbacks import WeLoreCallback
    from .integrations.transformers import is_registered, optimizer_cls_and_kwargs, register, unregister
    from .methods import q_galore, welore
    from .methods.flora import FloraAdafactor, FloraAdafactorLayerwise, FloraAdamW, FloraAdamWLayerwise, FloraConfig
    from .methods.galore import (
        GaLoreAdafactor,
        GaLoreAdafactorLayerwise,
        GaLoreAdamW,
        GaLoreAdamW8bit,
        GaLoreAdamW8bitLayerwise,
        GaLoreAdamWLayerwise,
        GaLoreConfig,
    )
    from .methods.q_galore import QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise, QGaLoreConfig
    from .methods.welore import WeLoreAdamW, WeLoreAdamW8bit, WeLoreConfig
    from .modules.int8_linear import Int8Linear
    from .modules.low_rank_linear import LowRankLinear
    from .optim import LowRankOptimizer
    from .registry import REGISTRY, OptimizerSpec, get_spec, register_optimizer
    from .targeting import TargetResolution, build_param_groups, resolve_target_modules

__all__ = [
    "REGISTRY",
    "AdafactorConfig",
    "Blockwise8bitConfig",
    "FloraAdafactor",
    "FloraAdafactorLayerwise",
    "FloraAdamW",
    "FloraAdamWLayerwise",
    "FloraConfig",
    "GaLoreAdafactor",
    "GaLoreAdafactorLayerwise",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdamW8bitLayerwise",
    "GaLoreAdamWLayerwise",
    "GaLoreConfig",
    "HfGaloreError",
    "Int8Linear",
    "InvalidConfigError",
    "LowRankLinear",
    "LowRankOptimizer",
    "MissingDependencyError",
    "MultiTensorConfig",
    "NoTargetModulesError",
    "NotAPlaceholderError",
    "OptimizerMismatchError",
    "OptimizerSpec",
    "QGaLoreAdamW8bit",
    "QGaLoreAdamW8bitLayerwise",
    "QGaLoreConfig",
    "TargetResolution",
    "UnknownOptimizerError",
    "UnsupportedSetupError",
    "UnsupportedTransformersVersionError",
    "WeLoreAdamW",
    "WeLoreAdamW8bit",
    "WeLoreCallback",
    "WeLoreConfig",
    "__version__",
    "build_param_groups",
    "get_spec",
    "is_registered",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "q_galore",
    "register",
    "register_optimizer",
    "resolve_target_modules",
    "unregister",
    "welore",
]

#: The program name of the `hf-galore` console script, as pip/setuptools launchers write `sys.argv[0]`.
_CONSOLE_SCRIPT = re.compile(r"hf-galore(-script\.pyw?|\.exe)?")


def _started_by_console_script() -> bool:
    """Whether this process is the `hf-galore` command line (the launcher imports us to reach `hf_galore.cli`).

    The command line reads our registry directly and never needs the names registered with transformers, and
    registering imports the Trainer (seconds). The launcher's `sys.argv[0]` is its own path when it imports
    `hf_galore.cli`, so that is how it is told apart; `python -m hf_galore.cli` registers as usual.
    """
    return bool(sys.argv) and _CONSOLE_SCRIPT.fullmatch(os.path.basename(sys.argv[0] or "")) is not None


# Old module paths of code that moved into `hf_galore/methods/` (True: warn, the path is deprecated).
install_module_aliases(
    {
        "hf_galore.q_galore": ("hf_galore.methods.q_galore", False),  # public short names, not deprecated
        "hf_galore.welore": ("hf_galore.methods.welore", False),
        "hf_galore.optim.galore": ("hf_galore.methods.galore.optimizer", True),
        "hf_galore.optim.flora": ("hf_galore.methods.flora.optimizer", True),
        "hf_galore.optim.q_galore": ("hf_galore.methods.q_galore.optimizer", True),
    }
)

if not _started_by_console_script():
    # The methods register their optim= names in `hf_galore.registry` (the command line imports them when a command
    # needs them, so its --help stays free of torch).
    from . import methods  # noqa: F401

if importlib.util.find_spec("transformers") is not None and not _started_by_console_script():
    from . import loading
    from .integrations.transformers import register

    register()
    loading.register_with_transformers()  # stock from_pretrained loads the Q-GaLore / WeLore formats
