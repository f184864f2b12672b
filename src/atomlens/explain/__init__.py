"""Explanations of unmodified PyTorch models: rules attached by hooks, selected by name.

>>> from atomlens.explain import explain, fit_patterns
>>> patterns = fit_patterns(model, train_loader)
>>> relevance = explain(model, x, "patternattribution", target=3, patterns=patterns)

Methods (:data:`METHODS`): gradient, gradient_x_input, integrated_gradients, smoothgrad,
deconvnet, guided_backprop, lrp_epsilon, lrp_alphabeta, lrp_alpha2_beta1, patternnet,
patternattribution. See ``docs/explain.md``.

Whole molecular models (SchNet, DTNN): :func:`explain_molecule` gives atom, pair and
three-body relevances and relevant walks (:data:`MOLECULE_METHODS`).
"""

from .canonizers import canonized, merged_batchnorm
from .graph import fit_molecule_patterns
from .methods import METHODS, Explainer, Method, explain
from .molecular import explain_atomwise
from .molecules import MOLECULE_METHODS, MoleculeExplanation, explain_molecule
from .patterns import Patterns, PatternStatistics, fit_patterns
from .perturbation import PerturbationResult, perturbation_curve
from .quality import ESTIMATORS, quality_table, signal_quality
from .rules import Composite, Rule

__all__ = [
    "ESTIMATORS",
    "METHODS",
    "MOLECULE_METHODS",
    "Composite",
    "Explainer",
    "Method",
    "MoleculeExplanation",
    "PatternStatistics",
    "Patterns",
    "PerturbationResult",
    "Rule",
    "canonized",
    "explain",
    "explain_atomwise",
    "explain_molecule",
    "fit_molecule_patterns",
    "fit_patterns",
    "merged_batchnorm",
    "perturbation_curve",
    "quality_table",
    "signal_quality",
]
