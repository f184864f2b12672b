"""Optional dependencies: one place that names the extra which installs each of them.

The core of atomlens (models, training, prediction, MD, insight figures) needs only what
``pip install atomlens`` brings. Packages that serve one subcommand are extras::

    pip install "atomlens[qm9]"      # qm9pack: the QM9 data set (224 MB)
    pip install "atomlens[sample]"   # tblite + rdkit: ab initio sampling, SMILES, rings
    pip install "atomlens[explain]"  # scikit-learn: the 8x8 digits of `atomlens explain`
    pip install "atomlens[tensorboard]"  # TensorBoard event files beside the CSV log
    pip install "atomlens[all]"      # all of the above
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: module -> (distribution on PyPI, extra that installs it)
EXTRAS = {
    "qm9pack": ("qm9pack", "qm9"),
    "tblite": ("tblite", "sample"),
    "rdkit": ("rdkit", "sample"),
    "sklearn": ("scikit-learn", "explain"),
    "tensorboard": ("tensorboard", "tensorboard"),
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def _error(module: str, purpose: str) -> MissingExtra:
    top = module.split(".")[0]
    distribution, extra = EXTRAS[top]
    return MissingExtra(
        f"{purpose} needs the package {distribution!r}, which is not installed: "
        f'pip install "atomlens[{extra}]" (or pip install {distribution})',
        name=top,
    )


def available(module: str) -> bool:
    """Whether ``module`` can be imported (located without running it)."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"rdkit.Chem"``) or raise :class:`MissingExtra` naming its extra.

    ``purpose`` says what needs it, e.g. ``"atomlens sample --smiles"``.
    """
    if not available(module):
        raise _error(module, purpose)
    return importlib.import_module(module)


def require_installed(module: str, purpose: str) -> None:
    """Like :func:`require`, without importing (for packages read as data files only)."""
    if not available(module):
        raise _error(module, purpose)
