"""Gaussian cube files for 3D potential maps, written and read with ASE (``ase.io.cube``).

A cube file stores values on a grid ``origin + i a + j b + k c``; ASE derives the step vectors
from ``atoms.cell[i] / n_i``, so the cell is set to the grid's extent before writing. Units in
the file are bohr (ASE converts); values are written as they are (eV here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .potential_map import PotentialMap


def write_cube(path: str | Path, potential: PotentialMap, comment: str | None = None) -> Path:
    """Write a 3D :class:`PotentialMap` (``plane=None``) to a Gaussian cube file."""
    from ase.io.cube import write_cube as ase_write_cube

    if potential.values.ndim != 3:
        raise ValueError("a cube file needs a 3D map (potential_map(..., plane=None))")
    atoms = potential.atoms.copy()
    atoms.cell = potential.axes * np.asarray(potential.values.shape)[:, None]
    atoms.pbc = False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if comment is None:
        comment = (f"atomlens local chemical potential Omega_{potential.probe} (eV), "
                   f"reference={potential.reference}")
    with open(path, "w") as fh:
        ase_write_cube(fh, atoms, data=potential.values, origin=potential.origin,
                       comment=comment)
    return path


def read_cube(path: str | Path) -> dict:
    """Read a cube file: ``{"data", "atoms", "origin", "spacing"}`` (Angstrom)."""
    from ase.io.cube import read_cube as ase_read_cube

    with open(path) as fh:
        doc = ase_read_cube(fh)
    atoms, data = doc["atoms"], doc["data"]
    return {"data": data, "atoms": atoms, "origin": np.asarray(doc["origin"]),
            "spacing": np.asarray(atoms.cell) / np.asarray(data.shape)[:, None]}
