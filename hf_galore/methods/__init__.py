"""The methods, one folder each with the same roles (as PEFT's `tuners/<method>/`):

* `config.py`: the method's validated dataclass(es), the only source of their defaults and ranges;
* `optimizer.py`: its optimizers, declared over the engines of `hf_galore.optim`;
* `transform.py`: its model transform, where it has one (Q-GaLore's INT8 surgery, WeLore's factorization);
* `spec.py`: its registration (`optim=` names, param groups, setup checks).

Importing this package registers every method's names in `hf_galore.registry`.
"""

# Registration order is the order of `hf-galore list` and of the names in error messages.
from . import galore, welore, q_galore, flora  # noqa: I001

__all__ = ["flora", "galore", "q_galore", "welore"]
