"""Inference over datasets, outside any training framework, and where a model lives.

:func:`predict_dataset` runs a model over packed-dataset structures in batches (training
statistics, evaluation, insight analyses and benchmarks all use it);
:func:`model_device_dtype` is the device and floating-point type of a model's parameters,
which inputs must be moved to.

Long predictions show a progress bar with the remaining time (tqdm, on a terminal) and may
be bounded by a wall-clock ``deadline`` (``time.monotonic()`` seconds): they then stop after
the batch that crosses it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.dataset import PackedDataset, make_loader
from .potential import AtomisticModel


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s (first) parameter: where its inputs must go."""
    p = next(model.parameters())
    return p.device, p.dtype


def predict_dataset(
    model: AtomisticModel,
    data: PackedDataset,
    indices: np.ndarray,
    batch_size: int = 100,
    forces: bool = False,
    progress: bool | None = None,
    deadline: float | None = None,
    description: str = "predict",
    stress: bool = False,
) -> dict[str, np.ndarray]:
    """Predictions for ``indices`` in order: ``{target: (n,), "atomic": (n_atoms,), "forces",
    "stress"}`` in the model's units (eV, eV/Angstrom, eV/Angstrom^3 for energy models).

    ``progress``: a progress bar (``None``: only on a terminal). ``deadline``: stop after
    the batch during which ``time.monotonic()`` passes it; the arrays then hold the first
    ``n < len(indices)`` structures.
    """
    device, dtype = model_device_dtype(model)
    parts: dict[str, list] = {}
    loader = make_loader(data, indices, batch_size, model.cutoff, shuffle=False, dtype=dtype)
    with tqdm(
        total=len(indices),
        desc=description,
        unit="structure",
        leave=False,
        disable=None if progress is None else not progress,
    ) as bar:
        for batch in loader:
            batch = batch.to(device)
            with torch.set_grad_enabled(forces or stress):
                out = model(batch, forces=forces, stress=stress)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.detach().cpu().numpy())
            bar.update(batch.n_structures)
            if deadline is not None and time.monotonic() >= deadline:
                break
    return {k: np.concatenate(v) for k, v in parts.items()}


def predict_in_chunks(predict, frames: list, chunk: int = 1000, **options) -> dict:
    """``predict(frames, **options)`` over ``chunk`` structures at a time (bounded memory, a
    progress bar on a terminal); the same arrays as one call on all of them.

    ``predict`` is :meth:`AtomisticModel.predict` or any function with its signature that
    returns ``{name: array}`` with structures or atoms along the first axis.
    """
    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, not {chunk}")
    parts: dict[str, list] = {}
    with tqdm(
        total=len(frames), desc="predict", unit="structure", leave=False, disable=None
    ) as bar:
        for start in range(0, len(frames), chunk):
            for key, value in predict(frames[start : start + chunk], **options).items():
                parts.setdefault(key, []).append(value)
            bar.update(min(chunk, len(frames) - start))
    return {key: np.concatenate(values) for key, values in parts.items()}
