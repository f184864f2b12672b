"""ISO17-layout ASE databases: one row per frame of isomer trajectories.

Per row: atomic numbers and positions (Angstrom), ``total_energy`` (key-value pair, eV),
``data['atomic_forces']`` ((n, 3), eV/Angstrom), and optional key-value pairs such as
``qm9_index`` (the isomer) and ``frame`` (index in its trajectory), which become extras.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...fileio import atomic_file
from ..dataset import DataError, PackedDataset, refuse_what_layout_drops

ENERGY_KEY = "total_energy"
FORCES_KEY = "atomic_forces"


def _open(path: Path):
    from ase.db import connect

    if not path.is_file():  # ase.db.connect would silently create an empty database
        raise DataError(f"{path}: file not found")
    return connect(str(path), type="db")


def is_iso17_db(path: str | os.PathLike) -> bool:
    """True when the rows of the ASE database have ``total_energy`` (ISO17 layout).

    A database where some rows have it and others not is refused (:class:`DataError`
    naming the first row that differs from row 1): neither reader would read all its
    energies and forces.
    """
    try:
        with _open(Path(path)) as db:
            n_rows, n_iso17 = db.count(), db.count(ENERGY_KEY)
            if 0 < n_iso17 < n_rows:
                first = next(db.select(limit=1, include_data=False))
                layout = ENERGY_KEY in first.key_value_pairs
                for row in db.select(include_data=False):
                    if (ENERGY_KEY in row.key_value_pairs) != layout:
                        break
                lacking, having = (row, first) if layout else (first, row)
                raise DataError(
                    f"{path}: row {lacking.id} has no {ENERGY_KEY!r} key-value pair but row "
                    f"{having.id} has (the ISO17 layout; {n_iso17} of {n_rows} rows have "
                    f"it): a database mixing layouts cannot be read without losing "
                    f"energies and forces; give every row the ISO17 keys, or none"
                )
            return n_rows > 0 and n_iso17 == n_rows
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: not a readable ASE database ({err})") from err


def read_iso17(path: str | os.PathLike) -> PackedDataset:
    """Read an ISO17-layout ASE database into a :class:`PackedDataset`.

    Returns:
        Targets ``energy`` (eV, per structure) and ``forces`` (eV/Angstrom, per atom); the
        cell and pbc of periodic rows (molecules, as in ISO17 itself, have none);
        extras: every other key-value pair that all rows carry (``qm9_index``, ``frame``, ...)
        and ``row_id`` (the database row id).

    Raises:
        DataError: naming the file (and row) for a missing file, a damaged database, or a
            row without ``total_energy`` / ``data['atomic_forces']``.
    """
    from ...units import energy_factor, length_factor

    path = Path(path)
    structures, energies, forces, ids, pairs, cells, pbc = [], [], [], [], [], [], []
    try:
        with _open(path) as db:
            # the layout is eV and Angstrom by definition: metadata that say otherwise (a
            # database written by another tool) are refused, not read as eV and Angstrom
            for key, factor in (("energy_unit", energy_factor), ("length_unit", length_factor)):
                stated = db.metadata.get(key)
                if stated is not None:
                    try:
                        same = factor(str(stated)) == 1.0
                    except ValueError:
                        same = False
                    if not same:
                        raise DataError(
                            f"{path}: an ISO17-layout database (eV and Angstrom by the "
                            f"layout) whose metadata state {key}={stated!r}: convert it to "
                            f"eV and Angstrom first"
                        )
            for row in db.select():
                kvp = row.key_value_pairs
                if ENERGY_KEY not in kvp:
                    raise DataError(
                        f"{path}: row {row.id} has no {ENERGY_KEY!r} key-value pair "
                        f"(not the ISO17 layout; try read_ase)"
                    )
                data = row.data
                if FORCES_KEY not in data:
                    raise DataError(f"{path}: row {row.id} has no data[{FORCES_KEY!r}]")
                structures.append((row.numbers, row.positions))
                cells.append(np.asarray(row.cell, dtype=np.float64))
                pbc.append(np.asarray(row.pbc, dtype=bool))
                energy = kvp[ENERGY_KEY]
                if isinstance(energy, (bool, np.bool_)) or not isinstance(
                    energy, (int, float, np.integer, np.floating)
                ):
                    raise DataError(
                        f"{path}: row {row.id}: {ENERGY_KEY} must be a real number, not "
                        f"{energy!r} ({type(energy).__name__})"
                    )
                energies.append(energy)
                forces.append(np.asarray(data[FORCES_KEY], dtype=np.float64))
                ids.append(row.id)
                pairs.append(kvp)
    except DataError:
        raise
    except Exception as err:  # sqlite3.DatabaseError, ValueError, ...
        raise DataError(
            f"{path}: not a readable ASE database, damaged or truncated "
            f"({type(err).__name__}: {err})"
        ) from err
    if not structures:
        raise DataError(f"{path}: the database is empty")
    for (z, _), f, row_id in zip(structures, forces, ids):
        if f.shape != (len(z), 3):
            raise DataError(
                f"{path}: row {row_id} has forces of shape {f.shape} for {len(z)} atoms"
            )
    common = set(pairs[0]).difference({ENERGY_KEY}).intersection(*pairs[1:])
    extras = {k: [p[k] for p in pairs] for k in sorted(common)}
    extras["row_id"] = ids
    return PackedDataset.from_structures(
        structures,
        {"energy": energies, "forces": forces},
        {"energy": "eV", "forces": "eV/Angstrom"},
        extras,
        meta={"source_file": path.name, "layout": "ISO17"},
        source=str(path),
        cells=cells,  # ISO17 rows are molecules; periodic rows keep their cells (ASE db)
        pbc=pbc,
    )


def write_iso17(
    path: str | os.PathLike,
    dataset: PackedDataset,
    energy_key: str = "energy",
    forces_key: str = "forces",
) -> Path:
    """Write ``dataset`` as an ISO17-layout ASE database (eV, eV/Angstrom), atomically.

    Per-structure extras of number or string type (``qm9_index``, ``frame``, ``smiles``,
    ...) are stored as key-value pairs; ``row_id`` is not (the database assigns ids).
    Periodic structures and targets other than energy and forces (stress, ...) are
    refused: the layout would drop them.
    """
    from ase import Atoms
    from ase.db import connect

    path = Path(path)
    refuse_what_layout_drops(path, dataset, "ISO17 databases", (energy_key, forces_key))
    if energy_key not in dataset.targets or forces_key not in dataset.targets:
        raise DataError(f"{path}: ISO17 layout needs targets {energy_key!r} and {forces_key!r}")
    energy = np.asarray(dataset.targets[energy_key], np.float64)
    forces = np.asarray(dataset.targets[forces_key], np.float64)
    extras = {k: np.asarray(v) for k, v in dataset.extras.items() if k != "row_id"}
    with atomic_file(path) as tmp, connect(str(tmp), type="db", append=False) as db:
        for m in range(len(dataset)):
            a, b = int(dataset.offsets[m]), int(dataset.offsets[m + 1])
            atoms = Atoms(
                numbers=np.asarray(dataset.numbers[a:b]),
                positions=np.asarray(dataset.positions[a:b]),
            )
            pairs = {k: v[m].item() for k, v in extras.items()}
            db.write(atoms, data={FORCES_KEY: forces[a:b]}, total_energy=float(energy[m]), **pairs)
    return path
