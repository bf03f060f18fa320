"""Projection math in plain torch (imports nothing of hf_galore but its errors; never transformers or an optimizer).

* `subspace.py`: the projected side, the top-r bases of a gradient (randomized range finder or exact SVD), their
  signs, projection and back-projection (GaLore, Q-GaLore);
* `random.py`: seeded Gaussian projections, the same bits on every device (FLoRA);
* `quant.py`: group-wise INT8 / packed INT4 quantization (stored bases, Q-GaLore's INT8 weights);
* `spectrum.py`: normalised singular-value spectra and the global threshold (WeLore).
"""

from .subspace import (
    Side,
    add_projected_back_,
    canonicalize_signs,
    choose_side,
    compute_bases,
    left_basis,
    low_rank_shape,
    project,
    project_back,
)

__all__ = [
    "Side",
    "add_projected_back_",
    "canonicalize_signs",
    "choose_side",
    "compute_bases",
    "left_basis",
    "low_rank_shape",
    "project",
    "project_back",
]
