"""Readers and writers that turn each data format into a :class:`PackedDataset`.

* :mod:`.qm9`: QM9 from the ``qm9pack`` CSVs (cached packed copy),
* :mod:`.md17`: sGDML/MD17 ``.npz`` files,
* :mod:`.iso17`: ISO17-layout ASE databases,
* :mod:`.ase_files`: anything ASE reads (xyz, extxyz, ASE db), and :func:`read_any`.

Every reader converts to eV / Angstrom / eV/Angstrom and records the units. The names
below are imported lazily, so ``python -m atomlens.data.sources.qm9`` runs cleanly and
reading one format does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QM9_TARGETS": "qm9",
    "load_qm9": "qm9",
    "read_qm9_csv": "qm9",
    "read_md17": "md17",
    "write_md17": "md17",
    "read_iso17": "iso17",
    "write_iso17": "iso17",
    "read_ase": "ase_files",
    "write_ase": "ase_files",
    "read_any": "ase_files",
}

__all__ = [
    "QM9_TARGETS",
    "load_qm9",
    "read_any",
    "read_ase",
    "read_iso17",
    "read_md17",
    "read_qm9_csv",
    "write_ase",
    "write_iso17",
    "write_md17",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
