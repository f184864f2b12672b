"""The names of atomlens's representations, readable without importing torch.

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
