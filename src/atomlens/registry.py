"""Names the command line offers (representations, explanation methods), without torch.

``atomlens --help`` and the command-line choices need the names only; building a model
imports its class (:func:`atomlens.models.base.representation_class`). A new model is one
file under ``models/``, one line here, and one test class in ``tests/test_contract.py``.
"""

from __future__ import annotations

#: config name -> "module:Class" of a :class:`~atomlens.models.base.Representation`
REPRESENTATION_CLASSES = {
    "schnet": "atomlens.models.schnet:SchNet",
    "dtnn": "atomlens.models.dtnn:DTNN",
}


def representation_names() -> list[str]:
    """The registered names, for command-line choices, benchmarks and tests."""
    return sorted(REPRESENTATION_CLASSES)


#: the methods of :func:`atomlens.explain.explain_molecule`
MOLECULE_METHODS = (
    "gradient_x_input",
    "integrated_gradients",
    "lrp_epsilon",
    "lrp_gamma",
    "relevant_walks",
    "patternattribution",
    "many_body_expansion",
)
