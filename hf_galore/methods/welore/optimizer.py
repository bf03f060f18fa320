"""WeLore's optimizers: AdamW over the parameters the LRC/N-LRC split leaves trainable (the LRC factors and the
opted-in norms, biases, embeddings and heads). Nothing is projected: the low rank is in the model (two factors per
LRC), not in the optimizer.
"""

from __future__ import annotations

from typing import ClassVar

from ...optim.adamw import LowRankAdamW, LowRankAdamW8bit


class WeLoreAdamW(LowRankAdamW):
    """`torch.optim.AdamW` (fp32 moments) over a WeLore-split model's trainable parameters; no projected groups.

    Args:
        params (`Iterable`): Parameters or param groups.
        lr (`float`, defaults to 1e-3), betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to 1e-8), weight_decay (`float`, defaults to 0.0): As `torch.optim.AdamW`.
        foreach (`bool`, defaults to `True`): Batch the elementwise work of a group (see [`MultiTensorConfig`]).
    """

    #: The split decides which parameters exist and train; a model built from a config has no spectra to split.
    memory_estimate_unsupported: ClassVar[str | None] = (
        "its LRC/N-LRC split depends on the weights' singular values, which a meta-device model does not have; "
        "run `hf-galore welore analyze MODEL_DIR` for WeLore's memory report instead"
    )

    #: Its checkpoints were written as `GaLoreAdamW` before WeLore had optimizer classes of its own (same layout).
    legacy_state_kinds: ClassVar[tuple[str, ...]] = ("GaLoreAdamW",)


class WeLoreAdamW8bit(LowRankAdamW8bit):
    """[`WeLoreAdamW`] with both moments stored 8-bit blockwise (see [`Blockwise8bitConfig`])."""

    memory_estimate_unsupported: ClassVar[str | None] = WeLoreAdamW.memory_estimate_unsupported
    legacy_state_kinds: ClassVar[tuple[str, ...]] = ("GaLoreAdamW8bit",)
