"""Exception hierarchy of hf_galore.

Every error subclasses [`HfGaloreError`] *and* the builtin it refines, so callers that already catch `ValueError`,
`RuntimeError` or `ImportError` keep working.
"""

from __future__ import annotations


class HfGaloreError(Exception):
    """Base class of every error raised by hf_galore."""


class InvalidConfigError(HfGaloreError, ValueError):
    """A configuration value (an `optim_args` key, a config field, a param-group key) is invalid."""


class UnknownOptimizerError(HfGaloreError, ValueError):
    """An `optim=` name is neither one of ours nor one of transformers'."""


class NoTargetModulesError(HfGaloreError, ValueError):
    """`optim_target_modules` matched no trainable `nn.Linear` module of the model."""


class UnsupportedSetupError(HfGaloreError, RuntimeError):
    """A combination of settings (e.g. layer-wise + gradient accumulation) that is not supported yet."""


class NotAPlaceholderError(HfGaloreError, AttributeError):
    """Code asked a layer-wise optimizer for an attribute of transformers' placeholder (`optimizer_dict`).

    An `AttributeError`, so `hasattr(optimizer, "optimizer_dict")` stays False, as for any real optimizer.
    """


class OptimizerMismatchError(HfGaloreError, RuntimeError):
    """The Trainer built another optimizer than the one its `optim=` name registers (no silent fallback)."""


class MissingDependencyError(HfGaloreError, ImportError):
    """An optional dependency needed by the chosen optimizer is not installed."""


class UnsupportedTransformersVersionError(HfGaloreError, RuntimeError):
    """The installed transformers does not expose the internals hf_galore registers into."""
