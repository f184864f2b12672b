"""Anything ASE reads or writes (xyz, extxyz, ASE db, ...), plus :func:`read_any`.

Energies and forces are taken from each frame's calculator results (how ASE stores them
for extxyz and db files) or from ``atoms.info`` / ``atoms.arrays``, under the keys given.
Units are declared by the caller (default eV and Angstrom) and converted on reading.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ... import units
from ...fileio import atomic_file
from ..dataset import DataError, PackedDataset


def _value(atoms, key: str, per_atom: bool):
    """``key`` from the calculator results, else from ``info`` / ``arrays``; None if absent."""
    calc = atoms.calc
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    store = atoms.arrays if per_atom else atoms.info
    return store.get(key)


def read_ase(path: str | os.PathLike, energy_key: str = "energy", forces_key: str = "forces",
             energy_unit: str = "eV", length_unit: str = "Angstrom", index: str | int = ":",
             format: str | None = None) -> PackedDataset:
    """Read frames with :func:`ase.io.read` into a :class:`PackedDataset`.

    Args:
        path: any file ASE can read (format from the extension unless ``format`` is given).
        energy_key, forces_key: where energies and forces are stored.
        energy_unit, length_unit: units of the file (forces: ``energy_unit/length_unit``).
        index: which frames (ASE syntax: ``":"`` all, ``"::10"``, ``0``, ...).

    Returns:
        Targets ``energy`` (eV) and ``forces`` (eV/Angstrom) when every frame has them;
        frames where only some have a value are refused. Extras: ``frame`` (position in the
        file) and the scalar ``info`` entries all frames share.
    """
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        units.energy_factor(energy_unit), units.length_factor(length_unit)
    except ValueError as err:  # before reading a large file
        raise DataError(f"{path}: {err}") from err
    try:
        frames = read(str(path), index=index, format=format)
    except Exception as err:  # each ASE format raises its own errors for bad input
        raise DataError(f"{path}: ASE could not read the file, malformed or truncated "
                        f"({type(err).__name__}: {err})") from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DataError(f"{path}: no structures in the file")
    return pack_frames(frames, str(path), energy_key, forces_key, energy_unit, length_unit,
                       meta={"source_file": path.name})


def pack_frames(frames, source: str = "<atoms>", energy_key: str | None = "energy",
                forces_key: str | None = "forces", energy_unit: str = "eV",
                length_unit: str = "Angstrom", force_unit: str | None = None,
                meta: dict | None = None) -> PackedDataset:
    """ASE ``Atoms`` -> :class:`PackedDataset`, energies and forces converted to eV, eV/Angstrom.

    Values come from each frame's calculator results (``SinglePointCalculator``), else from
    ``info[energy_key]`` / ``arrays[forces_key]``; a key of None skips that target. Units
    are declared: ``energy_unit``, ``length_unit`` and ``force_unit`` (default
    ``energy_unit/length_unit``). A target is kept when every frame has it; when only some
    frames have it the data are refused (:class:`DataError` naming the frame).
    """
    try:
        e_factor, r_factor = units.energy_factor(energy_unit), units.length_factor(length_unit)
        f_factor = units.force_factor(force_unit) if force_unit else e_factor / r_factor
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err
    structures = [(a.numbers, a.positions * r_factor) for a in frames]
    targets, target_units = {}, {}
    for key, name, per_atom, factor, unit in (
            (energy_key, "energy", False, e_factor, "eV"),
            (forces_key, "forces", True, f_factor, "eV/Angstrom")):
        if key is None:
            continue
        values = [_value(a, key, per_atom) for a in frames]
        have = [v is not None for v in values]
        if all(have):
            targets[name] = [np.asarray(v, dtype=np.float64) * factor for v in values]
            if not per_atom:
                targets[name] = [float(np.ravel(v)[0]) for v in targets[name]]
            target_units[name] = unit
        elif any(have):
            raise DataError(f"{source}: frame {have.index(False)} has no {key!r} while others do")
    # scalar info entries that every frame carries (ids, isomer labels, ...) become extras
    extras: dict = {"frame": np.arange(len(frames))}
    common = set(frames[0].info).intersection(*(a.info for a in frames[1:]))
    for key in sorted(common - {energy_key}):
        values = [a.info[key] for a in frames]
        if all(isinstance(v, (int, float, str, np.integer, np.floating)) for v in values):
            extras[key] = values
    source_units = {"energy": energy_unit, "positions": length_unit}
    if force_unit:
        source_units["forces"] = force_unit
    return PackedDataset.from_structures(
        structures, targets, target_units, extras,
        meta={**(meta or {}), "source_units": source_units}, source=source)


def write_ase(path: str | os.PathLike, dataset: PackedDataset, energy_key: str = "energy",
              forces_key: str = "forces", format: str | None = None) -> Path:
    """Write ``dataset`` with :func:`ase.io.write` (eV, Angstrom), atomically.

    Energy and forces go into a :class:`~ase.calculators.singlepoint.SinglePointCalculator`
    (as ASE's own files keep them); other targets and extras into ``info`` / ``arrays``.
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for m in range(len(dataset)):
        atoms = dataset.atoms(m)
        results = {}
        if energy_key in atoms.info:
            results["energy"] = atoms.info.pop(energy_key)
        if forces_key in atoms.arrays:
            results["forces"] = atoms.arrays.pop(forces_key)
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    with atomic_file(path) as tmp:
        write(str(tmp), frames, format=format)
    return Path(path)


def read_any(path: str | os.PathLike, **kwargs) -> PackedDataset:
    """Read ``path`` by its kind: a packed folder, ``.npz`` (MD17), ``.db`` (ISO17 layout if
    rows carry ``total_energy``, else an ASE database), or anything else via ASE.

    ``kwargs`` go to the chosen reader (:func:`read_md17`, :func:`read_ase`).
    """
    path = Path(path)
    if path.is_dir():
        return PackedDataset.load(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from .md17 import read_md17

        return read_md17(path, **kwargs)
    if suffix == ".db":
        from .iso17 import is_iso17_db, read_iso17

        if is_iso17_db(path):
            # the ISO17 layout is eV and Angstrom by definition; other options do not apply
            declared = {"energy_unit": "eV", "length_unit": "Angstrom"}
            for key, value in kwargs.items():
                factor = units.energy_factor if key == "energy_unit" else units.length_factor
                if key not in declared or factor(value) != 1.0:
                    raise DataError(f"{path}: ISO17-layout databases are in eV and Angstrom; "
                                    f"option {key}={value!r} does not apply")
            return read_iso17(path)
    return read_ase(path, **kwargs)
