"""sGDML/MD17 ``.npz`` files: one molecule, many frames of an ab initio trajectory.

Keys: ``z`` (n,) atomic numbers, ``R`` (N, n, 3) positions, ``E`` (N,) or (N, 1) energies,
``F`` (N, n, 3) forces, and optionally ``r_unit``, ``e_unit``, ``f_unit`` strings. MD17's
convention is kcal/mol and Angstrom, but that is never assumed silently: a file without
unit keys needs ``energy_unit=`` and ``length_unit=`` (or ``assume_md17_units=True``).
Values are converted to eV and Angstrom on reading and back on writing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ...fileio import atomic_file
from ...units import check_force_unit, energy_factor, length_factor, resolve_unit
from ..dataset import MAX_Z, DataError, PackedDataset, refuse_what_layout_drops

#: MD17's units, for ``assume_md17_units=True``
MD17_UNITS = {"energy": "kcal/mol", "length": "Angstrom"}


def _scalar(value: np.ndarray):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _atomic_numbers(z, path: Path) -> np.ndarray:
    """``z`` as int64 atomic numbers; integers 1..118 (integer-valued floats too), else a
    :class:`DataError` naming ``path``: truncating 7.9 to 7 or wrapping 65537 would change
    the molecule silently."""
    z = np.asarray(z).ravel()
    if z.dtype.kind not in "iuf":  # text, bool, objects
        raise DataError(f"{path}: z must hold atomic numbers (integers), not dtype {z.dtype}")
    if not np.isfinite(z).all() or (z != np.round(z)).any():
        bad = z[~np.isfinite(z) | (z != np.round(z))][0]
        raise DataError(f"{path}: z must hold atomic numbers (integers), not {bad}")
    if ((z < 1) | (z > MAX_Z)).any():
        bad = z[(z < 1) | (z > MAX_Z)][0]
        raise DataError(f"{path}: z has {bad}, not an element (atomic numbers are 1..{MAX_Z})")
    return z.astype(np.int64)


def read_md17(
    path: str | os.PathLike,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    assume_md17_units: bool = False,
) -> PackedDataset:
    """Read an MD17/sGDML ``.npz`` into a :class:`PackedDataset` in eV and Angstrom.

    Args:
        path: the ``.npz`` file.
        energy_unit, length_unit: units of ``E`` and ``R`` when the file has no ``e_unit`` /
            ``r_unit`` keys (e.g. ``"kcal/mol"``, ``"Angstrom"``); if both the file and the
            caller give a unit they must agree. Forces are in ``f_unit``, else
            ``energy_unit/length_unit``.
        assume_md17_units: take kcal/mol and Angstrom for units the file does not state.

    Returns:
        Targets ``energy`` (per structure, eV) and ``forces`` (per atom, eV/Angstrom, if the
        file has ``F``); extras ``frame`` (index in the file); metadata keys of the file
        (``name``, ``theory``, ``md5``, ...) in ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # BadZipFile, EOFError, ValueError (pickled objects), ...
        raise DataError(
            f"{path}: not a readable MD17 .npz file, damaged or truncated "
            f"({type(err).__name__}: {err})"
        ) from err
    z = arrays.get("z", arrays.get("Z"))
    missing = [
        k for k, v in (("z", z), ("R", arrays.get("R")), ("E", arrays.get("E"))) if v is None
    ]
    if missing:
        raise DataError(f"{path}: MD17 file lacks the keys {missing} (has {sorted(arrays)})")
    z = _atomic_numbers(z, path)
    # real numbers only: text, bools (read as 1/0) and complex values (their imaginary
    # part dropped) are refused by name, as the extxyz reader refuses them
    for key in ("R", "E", "F"):
        dtype = arrays[key].dtype if key in arrays else None
        if dtype is not None and dtype.kind not in "iuf":
            raise DataError(
                f"{path}: {key} must hold real numbers, not dtype {dtype} ({dtype.kind!r})"
            )
    positions, energy = np.asarray(arrays["R"], np.float64), np.asarray(arrays["E"], np.float64)
    if positions.ndim != 3:
        raise DataError(f"{path}: R has shape {positions.shape}, expected (frames, {len(z)}, 3)")
    n_frames, n_atoms = positions.shape[0], len(z)
    if positions.shape != (n_frames, n_atoms, 3):
        raise DataError(
            f"{path}: R has shape {positions.shape}, expected ({n_frames}, "
            f"{n_atoms}, 3) for {n_atoms} atoms"
        )
    if energy.size != n_frames:
        raise DataError(f"{path}: E has {energy.size} values for {n_frames} frames")
    forces = arrays.get("F")
    if forces is not None and np.shape(forces) != positions.shape:
        raise DataError(f"{path}: F has shape {np.shape(forces)}, expected {positions.shape}")

    def unit(key: str, given: str | None, kind: str) -> str:
        stored = str(arrays[key]) if key in arrays else None
        try:
            chosen = resolve_unit(
                kind, stored, given, MD17_UNITS[kind] if assume_md17_units else None
            )
        except ValueError as err:
            raise DataError(f"{path}: {key}: {err}") from err
        if chosen is None:
            raise DataError(
                f"{path}: the file does not state its {kind} unit ({key}); pass "
                f"{kind}_unit=... (MD17 files use {MD17_UNITS[kind]!r}) or "
                f"assume_md17_units=True"
            )
        return chosen

    e_unit, r_unit = unit("e_unit", energy_unit, "energy"), unit("r_unit", length_unit, "length")
    f_unit = str(arrays["f_unit"]) if "f_unit" in arrays else f"{e_unit}/{r_unit}"
    try:
        e_factor, r_factor = energy_factor(e_unit), length_factor(r_unit)
        f_factor = check_force_unit(f_unit, e_unit, r_unit)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from err

    targets = {"energy": energy.reshape(n_frames) * e_factor}
    target_units = {"energy": "eV"}
    if forces is not None:
        targets["forces"] = np.asarray(forces, np.float64).reshape(-1, 3) * f_factor
        target_units["forces"] = "eV/Angstrom"
    skip = {"z", "Z", "R", "E", "F", "e_unit", "r_unit", "f_unit"}
    meta = {k: _scalar(v) for k, v in arrays.items() if k not in skip and np.asarray(v).size < 64}
    meta.update(
        source_file=path.name,
        source_units={"energy": e_unit, "positions": r_unit, "forces": f_unit},
    )
    dataset = PackedDataset(
        numbers=np.tile(z.astype(np.int16), n_frames),
        positions=positions.reshape(-1, 3) * r_factor,
        offsets=np.arange(n_frames + 1, dtype=np.int64) * n_atoms,
        targets=targets,
        units=target_units,
        extras={"frame": np.arange(n_frames, dtype=np.int64)},
        meta=meta,
    )
    dataset.validate(str(path))
    return dataset


