"""Anything ASE reads or writes (xyz, extxyz, ASE db, ...), plus :func:`read_any`.

Energies, forces and stress are taken from each frame's calculator results (how ASE stores
them for extxyz and db files) or from ``atoms.info`` / ``atoms.arrays``, under the keys
given. Periodic frames (extxyz ``Lattice`` + ``pbc``, ASE db rows with a cell) keep their
cell.

Units are never guessed. The file may state them (``energy_unit``, ``length_unit`` and
optionally ``force_unit`` in every frame's info line of an (ext)xyz file, or in an ASE
database's metadata; :func:`write_ase` writes them), or the caller declares them; a file
with energies, forces or stress and neither is refused. Positions are in Angstrom unless
stated otherwise (ASE's own convention for every format it reads). Forces must be in
energy unit / length unit, stress in energy unit / length unit^3. Values are converted to
eV and Angstrom on reading.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path

import numpy as np

from ...fileio import atomic_file, check_readable
from ...units import check_force_unit, energy_factor, length_factor, resolve_unit
from ..dataset import DataError, PackedDataset


def _value(atoms, key: str, per_atom: bool, where: str = "<atoms>"):
    """``key`` from the calculator results, else from ``info`` / ``arrays``; None if absent.

    Calculator results count only when they belong to these atoms: a calculator shared by
    several frames, or atoms moved after the calculation, hold the values of other
    positions, refused (:class:`DataError` naming ``where``) rather than read.
    """
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    if key in results:
        if not np.isfinite(atoms.positions).all():  # (NaN != NaN: "changed" below)
            raise DataError(f"{where}: the atoms have non-finite (NaN/inf) coordinates")
        check_state = getattr(calc, "check_state", None)  # ASE's own test of staleness
        changes = check_state(atoms) if check_state is not None else []
        if changes:
            raise DataError(
                f"{where}: the calculator's {key!r} belongs to other atoms (changed since: "
                f"{', '.join(changes)}): a calculator shared by several frames, or atoms "
                f"moved after the calculation; give each frame its own results (e.g. a "
                f"SinglePointCalculator) or set atoms.calc = None"
            )
        return results[key]
    store = atoms.arrays if per_atom else atoms.info
    return store.get(key)


UNIT_KEYS = ("energy_unit", "length_unit", "force_unit")


def _stated_units(frames, source: str, path: Path | None = None) -> dict[str, str]:
    """The units the frames state in every ``info`` (xyz/extxyz), or the metadata of the ASE
    database ``path``; an ASE trajectory (``.traj``) holds its calculator results in ASE's
    units by the format's definition (eV, Angstrom: what ``atomlens md`` writes)."""
    stated = {}
    if path is not None and path.suffix.lower() == ".traj":
        stated.update(energy_unit="eV", length_unit="Angstrom")
    if path is not None and path.suffix.lower() == ".db":
        from ase.db import connect

        stated.update({k: str(v) for k, v in connect(str(path)).metadata.items() if k in UNIT_KEYS})
    for key in UNIT_KEYS:
        values = {str(a.info[key]) for a in frames if key in a.info}
        if len(values) > 1:
            raise DataError(f"{source}: the frames disagree on {key} ({sorted(values)})")
        missing = [k for k, a in enumerate(frames) if key not in a.info]
        if values and missing:
            raise DataError(
                f"{source}: {len(frames) - len(missing)} frames state {key}="
                f"{next(iter(values))} and {len(missing)} state none (first: frame "
                f"{missing[0]}); state it in every frame"
            )
        if values:
            stated[key] = values.pop()
    return stated


TARGET_SHAPES = {"energy": "one real number", "forces": "(n_atoms, 3)", "stress": "(3, 3) or (6,)"}


