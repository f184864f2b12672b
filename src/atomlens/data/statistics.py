r"""Statistics fitted on the training split: atom references and the scale/shift of a target.

For an extensive target (an energy) the model predicts

.. math::  E_m = \sum_{i \in m} \left( \sigma \, \hat{e}_i + \mu + E^{\mathrm{ref}}_{Z_i} \right)

with per-element references :math:`E^{\mathrm{ref}}_Z` from :func:`fit_atomrefs` and the
per-atom shift :math:`\mu` and scale :math:`\sigma` of the residual from
:func:`residual_stats`. For an intensive target (HOMO, gap, dipole) no references are used
and :math:`\mu, \sigma` are the plain mean and standard deviation of the target.

A model trained on forces learns mostly from them, :math:`F = -\sigma \, \partial \hat{e} /
\partial R`, so there :math:`\sigma` is better set by the forces: the RMS force component
times 1 Angstrom (:func:`force_rms`, as MACE scales its potentials). On one molecule's MD
trajectory the residual standard deviation per atom is ~100 times smaller than that (aspirin:
0.012 eV against 1.17 eV/Angstrom), which makes the network's unit outputs tiny forces.

Everything is vectorised over the packed arrays; the data are never iterated in Python.
"""

from __future__ import annotations

import numpy as np

from .dataset import DataError, PackedDataset


def _structure_rows(dataset: PackedDataset, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each atom in ``indices`` order, atomic number of that atom)."""
    atom = dataset.atom_index(indices)
    counts = dataset.offsets[indices + 1] - dataset.offsets[indices]
    rows = np.repeat(np.arange(len(indices)), counts)
    return rows, np.asarray(dataset.numbers[atom]).astype(np.int64)


def composition(dataset: PackedDataset, indices: np.ndarray, max_z: int = 100) -> np.ndarray:
    """Element counts, shape ``(len(indices), max_z + 1)``: entry [m, Z] = atoms of Z in m."""
    indices = _check_indices(dataset, indices)
    rows, z = _structure_rows(dataset, indices)
    if len(z) and z.max() > max_z:
        raise DataError(f"element Z={int(z.max())} exceeds max_z={max_z}")
    flat = np.bincount(rows * (max_z + 1) + z, minlength=len(indices) * (max_z + 1))
    return flat.reshape(len(indices), max_z + 1).astype(np.float64)


def _check_indices(dataset: PackedDataset, indices) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if len(indices) == 0:
        raise DataError("cannot fit statistics on an empty set of structures")
    if indices.min() < 0 or indices.max() >= len(dataset):
        raise DataError(f"indices out of range for a dataset of {len(dataset)} structures")
    return indices


def _structure_target(dataset: PackedDataset, indices: np.ndarray, target: str) -> np.ndarray:
    if target not in dataset.targets:
        raise DataError(f"target {target!r} not in the dataset (has {sorted(dataset.targets)})")
    if dataset.is_per_atom(target):
        raise DataError(f"target {target!r} is per atom; statistics need a per-structure target")
    return np.asarray(dataset.targets[target][indices], dtype=np.float64)


def fit_atomrefs(dataset: PackedDataset, indices, target: str, max_z: int = 100) -> np.ndarray:
    r"""Per-element reference values by least squares on the composition.

    Solves :math:`\min_{E^{\mathrm{ref}}} \sum_m (y_m - \sum_Z n_{mZ} E^{\mathrm{ref}}_Z)^2`
    over the structures ``indices``. Elements absent from them get 0. When compositions do
    not determine the references uniquely (e.g. one molecule's MD trajectory), the
    minimum-norm solution is returned; the residuals are then still centred.

    Returns:
        ``(max_z + 1,)`` float64 array in the target's unit (eV for energies), indexed by Z.
    """
    indices = _check_indices(dataset, indices)
    y = _structure_target(dataset, indices, target)
    counts = composition(dataset, indices, max_z)
    present = np.flatnonzero(counts.any(axis=0))
    solution, *_ = np.linalg.lstsq(counts[:, present], y, rcond=None)
    atomrefs = np.zeros(max_z + 1)
    atomrefs[present] = solution
    return atomrefs


def force_rms(dataset: PackedDataset, indices, target: str = "forces") -> float:
    r"""Root mean square of the force components of the structures ``indices``:
    :math:`\sqrt{\langle F_{i\alpha}^2 \rangle}` over their atoms and the three directions
    (eV/Angstrom)."""
    indices = _check_indices(dataset, indices)
    if target not in dataset.targets or not dataset.is_per_atom(target):
        raise DataError(f"the dataset has no per-atom {target!r} (has {sorted(dataset.targets)})")
    forces = np.asarray(dataset.targets[target], dtype=np.float64)[dataset.atom_index(indices)]
    return float(np.sqrt(np.mean(forces**2)))


def residual_stats(
    dataset: PackedDataset,
    indices,
    target: str,
    atomrefs: np.ndarray | None = None,
    per_atom: bool = True,
) -> tuple[float, float]:
    r"""Mean and standard deviation of the target after subtracting atom references.

    With ``per_atom=True`` (extensive targets) the residual
    :math:`r_m = y_m - \sum_{i \in m} E^{\mathrm{ref}}_{Z_i}` is divided by the atom count
    :math:`n_m` first, giving the per-atom shift and scale a sum-pooled model stores. With
    ``per_atom=False`` and ``atomrefs=None`` (intensive targets) it is the plain mean and
    standard deviation of the target. Units are the target's (per atom when ``per_atom``).
    """
    indices = _check_indices(dataset, indices)
    y = _structure_target(dataset, indices, target)
    if atomrefs is not None:
        atomrefs = np.asarray(atomrefs, dtype=np.float64)
        rows, z = _structure_rows(dataset, indices)
        if len(z) and z.max() >= len(atomrefs):
            raise DataError(
                f"element Z={int(z.max())} has no atom reference "
                f"(atomrefs cover Z < {len(atomrefs)})"
            )
        y = y - np.bincount(rows, weights=atomrefs[z], minlength=len(indices))
    if per_atom:
        y = y / (dataset.offsets[indices + 1] - dataset.offsets[indices])
    return float(y.mean()), float(y.std())
