"""Checks on what a trained model is asked and what it answers.

A model knows the elements of its training data (stored in its metadata at save as
``elements``, atomic numbers); a structure with another element gets a prediction that
means nothing (its embedding was never trained), so it is refused, or let through with a
warning when the caller allows it. Outputs are checked to be finite, so broken weights or
a structure far outside the training range give an error instead of ``energy = nan``.
"""

from __future__ import annotations

import warnings

import numpy as np
from ase.data import chemical_symbols

from ..data.dataset import DataError


def training_elements(model) -> list[int] | None:
    """Atomic numbers the model was trained on, or None when not recorded (older models)."""
    elements = (getattr(model, "metadata", None) or {}).get("elements")
    return None if elements is None else sorted(int(z) for z in elements)


def _symbols(numbers) -> str:
    return ", ".join(
        chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}" for z in numbers
    )


def check_elements(model, numbers, allow_unknown: bool = False, source: str = "input") -> None:
    """Refuse elements beyond the model's embedding (``max_z``; the compiled kernels gather
    rows without bounds checks), and refuse (or, with ``allow_unknown``, warn about) elements
    absent from the training data."""
    numbers = np.asarray(numbers)
    max_z = model.config.max_z
    if len(numbers) and numbers.max() > max_z:
        raise DataError(
            f"{source}: element Z={int(numbers.max())} is beyond the model's max_z={max_z}"
        )
    known = training_elements(model)
    if known is None:
        return
    unknown = sorted(set(np.unique(np.asarray(numbers)).tolist()) - set(known))
    if not unknown:
        return
    message = (
        f"{source}: element(s) {_symbols(unknown)} never seen in training (the model "
        f"knows {_symbols(known)}); predictions for them are meaningless extrapolation"
    )
    if allow_unknown:
        warnings.warn(message, stacklevel=3)
        return
    raise DataError(
        f"{message}. Pass --allow-unknown-elements (allow_unknown_elements=True) to predict anyway"
    )


def refuse_unknown_elements(models, frames, source: str) -> None:
    """Refuse the elements of ``frames`` (ASE ``Atoms``) that any of ``models`` never saw,
    naming ``source`` (the file the user gave): a command checks its input up front."""
    numbers = np.unique(np.concatenate([atoms.numbers for atoms in frames]))
    for model in models:
        check_elements(model, numbers, False, source)


def check_finite(outputs: dict, source: str = "the model") -> None:
    """Raise ValueError when any output array holds NaN or inf."""
    bad = [name for name, value in outputs.items() if not np.isfinite(np.asarray(value)).all()]
    if bad:
        raise ValueError(
            f"{source}: non-finite (NaN/inf) {', '.join(bad)} predicted; the model "
            f"weights are broken or the structure is far outside the training "
            f"data"
        )


def require_extensive_energy(model, what: str) -> None:
    """Refuse a model whose output is no sum of atomic energies: ``what`` (atomic energies,
    probe energies, ring energies) reads its atomic contributions as energies that add up
    to the total. An intensive target (pooled by a mean, as QM9's HOMO) has contributions
    that do not add up to it, and a target in another unit (polarisability, dipole) no
    energies."""
    from ..units import ENERGY

    config = model.config
    if config.output != "scalar" or config.aggregation != "sum" or config.unit not in ENERGY:
        raise ValueError(
            f"{what} need an energy model whose energy is a sum of atomic energies; this "
            f"model predicts {model.target!r} in {config.unit!r}, pooled by a "
            f"{'sum' if config.aggregation == 'sum' else 'mean'} over atoms"
            f"{' (a dipole model)' if config.output == 'dipole' else ''}"
        )
