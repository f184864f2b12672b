"""Gaussian cube files for 3D potential maps, written and read with ASE (``ase.io.cube``).

A cube file stores values on a grid ``origin + i a + j b + k c``; ASE derives the step vectors
from ``atoms.cell[i] / n_i``, so the cell is set to the grid's extent before writing. Cube
readers (VMD, Avogadro, ...) assume atomic units: lengths are bohr (ASE converts) and the
values are written in hartree, as the comment line says; :func:`read_cube` returns eV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_file
from ..units import HARTREE_EV
from .potential_map import PotentialMap

#: the comment line of every cube file written here starts with this
TITLE = "atomlens local chemical potential, values in hartree (atomic units)"


def write_cube(
    path: str | Path, potential: PotentialMap, comment: str | None = None, unit: str = "eV"
) -> Path:
    """Write a 3D :class:`PotentialMap` (``plane=None``) to a Gaussian cube file: values in
    hartree (converted from ``unit``, the model's energy unit), lengths in bohr."""
    from ase.io.cube import write_cube as ase_write_cube

    from ..units import energy_factor

    if potential.values.ndim != 3:
        raise ValueError("a cube file needs a 3D map (potential_map(..., plane=None))")
    atoms = potential.atoms.copy()
    atoms.cell = potential.axes * np.asarray(potential.values.shape)[:, None]
    atoms.pbc = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if comment is None:
        comment = (
            f"Omega_{potential.probe}(r) in hartree (1 Eh = {HARTREE_EV} eV), "
            f"reference={potential.reference}, lengths in bohr"
        )
    with atomic_file(path) as tmp, open(tmp, "w") as fh:  # whole or absent
        ase_write_cube(
            fh,
            atoms,
            data=potential.values * (energy_factor(unit) / HARTREE_EV),
            origin=potential.origin,
            comment=f"{TITLE}; {comment}",
        )
    return path


def read_cube(path: str | Path) -> dict:
    """Read a cube file: ``{"data", "atoms", "origin", "spacing"}`` (Angstrom).

    ``data`` is in eV when the comment line says hartree (files written by
    :func:`write_cube`), else as stored.
    """
    from ase.io.cube import read_cube as ase_read_cube

    with open(path) as fh:
        doc = ase_read_cube(fh)
    atoms, data = doc["atoms"], doc["data"]
    with open(path) as fh:
        if "hartree" in fh.readline():
            data = data * HARTREE_EV
    return {
        "data": data,
        "atoms": atoms,
        "origin": np.asarray(doc["origin"]),
        "spacing": np.asarray(atoms.cell) / np.asarray(data.shape)[:, None],
    }
