"""[`WeLoreConfig`]: WeLore's compression target and what trains after the split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...configs import OptionsMixin, check_condition


@dataclass
class WeLoreConfig(OptionsMixin):
    """Configuration of WeLore's one-shot weight compression and LRC fine-tuning (Jaiswal et al., 2024,
    arXiv:2407.11239).

    A single global threshold τ on the min–max normalised singular values of every targeted weight is solved so
    that the targeted weights lose `target_compression` of their parameters. Weights whose rank reduction exceeds
    `min_reduction` (and whose two factors are smaller than the dense weight) become Low-Rank Components (LRC, two
    trainable factors); the others are Non-Low-Rank Components (N-LRC), kept dense and frozen.

    These keys configure the model surgery, not the optimizer: `welore_adamw` is AdamW over whatever the split
    leaves trainable.

    Args:
        target_compression (`float`, defaults to 0.5):
            Fraction of the targeted weights' parameters to remove, in (0, 1). Measured in parameters (a rank-k
            factor pair of an m×n weight holds k(m+n) values), not in ranks; the rank view is reported too.
        min_reduction (`float`, defaults to 0.5):
            A weight is an LRC when its rank reduction (pruned ranks / min(m, n)) exceeds this, in [0, 1). 0.5 is the
            paper's fine-tuning setting (a square matrix's two factors start to save memory there). A weight whose
            factors would not be smaller than the dense matrix always stays N-LRC, whatever this value.
        train_norms (`bool`, defaults to `False`):
            Also train LayerNorm/RMSNorm weights (the paper's continual fine-tuning does; frozen here unless asked).
        train_biases (`bool`, defaults to `False`):
            Also train biases outside the heads, including those of N-LRC Linears (BitFit-style).
        train_embeddings (`bool`, defaults to `False`):
            Also train the input/position/token-type embeddings.
        train_heads (`bool`, defaults to `False`):
            Also train the output head / task classifier (`lm_head`, `classifier.*`, `score`, ...). Set it when the
            head is freshly initialised for a new task. Heads are never compressed.
    """

    section: ClassVar[str] = "WeLore split"
    #: The keys describe model surgery: `configs.optimizer_kwargs` (what `builder.plan_optimizer` passes to the optimizer) leaves them out.
    optimizer_kwargs: ClassVar[bool] = False

    target_compression: float = field(
        default=0.5, metadata={"help": "Fraction of the targeted weights' parameters to remove, in (0, 1)."}
    )
    min_reduction: float = field(
        default=0.5, metadata={"help": "Rank-reduction ratio above which a weight becomes a trainable LRC."}
    )
    train_norms: bool = field(default=False, metadata={"help": "Also train LayerNorm/RMSNorm weights."})
    train_biases: bool = field(default=False, metadata={"help": "Also train biases outside the heads."})
    train_embeddings: bool = field(default=False, metadata={"help": "Also train the embeddings."})
    train_heads: bool = field(default=False, metadata={"help": "Also train the output head / classifier."})

    def __post_init__(self) -> None:
        check_condition(
            isinstance(self.target_compression, (int, float)) and 0.0 < self.target_compression < 1.0,
            f"target_compression must be in the open interval (0, 1), got {self.target_compression!r}. "
            "It is the fraction of the targeted weights' parameters to remove, e.g. target_compression=0.5.",
        )
        check_condition(
            isinstance(self.min_reduction, (int, float)) and 0.0 <= self.min_reduction < 1.0,
            f"min_reduction must be in [0, 1), got {self.min_reduction!r}. It is the rank-reduction ratio above "
            "which a weight becomes a trainable LRC, e.g. min_reduction=0.5 (the paper's value).",
        )
