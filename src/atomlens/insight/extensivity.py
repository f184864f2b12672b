"""Size extensivity: two copies of a molecule far apart have twice its energy.

    E(A + A') = 2 E(A)    when every atom of A is farther than the cutoff from every atom of A'

holds for a sum of atomic energies whose atoms see only neighbours within the cutoff (DTNN
with its cosine cutoff, SchNet). A model without a cutoff (NeurIPS SchNet) couples the copies at
any distance, and the check is expected to fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..models.potential import AtomisticModel


@dataclass
class ExtensivityResult:
    single: float  # E(A), model unit
    pair: float  # E(A + A')
    separation: float  # closest distance between atoms of the two copies (Angstrom)
    cutoff: float | None

    @property
    def difference(self) -> float:
        """E(A + A') - 2 E(A)."""
        return self.pair - 2.0 * self.single

    def passed(self, tolerance: float = 1e-6) -> bool:
        return abs(self.difference) <= tolerance * max(1.0, abs(self.pair))


def two_copies(atoms, separation: float):
    """``atoms`` plus a copy shifted along x, every inter-copy distance at least ``separation``."""
    pos = atoms.get_positions()
    copy = atoms.copy()
    width = pos[:, 0].max() - pos[:, 0].min()
    shift = width + separation
    copy.positions += np.array([shift, 0.0, 0.0])
    return atoms + copy


def extensivity(model: AtomisticModel, atoms, separation: float | None = None) -> ExtensivityResult:
    """E(A), E(A + A') for two copies ``separation`` Angstrom apart (default: cutoff + 1)."""
    if separation is None:
        if model.cutoff is None:
            raise ValueError("the model has no cutoff; give the separation explicitly")
        separation = model.cutoff + 1.0
    dimer = two_copies(atoms, separation)
    out = model.predict([atoms, dimer])
    energies = out[model.target].astype(np.float64)
    n = len(atoms)
    d = np.linalg.norm(dimer.positions[:n, None] - dimer.positions[None, n:], axis=-1)
    return ExtensivityResult(float(energies[0]), float(energies[1]), float(d.min()), model.cutoff)
