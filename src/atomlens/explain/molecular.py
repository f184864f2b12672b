"""Explanations of an atomwise output head: per-atom features -> per-atom energies.

A head ``nn.Sequential(Linear, activation, Linear)`` maps the features of each atom,
``(n_atoms, F)``, to its energy contribution ``E_i``, ``(n_atoms, 1)``. Since every
atom's energy depends only on its own features, atoms are explained as a batch; the
relevance of atom ``i`` is the sum over its features, ``R_i = sum_f R_if``.

Smooth activations (the shifted softplus ``ssp(z) = ln(1 + e^z) - ln 2``, tanh) are
not piecewise linear, so no rule is exact for them. LRP-epsilon and PatternAttribution
pass them with the ratio gate ``ssp(z) / z`` (LRP's pass rule ``R_z = R_a``, which
keeps conservation; ``ssp'(0) = 1/2`` at ``z = 0``), and the two-component patterns
``a_+``/``a_-`` are fitted on ``z > 0``/``z <= 0`` since ``ssp`` lets negative
pre-activations through. Gradient x input and Integrated Gradients use the exact
derivative; Integrated Gradients is then complete (``sum_i R_i = E(x) - E(0)``) up
to quadrature error.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .methods import explain
from .patterns import Patterns, fit_patterns

ATOMWISE_METHODS = ("gradient_x_input", "integrated_gradients", "lrp_epsilon", "patternattribution")


def explain_atomwise(
    head: nn.Module,
    features: Tensor,
    method: str,
    patterns: Patterns | None = None,
    **options: Any,
) -> Tensor:
    """Per-atom relevance ``(n_atoms,)`` of the atomwise energies ``head(features)``.

    ``method`` is one of :data:`ATOMWISE_METHODS`. For ``"patternattribution"``
    without ``patterns``, the patterns are fitted on ``features`` themselves (better:
    fit them once with ``fit_patterns(head, training_features)``).
    """
    if method not in ATOMWISE_METHODS:
        raise ValueError(f"method must be one of {ATOMWISE_METHODS}")
    if method == "patternattribution" and patterns is None:
        patterns = fit_patterns(head, features)
    relevance = explain(head, features, method, target=0, patterns=patterns, **options)
    return relevance.sum(1)
