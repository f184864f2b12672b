"""What :meth:`AtomisticModel.predict` returns: plain float64 numpy arrays that know their units."""

from __future__ import annotations

import numpy as np


class Prediction(dict):
    """``{name: numpy float64 array}`` plus ``units`` (``{name: unit}``, ASE conventions).

    For an energy model: ``prediction["energy"]`` (n_structures,) eV,
    ``prediction["atomic"]`` (n_atoms,) eV (atomic contributions, summing to the energy),
    ``prediction["forces"]`` (n_atoms, 3) eV/Angstrom. No autograd graph is attached.
    """

    def __init__(self, values: dict, units: dict[str, str]):
        super().__init__({k: np.asarray(v, dtype=np.float64) for k, v in values.items()})
        self.units = dict(units)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}: {v.shape} {self.units.get(k, '')}".rstrip() for k, v in self.items()
        )
        return f"Prediction({parts})"
