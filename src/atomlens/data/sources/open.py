"""One resolver for every dataset spec the library and the command line accept.

=================  =========================================================
spec               meaning
=================  =========================================================
``qm9``            the QM9 set from ``qm9pack`` (cached packed copy)
``qm9:N``          the QM9 molecule with QM9 index ``N`` alone
a folder           a packed atomlens dataset (``meta.json`` + ``.npy`` files)
a file             by kind: MD17 ``.npz``, ISO17-layout or ASE ``.db``, anything
                   ASE reads (extxyz, xyz, traj, ...); see :func:`read_any`
=================  =========================================================

:func:`open_structures` resolves a structure spec (the ASE ``Atoms`` of a file, or
``qm9:N``) the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..dataset import DataError, PackedDataset


def open_dataset(
    spec: str, energy_unit: str | None = None, length_unit: str | None = None
) -> PackedDataset:
    """The dataset named by ``spec`` (see the module doc); units for files that need them."""
    spec = str(spec)
    if spec == "qm9" or spec.startswith("qm9:") or Path(spec).is_dir():
        data = _recorded(spec)
        _check_declared(data, spec, energy_unit, length_unit)
        return data
    from .ase_files import read_any

    units = {k: v for k, v in (("energy_unit", energy_unit), ("length_unit", length_unit)) if v}
    return read_any(spec, **units)


def _check_declared(
    data: PackedDataset, spec: str, energy_unit: str | None, length_unit: str | None
) -> None:
    """Units declared for data that record their own (a packed folder, QM9) must be those:
    a declaration that disagrees was silently ignored before (``--energy-unit hartree``
    on a folder in eV)."""
    from ...units import ENERGY, resolve_unit

    try:
        if length_unit is not None:
            resolve_unit("length", data.units.get("positions", "Angstrom"), length_unit)
        if energy_unit is not None:
            for unit in sorted({u for u in data.units.values() if u in ENERGY}):
                resolve_unit("energy", unit, energy_unit)
    except ValueError as err:
        raise DataError(f"{spec}: {err} (these data record their units: declare none)") from None


def _recorded(spec: str) -> PackedDataset:
    """QM9, one QM9 molecule, or a packed folder: data that record their units."""
    if spec == "qm9" or spec.startswith("qm9:"):
        from .qm9 import load_qm9

        data = load_qm9()
        if spec == "qm9":
            return data
        try:
            wanted = int(spec[4:])
        except ValueError:
            raise DataError(f"{spec}: expected qm9:N with N an integer QM9 index") from None
        rows = np.nonzero(np.asarray(data.extras["index"]) == wanted)[0]
        if len(rows) == 0:
            raise DataError(f"{spec}: no QM9 molecule with index {wanted}")
        return data.subset(rows[:1])
    return PackedDataset.load(spec)


def open_structures(spec: str, index: str | int = ":") -> list:
    """ASE ``Atoms`` of a structure spec: the frames ``index`` (ASE syntax) of any file ASE
    reads, or the QM9 molecule ``qm9:N`` (N = QM9 index; ``index`` is then ignored).
    Frames that no model call accepts (non-finite or overlapping atoms) are refused here,
    naming the file."""
    spec = str(spec)
    if spec.startswith("qm9:"):
        return [open_dataset(spec).atoms(0)]
    from ..dataset import dataset_from_atoms
    from .ase_files import read_structures

    frames = read_structures(spec, index)
    dataset_from_atoms(frames, source=spec, targets=False)
    return frames
