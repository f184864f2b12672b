"""QM9 (130,831 small organic molecules, B3LYP/6-31G(2df,p)) from the ``qm9pack`` package.

The CSV files ``qm9pack/data/qm9_part{1,2,3}.csv`` are read directly; the ``qm9pack``
module itself is never imported (it needs ``pkg_resources`` at import time). Parsing is done
in bulk: each column is gathered as strings by the :mod:`csv` module, then the nested-list
strings of all molecules (``Elements``, ``XYZ_Ang``) are joined and parsed by one
:func:`numpy.fromstring` call. Only when a bulk check fails is the file walked row by row
to name the offending line.

The packed form is built once and cached (see :func:`load_qm9`); later loads memory-map it.

Targets and their internal units (converted at read time, hartree -> eV via
:mod:`atomlens.units`):

=========  =====================  ==========  ===========  ==========================
name       QM9 column             unit        extensive    meaning
=========  =====================  ==========  ===========  ==========================
``U0``     InternalEnergy_0K_au   eV          yes (sum)    internal energy at 0 K
``U``      InternalEnergy_298K_au eV          yes (sum)    internal energy at 298.15 K
``H``      Enthalphy_298K_au      eV          yes (sum)    enthalpy at 298.15 K
``G``      GibbsFreeEnergy_298K   eV          yes (sum)    free energy at 298.15 K
``zpve``   ZPVE_au                eV          yes (sum)    zero-point vibrational energy
``cv``     Heatcapacity_Cv        cal/mol/K   yes (sum)    heat capacity at 298.15 K
``alpha``  Polarizability_bohr3   bohr^3      yes (sum)    isotropic polarizability
``r2``     R2_bohr2               bohr^2      yes (sum)    electronic spatial extent
``homo``   HOMO_au                eV          no (mean)    HOMO energy
``lumo``   LUMO_au                eV          no (mean)    LUMO energy
``gap``    HOMO_LUMO_gap_au       eV          no (mean)    LUMO - HOMO
``mu``     Dipole_debye           Debye       no (mean)    dipole moment norm
=========  =====================  ==========  ===========  ==========================

"Extensive" targets grow with molecule size and are predicted as a sum of atomic
contributions (with per-element atom references); intensive ones as a mean over atoms.
(``r2`` grows faster than linearly with size and the dipole norm is not a sum of atomic
scalars; sum and mean pooling are the usual, sensible first choices for them.)

Run ``python -m atomlens.data.sources.qm9`` to build the cache and print a summary.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers
from tqdm.auto import tqdm

from ..._optional import require_installed
from ...units import HARTREE_EV
from ..dataset import DataError, PackedDataset

#: number of molecules in the qm9pack CSVs (QM9 minus the 3,054 that fail its consistency check)
QM9_SIZE = 130_831
#: bump when the parsed content changes, so stale caches are rebuilt
PARSER_VERSION = 1

#: target name -> unit (internal), pooling, CSV column and the factor from the CSV's unit
QM9_TARGETS: dict[str, dict] = {
    "U0": {
        "unit": "eV",
        "extensive": True,
        "column": "InternalEnergy_0K_au",
        "factor": HARTREE_EV,
    },
    "U": {
        "unit": "eV",
        "extensive": True,
        "column": "InternalEnergy_298K_au",
        "factor": HARTREE_EV,
    },
    "H": {
        "unit": "eV",
        "extensive": True,
        "column": "Enthalphy_298K_au",
        "factor": HARTREE_EV,
    },
    "G": {
        "unit": "eV",
        "extensive": True,
        "column": "GibbsFreeEnergy_298K_au",
        "factor": HARTREE_EV,
    },
    "zpve": {"unit": "eV", "extensive": True, "column": "ZPVE_au", "factor": HARTREE_EV},
    "cv": {
        "unit": "cal/mol/K",
        "extensive": True,
        "column": "Heatcapacity_Cv_cal_mol_K",
        "factor": 1.0,
    },
    "alpha": {"unit": "bohr^3", "extensive": True, "column": "Polarizability_bohr3", "factor": 1.0},
    "r2": {"unit": "bohr^2", "extensive": True, "column": "R2_bohr2", "factor": 1.0},
    "homo": {"unit": "eV", "extensive": False, "column": "HOMO_au", "factor": HARTREE_EV},
    "lumo": {"unit": "eV", "extensive": False, "column": "LUMO_au", "factor": HARTREE_EV},
    "gap": {
        "unit": "eV",
        "extensive": False,
        "column": "HOMO_LUMO_gap_au",
        "factor": HARTREE_EV,
    },
    "mu": {"unit": "Debye", "extensive": False, "column": "Dipole_debye", "factor": 1.0},
}

_STRUCTURE_COLUMNS = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
_REMOVE_BRACKETS = str.maketrans("", "", "[]")
_REMOVE_SYMBOL_NOISE = str.maketrans("", "", "[]' \"")


def qm9pack_files() -> list[Path]:
    """Paths of ``qm9_part{1,2,3}.csv`` inside the installed ``qm9pack`` (not imported)."""
    # find_spec locates the package without running its __init__ (which needs pkg_resources);
    # importlib.resources.files("qm9pack") would import it.
    require_installed("qm9pack", "QM9")
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("QM9: the package 'qm9pack' is not a package folder")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = [root / f"qm9_part{k}.csv" for k in (1, 2, 3)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"QM9: qm9pack is installed but its data files are missing: {missing}")
    return files


def _qm9pack_version() -> str:
    try:
        return importlib.metadata.version("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _read_columns(path: Path, wanted: Sequence[str], limit: int | None):
    """Columns ``wanted`` of one CSV as lists of strings, plus the line number of each row."""
    if not path.is_file():
        raise DataError(f"{path}: QM9 CSV file not found")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a QM9 CSV header") from None
        except csv.Error as err:
            raise DataError(f"{path}:1: malformed CSV header ({err})") from err
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path}:1: not a qm9pack CSV, missing columns {missing}")
        where = [header.index(c) for c in wanted]
        n_fields = len(header)
        columns: list[list[str]] = [[] for _ in wanted]
        lines: list[int] = []
        try:
            for row in reader:
                if limit is not None and len(lines) >= limit:
                    break
                if len(row) != n_fields:
                    if not row:  # blank line
                        continue
                    raise DataError(
                        f"{path}:{reader.line_num}: row has {len(row)} fields, expected "
                        f"{n_fields} (truncated or malformed row)"
                    )
                for column, k in zip(columns, where):
                    column.append(row[k])
                lines.append(reader.line_num)
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    return columns, lines


def _to_float(values: list[str], what: str, path: Path, lines: list[int]) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        for value, line in zip(values, lines):
            try:
                float(value)
            except ValueError:
                raise DataError(f"{path}:{line}: {what} is not a number: {value!r}") from None
        raise


def _row_atoms(elements: str, xyz: str, n_atoms: int, path: Path, line: int):
    """Slow, careful parse of one row: used only to locate an error the bulk parse found."""
    symbols = [s for s in elements.translate(_REMOVE_SYMBOL_NOISE).split(",") if s]
    for s in symbols:
        if s not in atomic_numbers:
            raise DataError(f"{path}:{line}: unknown element symbol {s!r}")
    if len(symbols) != n_atoms:
        raise DataError(
            f"{path}:{line}: N_atoms is {n_atoms} but Elements lists {len(symbols)} atoms"
        )
    text = xyz.translate(_REMOVE_BRACKETS)
    try:
        coords = [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise DataError(f"{path}:{line}: malformed XYZ_Ang coordinates {xyz[:60]!r}") from None
    if len(coords) != 3 * n_atoms:
        raise DataError(
            f"{path}:{line}: N_atoms is {n_atoms} but XYZ_Ang has "
            f"{len(coords)} numbers (expected {3 * n_atoms})"
        )


def _parse_file(path: Path, limit: int | None) -> dict:
    wanted = list(_STRUCTURE_COLUMNS) + [spec["column"] for spec in QM9_TARGETS.values()]
    columns, lines = _read_columns(path, wanted, limit)
    col = dict(zip(wanted, columns))
    if not lines:
        raise DataError(f"{path}: no molecules in the file")
    try:
        counts = np.asarray(col["N_atoms"], dtype=np.int64)
        index = np.asarray(col["Index"], dtype=np.int64)
    except ValueError:
        for k, line in enumerate(lines):
            for name in ("N_atoms", "Index"):
                if not col[name][k].strip().isdigit():
                    raise DataError(
                        f"{path}:{line}: {name} is not an integer: {col[name][k]!r}"
                    ) from None
        raise
    if (counts <= 0).any():
        k = int(np.argmax(counts <= 0))
        raise DataError(f"{path}:{lines[k]}: N_atoms must be positive, got {counts[k]}")
    n_total = int(counts.sum())

    def locate() -> None:
        for k, line in enumerate(lines):
            _row_atoms(col["Elements"][k], col["XYZ_Ang"][k], int(counts[k]), path, line)

    # each row's own counts: totals alone let miscounts of two rows cancel (NH3 read as H2NO)
    per_row = np.fromiter(
        (e.count(",") + 1 for e in col["Elements"]), dtype=np.int64, count=len(lines)
    )
    numbers_per_row = np.fromiter(
        (x.count(",") + 1 for x in col["XYZ_Ang"]), dtype=np.int64, count=len(lines)
    )
    if (per_row != counts).any() or (numbers_per_row != 3 * counts).any():
        locate()  # the careful parse of each row names the first bad one

    # element symbols of all molecules at once
    symbols = ",".join(col["Elements"]).translate(_REMOVE_SYMBOL_NOISE).split(",")
    if len(symbols) != n_total:
        locate()
        raise DataError(f"{path}: Elements lists {len(symbols)} atoms, N_atoms sums to {n_total}")
    lookup = atomic_numbers
    numbers = np.fromiter((lookup.get(s, 0) for s in symbols), dtype=np.int16, count=n_total)
    if (numbers == 0).any():
        locate()
        raise DataError(f"{path}: unknown element symbol {symbols[int(np.argmax(numbers == 0))]!r}")

    # coordinates of all molecules at once; a malformed number makes fromstring stop early
    text = ",".join(col["XYZ_Ang"]).translate(_REMOVE_BRACKETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            flat = np.fromstring(text, dtype=np.float64, sep=",")
        except (ValueError, DeprecationWarning):
            flat = np.empty(0)
    if flat.shape[0] != 3 * n_total:
        locate()
        raise DataError(f"{path}: XYZ_Ang has {flat.shape[0]} numbers, expected {3 * n_total}")
    targets = {}
    for name, spec in QM9_TARGETS.items():
        targets[name] = _to_float(col[spec["column"]], spec["column"], path, lines) * spec["factor"]
    return {
        "numbers": numbers,
        "positions": flat.reshape(n_total, 3),
        "counts": counts,
        "index": index,
        "smiles": col["SMILES"],
        "targets": targets,
    }


def read_qm9_csv(
    paths: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    limit: int | None = None,
    validate: bool = True,
) -> PackedDataset:
    """Read qm9pack CSV files into a :class:`PackedDataset`.

    Args:
        paths: one CSV or several (default: the three ``qm9pack`` parts).
        limit: read at most this many molecules in all (for quick experiments).
        validate: run :meth:`PackedDataset.validate` (elements, NaN, overlapping atoms).

    Returns:
        Positions in Angstrom; targets named as in :data:`QM9_TARGETS`, in its units
        (energies in eV); extras ``smiles`` (str) and ``index`` (QM9 index, int64).

    Raises:
        DataError: naming the file and line of a malformed or truncated row, an unknown
            element, or an atom-count mismatch.
    """
    if paths is None:
        paths = qm9pack_files()
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("QM9: no CSV files given")
    parts = []
    remaining = limit
    # packing all of QM9 takes tens of seconds: show it (on a terminal)
    for path in tqdm(paths, desc="QM9: parsing CSV files", unit="file", disable=None):
        if remaining is not None and remaining <= 0:
            break
        part = _parse_file(path, remaining)
        parts.append(part)
        if remaining is not None:
            remaining -= len(part["counts"])
    counts = np.concatenate([p["counts"] for p in parts])
    dataset = PackedDataset(
        numbers=np.concatenate([p["numbers"] for p in parts]),
        positions=np.concatenate([p["positions"] for p in parts]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        targets={k: np.concatenate([p["targets"][k] for p in parts]) for k in QM9_TARGETS},
        units={k: spec["unit"] for k, spec in QM9_TARGETS.items()},
        extras={
            "smiles": np.concatenate([np.asarray(p["smiles"], dtype=str) for p in parts]),
            "index": np.concatenate([p["index"] for p in parts]),
        },
        meta={
            "source": "QM9 (qm9pack " + _qm9pack_version() + ")",
            "level_of_theory": "B3LYP/6-31G(2df,p)",
            "files": [p.name for p in paths[: len(parts)]],
            "extensive": {k: spec["extensive"] for k, spec in QM9_TARGETS.items()},
            "parser_version": PARSER_VERSION,
        },
    )
    if validate:
        dataset.validate(", ".join(str(p) for p in paths[: len(parts)]))
    return dataset


def default_cache_dir() -> Path:
    """``$ATOMLENS_CACHE/qm9`` if that variable is set, else ``~/.cache/atomlens/qm9``."""
    root = os.environ.get("ATOMLENS_CACHE")
    return Path(root) / "qm9" if root else Path.home() / ".cache" / "atomlens" / "qm9"


def load_qm9(cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> PackedDataset:
    """QM9 as a memory-mapped :class:`PackedDataset`, building the packed cache on first use.

    The cache is a folder ``qm9pack-<version>-v<parser version>`` under ``cache_dir``
    (default :func:`default_cache_dir`); it is written atomically, so an interrupted build
    leaves nothing half-written. ``rebuild=True`` parses the CSVs again.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"qm9pack-{_qm9pack_version()}-v{PARSER_VERSION}"
    if rebuild or not (folder / "meta.json").is_file():
        dataset = read_qm9_csv()
        try:
            dataset.save(folder)
        except OSError:
            # another process may have finished the same build first; use its copy
            if not (folder / "meta.json").is_file():
                raise
    try:
        return PackedDataset.load(folder, mmap=True)
    except DataError as err:
        raise DataError(
            f"{err}\n(the QM9 cache is rebuilt by: python -m atomlens.data.sources.qm9 --rebuild)"
        ) from err


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or rebuild with ``--rebuild``) the QM9 cache and print a summary."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m atomlens.data.sources.qm9", description=main.__doc__
    )
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="parse the CSVs again")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dataset = load_qm9(args.cache_dir, rebuild=args.rebuild)
    seconds = time.perf_counter() - start
    counts = dataset.n_atoms_per
    print(
        f"QM9: {len(dataset)} molecules, {int(counts.sum())} atoms "
        f"({counts.min()}-{counts.max()} per molecule), elements "
        f"{[int(z) for z in dataset.elements]}; loaded in {seconds:.1f} s"
    )
    print(f"cache: {Path(args.cache_dir) if args.cache_dir else default_cache_dir()}")
    for name, spec in QM9_TARGETS.items():
        v = np.asarray(dataset.targets[name])
        print(
            f"  {name:6s} [{spec['unit']:9s}] mean {v.mean():12.4f}  std {v.std():10.4f}  "
            f"{'sum' if spec['extensive'] else 'mean'} pooling"
        )
    if len(dataset) != QM9_SIZE:
        print(f"warning: expected {QM9_SIZE} molecules", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