def sgdml_md5(arrays: dict[str, np.ndarray]) -> str:
    """sGDML's dataset fingerprint: md5 over the md5 digests of z, R, E and F."""
    digest = hashlib.md5()
    for key in ("z", "R", "E", "F"):
        if key in arrays:
            digest.update(hashlib.md5(np.ascontiguousarray(arrays[key]).ravel()).digest())
    return digest.hexdigest()


def write_md17(
    path: str | os.PathLike,
    dataset: PackedDataset,
    energy_key: str = "energy",
    forces_key: str = "forces",
    energy_unit: str = "kcal/mol",
    length_unit: str = "Ang",
    **metadata,
) -> Path:
    """Write ``dataset`` (all structures the same molecule, same atom order) as an MD17 ``.npz``.

    Energies and forces are converted from eV to ``energy_unit`` and
    ``energy_unit/length_unit``; the units are stored in ``e_unit``, ``r_unit``, ``f_unit``.
    ``metadata`` (strings or numbers, e.g. ``name``, ``theory``, ``md_T``) is stored too.
    The file is written to a temporary name and renamed, so it is never half-written.
    Periodic structures and targets other than energy and forces (stress, ...) are
    refused: the layout would drop them.
    """
    refuse_what_layout_drops(path, dataset, "MD17 files", (energy_key, forces_key))
    counts = dataset.n_atoms_per
    n_frames, n_atoms = len(dataset), int(counts[0])
    numbers = np.asarray(dataset.numbers).reshape(-1)
    if (counts != n_atoms).any() or (numbers.reshape(n_frames, n_atoms) != numbers[:n_atoms]).any():
        raise DataError(
            f"{path}: MD17 files hold one molecule; the structures differ in "
            f"composition or atom order"
        )
    e_back = 1.0 / energy_factor(energy_unit)
    r_back = 1.0 / length_factor(length_unit)
    arrays = {
        "z": numbers[:n_atoms].astype(np.int64),
        "R": np.asarray(dataset.positions, np.float64).reshape(n_frames, n_atoms, 3) * r_back,
    }
    if energy_key in dataset.targets:
        arrays["E"] = np.asarray(dataset.targets[energy_key], np.float64).reshape(-1, 1) * e_back
    if forces_key in dataset.targets:
        arrays["F"] = np.asarray(dataset.targets[forces_key], np.float64).reshape(
            n_frames, n_atoms, 3
        ) * (e_back / r_back)
    arrays.update(
        {
            "r_unit": np.str_(length_unit),
            "e_unit": np.str_(energy_unit),
            "f_unit": np.str_(f"{energy_unit}/{length_unit}"),
            "type": np.str_("d"),
        }
    )
    for key, value in metadata.items():
        arrays[key] = np.str_(value) if isinstance(value, str) else np.asarray(value)
    arrays["md5"] = np.str_(sgdml_md5(arrays))
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)
