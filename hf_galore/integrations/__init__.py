"""Integrations with transformers: with `hf_galore.loading`, the only code that touches its internals.

* `transformers.py`: registration of the `optim=` names with `TrainingArguments`/`Trainer` ([`register`],
  [`unregister`]), the Trainer hooks and [`optimizer_cls_and_kwargs`];
* `callbacks.py`: the `TrainerCallback`s (layer-wise gradient norm and hook removal, [`WeLoreCallback`]);
* `learning_rates.py`: the grouping `Trainer.get_learning_rates()` shows for transformers' own names.

Sits above the methods (it imports `hf_galore.methods`, which registers their names); only the package's
`__init__` imports it.
"""

from .transformers import is_registered, optimizer_cls_and_kwargs, register, unregister

__all__ = ["is_registered", "optimizer_cls_and_kwargs", "register", "unregister"]
