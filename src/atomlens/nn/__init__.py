"""Building blocks shared by the representations, one file per idea: activations, radial
bases, cutoffs, scatter sums, pair geometry, Hermite tables, the fused cfconv kernels,
dense layers on oneDNN."""

from __future__ import annotations

from .activations import LN2, ShiftedSoftplus, activation, shifted_softplus
from .cfconv import cfconv_symmetric, cfconv_tabulated
from .cutoff import CosineCutoff
from .hermite import hermite_coefficients, hermite_lookup
from .linear import Linear
from .radial import GaussianRBF
from .scatter import scatter_sum

__all__ = [
    "LN2",
    "CosineCutoff",
    "GaussianRBF",
    "Linear",
    "ShiftedSoftplus",
    "activation",
    "cfconv_symmetric",
    "cfconv_tabulated",
    "hermite_coefficients",
    "hermite_lookup",
    "scatter_sum",
    "shifted_softplus",
]
