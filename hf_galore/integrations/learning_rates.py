"""`Trainer.get_learning_rates()` under transformers' own GaLore names, shown in transformers' grouping.

transformers' GaLore hands the optimizer two param groups, `[every other parameter, the targeted weights]`, so its
`get_learning_rates()` returns two values (its GaLore tests assert `[lr, lr]`). Our optimizers keep the Trainer's
decay/no-decay split, so they have up to three groups, projected weights first. Under the `galore_*` names the
Trainer's `get_learning_rates()` therefore reports one learning rate per transformers group: the plain parameters'
first, then the projected weights'. If groups of one kind carry different rates (a custom schedule per group), each
distinct rate of that kind is listed, in group order, so no rate is hidden. The param groups themselves, the
scheduler and the logged `learning_rate` (the first group's rate, all groups share one schedule) are untouched.
"""

from __future__ import annotations

from typing import Any


def _distinct(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if not any(value == other for other in seen):
            seen.append(value)
    return seen


def transformers_learning_rates(optimizer: Any) -> list[Any]:
    """Learning rates of `optimizer`'s param groups in transformers' GaLore layout: `[plain, projected]`.

    Args:
        optimizer (`torch.optim.Optimizer`): One of our optimizers (groups with `low_rank=True` are projected).

    Returns:
        `list`: the distinct rates of the plain groups, then those of the projected groups (`[lr, lr]` normally).
    """
    plain = [group["lr"] for group in optimizer.param_groups if not group.get("low_rank")]
    projected = [group["lr"] for group in optimizer.param_groups if group.get("low_rank")]
    return _distinct(plain) + _distinct(projected)
