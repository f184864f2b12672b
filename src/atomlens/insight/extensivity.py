"""Size extensivity: two copies of a molecule far apart have twice its energy.

    E(A + A') = 2 E(A)    when every atom of A is farther than the cutoff from every atom of A'

holds for a sum of atomic energies whose atoms see only neighbours within the cutoff (DTNN
with its cosine cutoff, SchNet). A model without a cutoff (NeurIPS SchNet) couples the copies at
any distance, and the check is expected to fail. For a periodic cell the two copies are the
supercell doubled along its first periodic axis (2 x 1 x 1 for a bulk cell, 1 x 2 x 1 for a
slab periodic in y and z), E(supercell) = 2 E(cell), at any cutoff.

The energies are computed in float64 (a copy of the model), so that the test resolves
differences far below the totals' float32 rounding: a QM9 total of ~10^4 eV rounds to
~10^-3 eV in float32, as large as a weak coupling of copies within the cutoff.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..models.potential import AtomisticModel


@dataclass
class ExtensivityResult:
    single: float  # E(A), model unit
    pair: float  # E(A + A')
    separation: float | None  # closest distance between the copies' atoms (None: a supercell)
    cutoff: float | None

    @property
    def difference(self) -> float:
        """E(A + A') - 2 E(A)."""
        return self.pair - 2.0 * self.single

    def passed(self, tolerance: float = 1e-9) -> bool:
        """|E(A + A') - 2 E(A)| within ``tolerance`` of |E(A + A')| (float64 energies)."""
        return abs(self.difference) <= tolerance * max(1.0, abs(self.pair))


def two_copies(atoms, separation: float):
    """``atoms`` plus a copy shifted along x, every inter-copy distance at least ``separation``."""
    pos = atoms.get_positions()
    copy = atoms.copy()
    width = pos[:, 0].max() - pos[:, 0].min()
    shift = width + separation
    copy.positions += np.array([shift, 0.0, 0.0])
    return atoms + copy


def extensivity(
    model: AtomisticModel,
    atoms,
    separation: float | None = None,
    allow_unknown_elements: bool = False,
) -> ExtensivityResult:
    """E(A), E(A + A') for two copies ``separation`` Angstrom apart (default: cutoff + 1), or
    for a periodic cell E(cell) and E(cell doubled along its first periodic axis), in float64.
    Elements absent from the model's training data are refused, unless
    ``allow_unknown_elements`` (a warning)."""
    model = copy.deepcopy(model).double()
    if atoms.pbc.any():
        if separation is not None:
            raise ValueError(
                "a periodic cell is checked against its supercell (doubled along its first "
                "periodic axis), not two "
                "copies apart: give no separation"
            )
        # doubled along its first periodic axis (a slab periodic in y and z: y; doubling a
        # direction that is not periodic would put the copy beside it, at the cell's spacing)
        repeat = [1, 1, 1]
        repeat[int(np.flatnonzero(atoms.pbc)[0])] = 2
        out = model.predict(
            [atoms, atoms.repeat(tuple(repeat))], allow_unknown_elements=allow_unknown_elements
        )
        energies = out[model.target].astype(np.float64)
        return ExtensivityResult(float(energies[0]), float(energies[1]), None, model.cutoff)
    if separation is None:
        if model.cutoff is None:
            raise ValueError("the model has no cutoff; give the separation explicitly")
        separation = model.cutoff + 1.0
    if not separation > 0:
        raise ValueError(f"the separation must be positive, not {separation} Angstrom")
    dimer = two_copies(atoms, separation)
    out = model.predict([atoms, dimer], allow_unknown_elements=allow_unknown_elements)
    energies = out[model.target].astype(np.float64)
    n = len(atoms)
    d = np.linalg.norm(dimer.positions[:n, None] - dimer.positions[None, n:], axis=-1)
    return ExtensivityResult(float(energies[0]), float(energies[1]), float(d.min()), model.cutoff)
