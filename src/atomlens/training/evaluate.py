"""Evaluation of a trained model on a split: errors of the predictions of
:func:`atomlens.models.inference.predict_dataset` against the reference values.

Long evaluations show a progress bar with the remaining time (tqdm, on a terminal) and may
be bounded by a wall-clock ``deadline`` (``time.monotonic()`` seconds): they then stop after
the batch that crosses it and say how many structures were used.
"""

from __future__ import annotations

import numpy as np

from ..data.dataset import PackedDataset
from ..models.inference import predict_dataset
from ..models.potential import AtomisticModel


def bounded_subset(indices: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """At most ``limit`` of ``indices``, drawn at random (sorted); all of them if ``limit`` is
    ``None`` or not smaller. Splits are sorted by index, and QM9's index follows molecule
    size, so a prefix would be a biased sample."""
    indices = np.asarray(indices)
    if limit is None or limit >= len(indices):
        return indices
    if limit < 1:
        raise ValueError(f"a test subset needs at least one structure, not {limit}")
    return np.sort(np.random.default_rng(seed).choice(indices, size=limit, replace=False))


def predict_until(
    model: AtomisticModel,
    data: PackedDataset,
    indices: np.ndarray,
    batch_size: int,
    deadline: float | None,
    seed: int = 0,
    progress: bool | None = None,
    description: str = "predict",
    forces: bool = False,
    stress: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(indices predicted, predictions)`` of ``indices`` (:func:`predict_dataset`), up to
    the batch that passes ``deadline`` (``time.monotonic()``); with a deadline the
    structures are taken in a random order (``seed``), so those predicted are a random
    sample of ``indices``."""
    indices = np.asarray(indices)
    if deadline is not None:
        indices = np.random.default_rng(seed).permutation(indices)
    pred = predict_dataset(
        model,
        data,
        indices,
        batch_size,
        forces,
        progress,
        deadline,
        description=description,
        stress=stress,
    )
    return indices[: len(pred[model.target])], pred


def evaluate(
    model: AtomisticModel,
    data: PackedDataset,
    indices: np.ndarray,
    batch_size: int = 100,
    forces: bool = False,
    progress: bool | None = None,
    deadline: float | None = None,
    seed: int = 0,
    stress: bool = False,
    return_predictions: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """MAE and RMSE of the target (and forces, stress) on ``indices``, in internal units.

    ``n_evaluated`` in the result counts the structures used: fewer than ``len(indices)``
    only if ``deadline`` cut the evaluation short; the structures are then taken in a
    random order (``seed``), so those used are a random sample of ``indices``. With
    ``return_predictions`` also ``{"indices", "predicted", "reference"}`` of the target, in
    the order evaluated, with ``forces`` ``n_atoms`` (per structure) and
    ``forces_predicted``, ``forces_reference`` (the structures' atoms in that order), and
    with ``stress`` ``stress_predicted``, ``stress_reference`` (per structure).
    """
    indices, pred = predict_until(
        model, data, indices, batch_size, deadline, seed, progress, "evaluate", forces, stress
    )
    target = model.target
    n = len(indices)
    ref = np.asarray(data.targets[target])[indices]
    err = pred[target] - ref
    metrics = {
        f"{target}_mae": float(np.abs(err).mean()),
        f"{target}_rmse": float(np.sqrt((err**2).mean())),
        "n_evaluated": n,
    }
    if forces:
        atoms = data.atom_index(indices)
        ferr = pred["forces"] - np.asarray(data.targets["forces"])[atoms]
        metrics["forces_mae"] = float(np.abs(ferr).mean())
        metrics["forces_rmse"] = float(np.sqrt((ferr**2).mean()))
    if stress:
        serr = pred["stress"] - np.asarray(data.targets["stress"])[indices]
        metrics["stress_mae"] = float(np.abs(serr).mean())
        metrics["stress_rmse"] = float(np.sqrt((serr**2).mean()))
    if return_predictions:
        saved = {"indices": indices, "predicted": pred[target], "reference": ref}
        if forces:  # packed per atom, in the structures' evaluation order
            saved.update(
                n_atoms=data.n_atoms_per[indices],
                forces_predicted=pred["forces"],
                forces_reference=np.asarray(data.targets["forces"])[atoms],
            )
        if stress:
            saved.update(
                stress_predicted=pred["stress"],
                stress_reference=np.asarray(data.targets["stress"])[indices],
            )
        return metrics, saved
    return metrics


def relative_to_atomrefs(
    model: AtomisticModel, data: PackedDataset, indices: np.ndarray, batch_size: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Reference and predicted target of the structures ``indices``, each minus its sum of
    the model's fitted element references:

        y - sum_{i in structure} atomref[Z_i]          (the target's unit, eV for energies)

    A QM9 total energy (about -11,000 eV) hides meV errors on a parity plot; without the
    references the errors show. Returns ``(reference, predicted)``, both ``(len(indices),)``.
    """
    indices = np.asarray(indices)
    predicted = predict_dataset(model, data, indices, batch_size)[model.target]
    reference = np.asarray(data.targets[model.target])[indices]
    atomref = model.atomref.detach().cpu().double().numpy()
    per_atom = atomref[np.asarray(data.numbers)[data.atom_index(indices)]]
    starts = np.concatenate([[0], np.cumsum(data.n_atoms_per[indices])[:-1]])
    baseline = np.add.reduceat(per_atom, starts)
    return reference - baseline, predicted - baseline
