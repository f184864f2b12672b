"""Evaluation of a trained model on a split, outside any training framework."""

from __future__ import annotations

import numpy as np
import torch

from ..data.dataset import PackedDataset, make_loader
from ..models.potential import AtomisticModel


def predict_dataset(model: AtomisticModel, data: PackedDataset, indices: np.ndarray,
                    batch_size: int = 100, forces: bool = False, stress: bool = False
                    ) -> dict[str, np.ndarray]:
    """Predictions for ``indices`` in order: ``{target: (n,), "atomic": (n_atoms,), "forces",
    "stress"}``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    parts: dict[str, list] = {}
    loader = make_loader(data, indices, batch_size, model.cutoff, shuffle=False, dtype=dtype)
    for batch in loader:
        batch = batch.to(device)
        with torch.set_grad_enabled(forces or stress):
            out = model(batch, forces=forces, stress=stress)
        for key, value in out.items():
            parts.setdefault(key, []).append(value.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model: AtomisticModel, data: PackedDataset, indices: np.ndarray,
             batch_size: int = 100, forces: bool = False, stress: bool = False
             ) -> dict[str, float]:
    """MAE and RMSE of the target (and forces, stress) on ``indices``, in internal units."""
    pred = predict_dataset(model, data, indices, batch_size, forces, stress)
    target = model.target
    ref = np.asarray(data.targets[target])[indices]
    err = pred[target] - ref
    metrics = {f"{target}_mae": float(np.abs(err).mean()),
               f"{target}_rmse": float(np.sqrt((err**2).mean()))}
    if forces:
        atoms = data.atom_index(np.asarray(indices))
        ferr = pred["forces"] - np.asarray(data.targets["forces"])[atoms]
        metrics["forces_mae"] = float(np.abs(ferr).mean())
        metrics["forces_rmse"] = float(np.sqrt((ferr**2).mean()))
    if stress:
        serr = pred["stress"] - np.asarray(data.targets["stress"])[indices]
        metrics["stress_mae"] = float(np.abs(serr).mean())
        metrics["stress_rmse"] = float(np.sqrt((serr**2).mean()))
    return metrics