def _checked(value, name: str, key: str, n_atoms: int, where: str):
    """One frame's ``key`` as target ``name`` takes it, in the file's units: an energy is one
    finite real number, forces have shape (n_atoms, 3), a stress (3, 3) or Voigt (6,).
    Anything else is refused (:class:`DataError` naming ``where`` and ``key``): a value cut
    to fit, or a bool read as a number, would be a silent loss."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        array = np.asarray(None)
    if name == "energy":
        fits = array.size == 1
    elif name == "forces":
        fits = array.shape == (n_atoms, 3)
    else:
        fits = array.shape in ((3, 3), (6,))
    if array.dtype.kind not in "iuf" or not fits:  # bool, complex, text are no numbers
        got = reprlib.repr(value) if name == "energy" else f"shape {array.shape}"
        expected = TARGET_SHAPES[name].replace("n_atoms", str(n_atoms))
        if name == "forces":
            expected += f" (3 components for each of the {n_atoms} atoms)"
        raise DataError(
            f"{where}: {key!r} must be {'' if name == 'energy' else 'real numbers of shape '}"
            f"{expected}, not {got} ({type(value).__name__}, dtype {array.dtype})"
        )
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"{where}: {key!r} has non-finite (NaN/inf) values")
    if name == "energy":
        return float(array.item())
    return _stress_matrix(array) if name == "stress" else array


def _stress_matrix(value) -> np.ndarray:
    """ASE stores stress as Voigt (xx, yy, zz, yz, xz, xy) or as a 3x3 matrix."""
    from ase.stress import voigt_6_to_full_3x3_stress

    value = np.asarray(value, dtype=np.float64)
    return voigt_6_to_full_3x3_stress(value) if value.shape == (6,) else value.reshape(3, 3)


def read_ase(
    path: str | os.PathLike,
    energy_key: str = "energy",
    forces_key: str = "forces",
    energy_unit: str | None = None,
    length_unit: str | None = None,
    index: str | int = ":",
    format: str | None = None,
    stress_key: str = "stress",
) -> PackedDataset:
    """Read frames with :func:`ase.io.read` into a :class:`PackedDataset`.

    Args:
        path: any file ASE can read (format from the extension unless ``format`` is given).
        energy_key, forces_key, stress_key: where energies, forces and stress are stored.
        energy_unit, length_unit: units of the file, for a file that does not state them
            (if it does, they must agree); forces are in ``energy_unit/length_unit``. A file
            with energies and no energy unit from either side is refused.
        index: which frames (ASE syntax: ``":"`` all, ``"::10"``, ``0``, ...).

    Returns:
        Targets ``energy`` (eV), ``forces`` (eV/Angstrom) and ``stress`` (eV/Angstrom^3,
        3x3, ASE's sign) when every frame has them; frames where only some have a value are
        refused. Cells and pbc of periodic frames. Extras: ``frame`` (position in the
        file) and the scalar ``info`` entries all frames share.
    """
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    check_readable(path)
    if (format or path.suffix.lower().lstrip(".")) == "db":
        from .iso17 import is_iso17_db

        if is_iso17_db(path):  # ASE's reader sees neither its energies nor its forces
            raise DataError(
                f"{path}: an ISO17-layout database (energies in the 'total_energy' key-value "
                f"pair, forces in data['atomic_forces']), whose energies and forces ASE's "
                f"reader does not see; read it with atomlens.data.sources.read_iso17 or "
                f"read_any (as the command line does)"
            )
    try:
        frames = read(str(path), index=index, format=format)
    except Exception as err:  # each ASE format raises its own errors for bad input
        raise _read_error(
            path, index, err, "ASE could not read the file, malformed or truncated"
        ) from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DataError(f"{path}: no structures in the file")
    return pack_frames(
        frames,
        str(path),
        energy_key,
        forces_key,
        stress_key,
        energy_unit,
        length_unit,
        _stated_units(frames, str(path), path),
        meta={"source_file": path.name},
    )


def _read_error(path, index, err: Exception, what: str) -> DataError:
    """A :class:`DataError` for ASE's error ``err`` reading ``path``, in words where ASE's
    own are a bare exception: an element symbol it does not know (``KeyError: 'Xx'``), an
    index past the last frame (``StopIteration``/``IndexError``)."""
    from ase.data import atomic_numbers

    if isinstance(err, KeyError) and err.args and isinstance(err.args[0], str):
        symbol = err.args[0]
        if symbol not in atomic_numbers and symbol.isalpha() and len(symbol) <= 3:
            return DataError(f"{path}: unknown element symbol {symbol!r}")
    if isinstance(err, (StopIteration, IndexError)) and str(index) not in (":", "", "None"):
        import ase.io

        try:
            n = len(ase.io.read(str(path), index=":"))
        except Exception:  # noqa: BLE001 (the file itself is bad: say what we know)
            n = None
        frames = f"; the file has {n} frame{'s' if n != 1 else ''}" if n is not None else ""
        return DataError(f"{path}: index {index} selects no frame{frames}")
    return DataError(f"{path}: {what} ({type(err).__name__}: {err})")


def _count_frames(path) -> int:
    """How many frames ``path`` holds (0 where ASE cannot tell)."""
    import ase.io

    try:
        return sum(1 for _ in ase.io.iread(path, index=":"))
    except Exception:  # noqa: BLE001 (only for a message)
        return 0


def read_structures(path: str | os.PathLike, index: str | int = ":") -> list:
    """The ASE ``Atoms`` of ``path`` (``index``: ASE syntax, ``":"`` all frames), as a list;
    a clear :class:`DataError` naming the path for missing, empty or malformed files.

    Lengths are in Angstrom (a stated other length unit converted), and the units the file
    states (``energy_unit``, ``length_unit``, ``force_unit``: its frames' info, an ASE
    database's metadata, a ``.traj``'s eV and Angstrom) are in every frame's ``info``."""
    import ase.io

    check_readable(path)
    try:
        frames = ase.io.read(path, index=index)
    except Exception as err:  # ASE raises many types for bad files
        raise _read_error(path, index, err, "cannot read structures") from err
    frames = frames if isinstance(frames, list) else [frames]
    if str(index).strip().startswith("-") and str(index).strip()[1:].isdigit():
        total = _count_frames(path)  # ASE gave frame 0 for -N beyond the first frame
        if total and int(str(index)) < -total:
            raise DataError(
                f"{path}: index {index} selects no frame; the file has {total} frames "
                f"(-1 is the last, -{total} the first)"
            )
    if not frames:
        if str(index) not in (":", "::"):  # a slice past the frames, or an empty one
            total = _count_frames(path)
            if total:
                raise DataError(
                    f"{path}: --index {index} selects none of its {total} frames (ASE "
                    f"syntax: 0-based, 'start:stop' excludes stop)"
                )
        raise DataError(f"{path}: the file holds no structures")
    stated = _stated_units(frames, str(path), Path(path))
    for atoms in frames:  # the units travel with the frames: a file written from them states
        for key, value in stated.items():  # them (a database's metadata, a .traj's eV)
            atoms.info.setdefault(key, value)
    return _in_angstrom(frames, str(path), stated)


def _in_angstrom(frames: list, source: str, stated: dict[str, str]) -> list:
    """``frames`` whose file states another length unit (``length_unit=bohr``), converted
    to Angstrom at this edge: positions, cells and the calculator's forces and stress, with
    ``length_unit`` then Angstrom (the models, MD and every command read Angstrom: such a
    file's coordinates had gone to them as they were)."""
    unit = stated.get("length_unit")
    if unit is None:
        return frames
    try:
        factor = length_factor(unit)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from None
    if factor == 1.0:
        return frames
    from ase.calculators.singlepoint import SinglePointCalculator

    for atoms in frames:
        results = dict(getattr(atoms.calc, "results", None) or {})
        atoms.calc = None
        atoms.set_cell(atoms.cell.array * factor, scale_atoms=False)
        atoms.positions *= factor
        atoms.info["length_unit"] = "Angstrom"
        if "force_unit" in atoms.info:  # energy per the stated length: now per Angstrom
            energy, _, _ = str(atoms.info["force_unit"]).rpartition("/")
            atoms.info["force_unit"] = f"{energy}/Angstrom"
        if results:  # forces per length, stress per volume, energies as they were
            if "forces" in results:
                results["forces"] = np.asarray(results["forces"]) / factor
            if "stress" in results:
                results["stress"] = np.asarray(results["stress"]) / factor**3
            atoms.calc = SinglePointCalculator(atoms, **results)
    return frames


def pack_frames(
    frames,
    source: str = "<atoms>",
    energy_key: str | None = "energy",
    forces_key: str | None = "forces",
    stress_key: str | None = "stress",
    energy_unit: str | None = None,
    length_unit: str | None = None,
    stated: dict[str, str] | None = None,
    meta: dict | None = None,
) -> PackedDataset:
    """ASE ``Atoms`` -> :class:`PackedDataset`, values converted to eV and Angstrom.

    Energies, forces and stress come from each frame's calculator results (a
    ``SinglePointCalculator``), else from ``info`` / ``arrays`` under the keys given (None
    skips a target). Units: those the frames state (``stated``, or ``energy_unit`` /
    ``length_unit`` in every frame's ``info``), else the declared ``energy_unit`` and
    ``length_unit`` (positions default to Angstrom); energies, forces or stress without an
    energy unit are refused.
    Forces are in energy unit / length unit, stress in energy unit / length unit^3. A
    target is kept when every frame has it; when only some frames have it the data are
    refused (:class:`DataError` naming the frame).
    """
    stated = stated if stated is not None else _stated_units(frames, source)
    # forces and stress are in energy unit / length unit (^3): they need the energy unit too
    present = [
        name
        for key, name, per_atom in (
            (energy_key, "energies", False),
            (forces_key, "forces", True),
            (stress_key, "stress", False),
        )
        if key is not None
        and any(
            _value(a, key, per_atom, f"{source}: frame {m}") is not None
            for m, a in enumerate(frames)
        )
    ]
    try:
        energy_unit = resolve_unit(
            "energy", stated.get("energy_unit"), energy_unit, None if present else "eV"
        )
        length_unit = resolve_unit("length", stated.get("length_unit"), length_unit, "Angstrom")
        if energy_unit is None:
            raise ValueError(
                f"there are {' and '.join(present)}, but the data does not state their "
                f"unit; declare the energy unit (energy_unit=..., --energy-unit "
                f"eV/kcal/mol/hartree/...; forces are in energy unit / length unit, stress "
                f"in energy unit / length unit^3) or store energy_unit in the file"
            )
        e_factor, r_factor = energy_factor(energy_unit), length_factor(length_unit)
        check_force_unit(
            stated.get("force_unit", f"{energy_unit}/{length_unit}"), energy_unit, length_unit
        )
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err
    structures = [(a.numbers, a.positions * r_factor) for a in frames]
    periodic = any(a.pbc.any() for a in frames)
    targets, target_units = {}, {}
    for key, name, per_atom, factor, unit in (
        (energy_key, "energy", False, e_factor, "eV"),
        (forces_key, "forces", True, e_factor / r_factor, "eV/Angstrom"),
        (stress_key, "stress", False, e_factor / r_factor**3, "eV/Angstrom^3"),
    ):
        if key is None:
            continue
        values = [_value(a, key, per_atom, f"{source}: frame {m}") for m, a in enumerate(frames)]
        have = [v is not None for v in values]
        if all(have):
            targets[name] = [
                _checked(v, name, key, len(a), f"{source}: frame {m}") * factor
                for m, (a, v) in enumerate(zip(frames, values))
            ]
            target_units[name] = unit
        elif any(have):
            raise DataError(f"{source}: frame {have.index(False)} has no {key!r} while others do")
    # scalar info entries that every frame carries (ids, isomer labels, ...) become extras
    extras: dict = {"frame": np.arange(len(frames))}
    common = set(frames[0].info).intersection(*(a.info for a in frames[1:]))
    for key in sorted(common - {energy_key, stress_key, *UNIT_KEYS}):
        values = [a.info[key] for a in frames]
        if all(isinstance(v, (int, float, str, np.integer, np.floating)) for v in values):
            extras[key] = values
    return PackedDataset.from_structures(
        structures,
        targets,
        target_units,
        extras,
        meta={**(meta or {}), "source_units": {"energy": energy_unit, "positions": length_unit}},
        source=source,
        per_atom=[k for k in targets if k == "forces"],
        cells=[a.cell.array * r_factor for a in frames] if periodic else None,
        pbc=[a.pbc for a in frames] if periodic else None,
    )


def write_ase(
    path: str | os.PathLike,
    dataset: PackedDataset,
    energy_key: str = "energy",
    forces_key: str = "forces",
    format: str | None = None,
    info: dict | None = None,
) -> Path:
    """Write ``dataset`` with :func:`ase.io.write` (eV, Angstrom), atomically.

    Energy and forces go into a :class:`~ase.calculators.singlepoint.SinglePointCalculator`
    (as ASE's own files keep them); other targets and extras into ``info`` / ``arrays``; the
    units are stated in every frame's ``info`` (and, for ASE databases, in the metadata),
    with ``info`` (provenance such as the level of theory) added to every frame.
    """
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for m in range(len(dataset)):
        atoms = dataset.atoms(m)
        atoms.info.update(info or {})
        atoms.info.update(energy_unit="eV", length_unit="Angstrom")
        results = {}
        if energy_key in atoms.info:
            results["energy"] = atoms.info.pop(energy_key)
        if forces_key in atoms.arrays:
            results["forces"] = atoms.arrays.pop(forces_key)
        if "stress" in atoms.info:
            from ase.stress import full_3x3_to_voigt_6_stress

            results["stress"] = full_3x3_to_voigt_6_stress(atoms.info.pop("stress"))
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    with atomic_file(path) as tmp:
        write(str(tmp), frames, format=format)
        if Path(path).suffix.lower() == ".db":
            from ase.db import connect

            connect(str(tmp)).metadata = {"energy_unit": "eV", "length_unit": "Angstrom"}
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
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from .md17 import read_md17

        return read_md17(path, **_options(path, read_md17, kwargs, "MD17 .npz files"))
    if suffix == ".db":
        from .iso17 import is_iso17_db, read_iso17

        if is_iso17_db(path):
            # the ISO17 layout is eV and Angstrom by definition; other options do not apply
            declared = {"energy_unit": "eV", "length_unit": "Angstrom"}
            for key, value in kwargs.items():
                factor = energy_factor if key == "energy_unit" else length_factor
                if key not in declared or factor(value) != 1.0:
                    raise DataError(
                        f"{path}: ISO17-layout databases are in eV and Angstrom; "
                        f"option {key}={value!r} does not apply"
                    )
            return read_iso17(path)
    return read_ase(path, **_options(path, read_ase, kwargs, "files read by ASE"))


def _options(path: Path, reader, kwargs: dict, kind: str) -> dict:
    """``kwargs`` when ``reader`` takes them all; else a :class:`DataError` naming ``path``
    and the options ``kind`` accepts (rather than Python's bare TypeError)."""
    import inspect

    accepted = [name for name in inspect.signature(reader).parameters if name != "path"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(
            f"{path}: option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} do"
            f"{'' if len(unknown) > 1 else 'es'} not apply to {kind}; they accept "
            f"{', '.join(accepted)}"
        )
    return kwargs
