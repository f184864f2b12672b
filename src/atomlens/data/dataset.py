"""Packed molecular datasets: contiguous arrays plus offsets, memory-mapped from disk.

A dataset of ``n_structures`` molecules with ``n_atoms_total`` atoms in all is stored as

* ``numbers``   (n_atoms_total,) int16     atomic numbers
* ``positions`` (n_atoms_total, 3) float64 Angstrom
* ``offsets``   (n_structures + 1,) int64  atoms of structure m are offsets[m]:offsets[m+1]
* ``targets``   name -> (n_structures, ...) or (n_atoms_total, ...) arrays, in internal units
* ``per_atom``  the names of the per-atom targets (declared, never guessed from shapes)
* ``cell``      (n_structures, 3, 3) float64 lattice vectors as rows (Angstrom), and
* ``pbc``       (n_structures, 3) bool periodic directions; both absent for molecules only
* ``extras``    name -> (n_structures,) arrays of strings or numbers (e.g. SMILES, ids)
* ``units``     name -> unit string for positions and every target (eV, Angstrom, ...)

On disk it is a folder of ``.npy`` files and a ``meta.json``; reading never unpickles.
Batches are gathered with index arithmetic, so a training step runs no per-molecule Python.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_folder, recover_folder
from .batch import Batch, Pairs
from .neighbors import MIN_CELL_EXTENT, cell_problem, molecular_pairs, periodic_pairs

FORMAT_VERSION = 2  # 2: cell, pbc and the per-atom declaration; 1 is read too
MAX_Z = 118
#: closest approach of two atoms accepted as physical (Angstrom)
MIN_DISTANCE = 0.1


class DataError(ValueError):
    """Bad input data; the message names the source and the problem."""


class PackedDataset:
    """Molecules with targets in packed arrays. See the module docstring for the layout."""

    def __init__(
        self,
        numbers: np.ndarray,
        positions: np.ndarray,
        offsets: np.ndarray,
        targets: dict[str, np.ndarray] | None = None,
        units: dict[str, str] | None = None,
        extras: dict[str, np.ndarray] | None = None,
        meta: dict | None = None,
        per_atom: Iterable[str] | None = None,
        cell: np.ndarray | None = None,
        pbc: np.ndarray | None = None,
    ):
        self.numbers = numbers
        self.positions = positions
        self.offsets = offsets
        self.targets = dict(targets or {})
        self.units = {"positions": "Angstrom", **(units or {})}
        self.extras = dict(extras or {})
        self.meta = dict(meta or {})
        if per_atom is None:  # format 1 and callers that do not say: forces-like arrays
            per_atom = [
                k
                for k, v in self.targets.items()
                if _looks_per_atom(v, len(self), numbers.shape[0])
            ]
        self.per_atom = set(per_atom)
        if (cell is None) != (pbc is None):
            raise DataError("give both cell and pbc, or neither")
        self.cell, self.pbc = cell, pbc
        self._pair_cache: dict[tuple[float, int], tuple[np.ndarray, ...]] = {}
        #: the data spec (a training config's ``data``) this set was read from, if training
        #: read it so: what a run records as its data (``atomlens.training.train``)
        self.opened_from: str | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_structures(
        cls,
        structures: Sequence[tuple[np.ndarray, np.ndarray]],
        targets: dict[str, Sequence] | None = None,
        units: dict[str, str] | None = None,
        extras: dict[str, Sequence] | None = None,
        meta: dict | None = None,
        source: str = "<memory>",
        per_atom: Iterable[str] | None = None,
        cells: Sequence | None = None,
        pbc: Sequence | None = None,
    ) -> PackedDataset:
        """Pack a list of ``(numbers, positions)``; per-atom targets are lists of arrays.

        ``per_atom`` names the per-atom targets (default: 2-D arrays with one row per atom,
        such as forces). ``cells`` (3x3 each, Angstrom) and ``pbc`` (3 bools each) describe
        periodic structures; ``None`` for a set of molecules.
        """
        if len(structures) == 0:
            raise DataError(f"{source}: the dataset is empty")
        counts = np.array([len(z) for z, _ in structures], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        numbers = np.concatenate([np.asarray(z, dtype=np.int16) for z, _ in structures])
        positions = np.concatenate(
            [np.asarray(r, dtype=np.float64).reshape(-1, 3) for _, r in structures]
        )
        if per_atom is None:
            per_atom = [
                name
                for name, values in (targets or {}).items()
                if np.ndim(values[0]) == 2 and np.shape(values[0])[0] == counts[0]
            ]
        per_atom = set(per_atom)
        packed_targets = {}
        for name, values in (targets or {}).items():
            if name in per_atom:
                rows = [np.asarray(v, np.float64) for v in values]
                if any(r.shape[0] != c for r, c in zip(rows, counts)):
                    raise DataError(
                        f"{source}: per-atom target {name!r} does not have one row per atom"
                    )
                packed_targets[name] = np.concatenate(rows)
            else:
                packed = np.asarray(values, dtype=np.float64)
                packed_targets[name] = (
                    packed.reshape((len(counts),) + packed.shape[1:])
                    if packed.size != len(counts)
                    else packed.reshape(len(counts))
                )
        packed_extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        cell_array = pbc_array = None
        if cells is not None or pbc is not None:
            if cells is None or pbc is None:
                raise DataError(f"{source}: give both cells and pbc, or neither")
            cell_array = np.asarray(cells, dtype=np.float64).reshape(len(counts), 3, 3)
            pbc_array = np.asarray(pbc, dtype=bool).reshape(len(counts), 3)
            if not pbc_array.any():  # no periodic direction anywhere: a set of molecules
                cell_array = pbc_array = None
        ds = cls(
            numbers,
            positions,
            offsets,
            packed_targets,
            units,
            packed_extras,
            meta,
            per_atom,
            cell_array,
            pbc_array,
        )
        ds.validate(source)
        return ds

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "<memory>") -> None:
        """Raise :class:`DataError` for empty data, bad elements, NaN or overlapping atoms."""
        self.check_arrays(source)
        self._check_overlaps(source)

    def check_arrays(self, source: str = "<memory>") -> None:
        """The vectorised checks of :meth:`validate` (all but overlapping atoms): sizes,
        offsets, elements, finite positions and targets, units. Run on every load."""
        n = len(self)
        if n <= 0 or self.numbers.shape[0] == 0:
            raise DataError(f"{source}: the dataset is empty")
        offsets = np.asarray(self.offsets)
        if self.numbers.ndim != 1 or self.positions.shape != (self.numbers.shape[0], 3):
            raise DataError(
                f"{source}: numbers {self.numbers.shape} and positions "
                f"{self.positions.shape} do not fit (n_atoms,) and (n_atoms, 3)"
            )
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != self.numbers.shape[0]:
            raise DataError(
                f"{source}: offsets must run from 0 to the number of atoms "
                f"({self.numbers.shape[0]}); they run from {offsets[0]} to "
                f"{offsets[-1]}"
            )
        counts = np.diff(offsets)
        if (counts <= 0).any():
            m = int(np.argmax(counts <= 0))
            raise DataError(f"{source}: structure {m} has no atoms (offsets not increasing)")
        z = np.asarray(self.numbers)
        bad = (z < 1) | (z > MAX_Z)
        if bad.any():
            a = int(np.argmax(bad))
            m = int(np.searchsorted(self.offsets, a, side="right") - 1)
            raise DataError(f"{source}: structure {m} has an unknown element (Z={int(z[a])})")
        pos = np.asarray(self.positions)
        if not np.isfinite(pos).all():
            a = int(np.argmax(~np.isfinite(pos).all(axis=1)))
            m = int(np.searchsorted(self.offsets, a, side="right") - 1)
            raise DataError(f"{source}: structure {m} has non-finite (NaN/inf) coordinates")
        for name, values in self.targets.items():
            rows = self.numbers.shape[0] if name in self.per_atom else n
            if values.shape[0] != rows:
                kind = "atoms" if name in self.per_atom else "structures"
                raise DataError(
                    f"{source}: target {name!r} has {values.shape[0]} rows, "
                    f"expected {rows} ({kind})"
                )
            if not np.isfinite(values).all():
                raise DataError(f"{source}: target {name!r} has non-finite values")
            if name not in self.units:
                raise DataError(f"{source}: target {name!r} has no unit recorded")
        for name, values in self.extras.items():
            if values.shape[:1] != (n,):
                raise DataError(
                    f"{source}: extra {name!r} has shape {values.shape} for {n} structures"
                )
        if self.cell is not None:
            self._validate_cells(source)

    def _check_overlaps(self, source: str) -> None:
        # periodic structures against their images too, from their neighbour lists
        for m in self.periodic_structures():
            i, j, _ = self.structure_pairs(m, MIN_DISTANCE)
            if len(i):
                raise DataError(
                    f"{source}: structure {m} has two atoms (or an atom and a periodic image) "
                    f"closer than {MIN_DISTANCE} Angstrom (atoms {int(i[0])} and {int(j[0])})"
                )
        # closest pair per chunk of structures, vectorised
        n, counts, pos = len(self), self.n_atoms_per, np.asarray(self.positions)
        chunk = 4096
        for start in range(0, n, chunk):
            idx = np.arange(start, min(n, start + chunk))
            c = torch.from_numpy(counts[idx])
            p = torch.from_numpy(pos[self.atom_index(idx)])
            i, _ = molecular_pairs(c, p, cutoff=MIN_DISTANCE)
            if len(i):
                a = int(i[0]) + int(self.offsets[start])
                m = int(np.searchsorted(self.offsets, a, side="right") - 1)
                raise DataError(
                    f"{source}: structure {m} has two atoms closer than {MIN_DISTANCE} Angstrom "
                    f"(overlapping atoms)"
                )

    def _validate_cells(self, source: str) -> None:
        n = len(self)
        if self.cell.shape != (n, 3, 3) or self.pbc.shape != (n, 3):
            raise DataError(f"{source}: cell and pbc must be ({n}, 3, 3) and ({n}, 3)")
        if not np.isfinite(self.cell).all():
            raise DataError(f"{source}: a cell has non-finite (NaN/inf) entries")
        for m in np.flatnonzero(self.pbc.any(axis=1)):
            problem = cell_problem(self.cell[m], self.pbc[m])
            if problem is not None:
                raise DataError(f"{source}: structure {m} is periodic but {problem}")
        if "stress" in self.targets:  # sigma = (1/V) dE/d eps: a slab's cell needs a volume
            flat = np.abs(np.linalg.det(self.cell)) < MIN_CELL_EXTENT
            if flat.any():
                m = int(np.argmax(flat))
                raise DataError(
                    f"{source}: structure {m} has a stress but its cell has no volume "
                    f"(stress is per volume: give the slab's cell its vacuum)"
                )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def periodic_structures(self) -> np.ndarray:
        """Indices of the structures with at least one periodic direction."""
        if self.pbc is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.asarray(self.pbc).any(axis=1))

    def structure_pairs(self, m: int, cutoff: float) -> tuple[np.ndarray, ...]:
        """Unordered pairs ``(i, j, cell_shifts)`` of periodic structure ``m`` (local indices).

        Computed once per structure and cutoff by vesin and kept in memory: training on a
        fixed set of structures builds each neighbour list once.
        """
        key = (float(cutoff), int(m))
        if key not in self._pair_cache:
            a, b = int(self.offsets[m]), int(self.offsets[m + 1])
            self._pair_cache[key] = periodic_pairs(
                np.asarray(self.positions[a:b]), self.cell[m], self.pbc[m], cutoff
            )
        return self._pair_cache[key]

    @property
    def n_atoms_per(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def elements(self) -> np.ndarray:
        return np.unique(np.asarray(self.numbers))

    @property
    def model_targets(self) -> list[str]:
        """The targets a model can be trained to predict, sorted: all but the derivatives
        (``forces``, ``stress``), which come from the energy's gradient."""
        return [t for t in sorted(self.targets) if t not in ("forces", "stress")]

    def is_extensive(self, name: str) -> bool:
        """Whether target ``name`` grows with the structure's size, as the data declares it.

        The declaration is ``meta["extensive"][name]`` (QM9 declares all 12 targets); a
        target the data does not declare (the energies of MD17, ISO17, extxyz files) is
        extensive. This is the one place that decides pooling and atom references:
        extensive targets are a sum of atomic contributions with per-element references,
        intensive ones a mean over atoms without references.
        """
        if name not in self.targets:
            raise DataError(f"unknown target {name!r}; this data set has {sorted(self.targets)}")
        return bool(self.meta.get("extensive", {}).get(name, True))

    def is_per_atom(self, name: str) -> bool:
        """Whether target ``name`` has one row per atom (declared by the dataset)."""
        return name in self.per_atom

    def atom_index(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the per-atom arrays that belong to structures ``idx``, in order."""
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        return shift + np.arange(int(counts.sum()))

    def batch(
        self,
        idx: Sequence[int] | np.ndarray,
        cutoff: float | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Batch:
        """Gather the structures ``idx`` into one :class:`Batch` (pairs within ``cutoff``)."""
        idx = np.asarray(idx, dtype=np.int64)
        atom = self.atom_index(idx)
        counts = torch.from_numpy(self.offsets[idx + 1] - self.offsets[idx])
        positions = torch.from_numpy(np.asarray(self.positions[atom])).to(dtype)
        targets = {}
        for name, values in self.targets.items():
            rows = atom if self.is_per_atom(name) else idx
            targets[name] = torch.from_numpy(np.asarray(values[rows])).to(dtype)
        cell = pbc = None
        if self.cell is not None:
            cell = torch.from_numpy(np.asarray(self.cell[idx])).to(dtype)
            pbc = torch.from_numpy(np.asarray(self.pbc[idx]))
        return Batch(
            numbers=torch.from_numpy(np.asarray(self.numbers[atom]).astype(np.int64)),
            positions=positions,
            structure_index=torch.repeat_interleave(torch.arange(len(idx)), counts),
            n_atoms_per=counts,
            pairs=self._batch_pairs(idx, counts, positions, cutoff, cell, pbc),
            n_structures=len(idx),
            targets=targets,
            cell=cell,
            pbc=pbc,
        )

    def _batch_pairs(
        self,
        idx: np.ndarray,
        counts: torch.Tensor,
        positions: torch.Tensor,
        cutoff: float | None,
        cell: torch.Tensor | None,
        pbc: torch.Tensor | None,
    ) -> Pairs:
        """Symmetric-layout pairs of a batch: molecules by index arithmetic, periodic
        structures from their cached neighbour lists."""
        if pbc is None or not bool(pbc.any()):
            pair_i, pair_j = molecular_pairs(counts, positions, cutoff)
            return Pairs(pair_i, pair_j, None, True)
        periodic = pbc.any(dim=1).numpy()
        starts = np.concatenate([[0], np.cumsum(counts.numpy())[:-1]])
        # molecules of the batch: all their pairs at once, as if alone
        molecule_atoms = torch.from_numpy(np.repeat(~periodic, counts.numpy()))
        mol_counts = counts[torch.from_numpy(~periodic)]
        mol_i, mol_j = molecular_pairs(mol_counts, positions[molecule_atoms], cutoff)
        to_batch = torch.nonzero(molecule_atoms).squeeze(1)
        half = mol_i.shape[0] // 2
        parts_i, parts_j = [to_batch[mol_i[:half]]], [to_batch[mol_j[:half]]]
        parts_s = [np.zeros((half, 3), dtype=np.int64)]
        structures = []
        for k in np.flatnonzero(periodic):
            i, j, s = self.structure_pairs(int(idx[k]), cutoff)
            parts_i.append(torch.from_numpy(i + starts[k]))
            parts_j.append(torch.from_numpy(j + starts[k]))
            parts_s.append(s)
            structures.append(np.full(len(i), k))
        i, j = torch.cat(parts_i), torch.cat(parts_j)
        n_shift = np.concatenate(parts_s)
        pair_structure = np.concatenate([np.zeros(half, dtype=np.int64)] + structures)
        shifts = torch.einsum(
            "px,pxy->py",
            torch.from_numpy(n_shift).to(cell.dtype),
            cell[torch.from_numpy(pair_structure)],
        )
        return Pairs.symmetric_from_half(i, j, shifts)

    def atoms(self, m: int):
        """Structure ``m`` as an :class:`ase.Atoms` (targets attached as info / arrays)."""
        from ase import Atoms

        a, b = int(self.offsets[m]), int(self.offsets[m + 1])
        atoms = Atoms(
            numbers=np.asarray(self.numbers[a:b]), positions=np.asarray(self.positions[a:b])
        )
        if self.cell is not None:
            atoms.cell, atoms.pbc = np.asarray(self.cell[m]), np.asarray(self.pbc[m])
        for name, values in self.targets.items():
            if self.is_per_atom(name):
                atoms.arrays[name] = np.asarray(values[a:b])
            elif np.ndim(values[m]) == 0:
                atoms.info[name] = float(values[m])
            else:
                atoms.info[name] = np.asarray(values[m])
        for name, values in self.extras.items():
            atoms.info[name] = values[m].item() if hasattr(values[m], "item") else values[m]
        return atoms

    def subset(self, idx: Sequence[int] | np.ndarray) -> PackedDataset:
        """A new in-memory dataset of the structures ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        atom = self.atom_index(idx)
        counts = self.offsets[idx + 1] - self.offsets[idx]
        targets = {
            k: np.asarray(v[atom] if self.is_per_atom(k) else v[idx])
            for k, v in self.targets.items()
        }
        return PackedDataset(
            np.asarray(self.numbers[atom]),
            np.asarray(self.positions[atom]),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            targets,
            dict(self.units),
            {k: np.asarray(v[idx]) for k, v in self.extras.items()},
            dict(self.meta),
            self.per_atom,
            None if self.cell is None else np.asarray(self.cell[idx]),
            None if self.pbc is None else np.asarray(self.pbc[idx]),
        )

    @staticmethod
    def concatenate(parts: Iterable[PackedDataset]) -> PackedDataset:
        parts = list(parts)
        if not parts:
            raise DataError("nothing to concatenate: the dataset is empty")
        counts = np.concatenate([p.n_atoms_per for p in parts])
        cell = pbc = None
        if any(p.cell is not None for p in parts):  # molecules beside cells: zero cell, no pbc
            cell = np.concatenate(
                [np.zeros((len(p), 3, 3)) if p.cell is None else np.asarray(p.cell) for p in parts]
            )
            pbc = np.concatenate(
                [np.zeros((len(p), 3), bool) if p.pbc is None else np.asarray(p.pbc) for p in parts]
            )
        return PackedDataset(
            np.concatenate([np.asarray(p.numbers) for p in parts]),
            np.concatenate([np.asarray(p.positions) for p in parts]),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            {
                k: np.concatenate([np.asarray(p.targets[k]) for p in parts])
                for k in parts[0].targets
            },
            dict(parts[0].units),
            {k: np.concatenate([np.asarray(p.extras[k]) for p in parts]) for k in parts[0].extras},
            dict(parts[0].meta),
            parts[0].per_atom,
            cell,
            pbc,
        )

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike) -> Path:
        """Write to folder ``path`` atomically (a half-written folder never appears)."""
        path = Path(path)
        with atomic_folder(path) as tmp:
            np.save(tmp / "numbers.npy", np.asarray(self.numbers, dtype=np.int16))
            np.save(tmp / "positions.npy", np.asarray(self.positions, dtype=np.float64))
            np.save(tmp / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
            for k, v in self.targets.items():
                np.save(tmp / f"target.{k}.npy", np.asarray(v))
            for k, v in self.extras.items():
                v = np.asarray(v)
                if v.dtype == object:
                    v = v.astype(str)
                np.save(tmp / f"extra.{k}.npy", v)
            if self.cell is not None:
                np.save(tmp / "cell.npy", np.asarray(self.cell, dtype=np.float64))
                np.save(tmp / "pbc.npy", np.asarray(self.pbc, dtype=bool))
            meta = {
                "format_version": FORMAT_VERSION,
                "n_structures": len(self),
                "n_atoms": int(self.numbers.shape[0]),
                "units": self.units,
                "targets": sorted(self.targets),
                "per_atom": sorted(self.per_atom),
                "extras": sorted(self.extras),
                "periodic": self.cell is not None,
                "meta": self.meta,
                "checksums": {p.name: file_checksum(p) for p in sorted(tmp.glob("*.npy"))},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> PackedDataset:
        """Open a packed folder written by :meth:`save` (memory-mapped by default)."""
        path = Path(path)
        recover_folder(path)  # a save killed between its two renames
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{path}: not a packed atomlens dataset (no meta.json)")
        try:
            meta = json.loads(meta_file.read_text())
            mode = "r" if mmap else None

            def read(name):
                return np.load(path / name, mmap_mode=mode, allow_pickle=False)

            numbers, positions, offsets = (
                read("numbers.npy"),
                read("positions.npy"),
                read("offsets.npy"),
            )
            targets = {k: read(f"target.{k}.npy") for k in meta["targets"]}
            extras = {k: read(f"extra.{k}.npy") for k in meta["extras"]}
            cell = pbc = None
            if meta.get("periodic"):
                cell, pbc = np.asarray(read("cell.npy")), np.asarray(read("pbc.npy"))
            changed = [
                name
                for name, value in meta.get("checksums", {}).items()
                if file_checksum(path / name) != value
            ]
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: packed dataset is damaged or truncated ({err})") from err
        if changed:
            raise DataError(
                f"{path}: packed dataset is damaged: {', '.join(changed)} changed "
                f"since it was written (checksum in meta.json differs); rebuild it"
            )
        if len(offsets) != meta["n_structures"] + 1 or numbers.shape[0] != meta["n_atoms"]:
            raise DataError(f"{path}: packed dataset is truncated (sizes disagree with meta.json)")
        dataset = cls(
            numbers,
            positions,
            np.asarray(offsets),
            targets,
            meta["units"],
            extras,
            meta.get("meta", {}),
            meta.get("per_atom"),
            cell,
            pbc,
        )
        dataset.check_arrays(str(path))
        return dataset


def refuse_what_layout_drops(path, dataset: PackedDataset, layout: str, keep) -> None:
    """:class:`DataError` naming ``path`` when ``layout`` (molecules with energies and forces)
    would drop part of ``dataset``: cells and pbc, stress or any target but ``keep``."""
    lost = ["cells and pbc"] if len(dataset.periodic_structures()) else []
    lost += [repr(name) for name in sorted(dataset.targets) if name not in keep]
    if lost:
        raise DataError(
            f"{path}: {layout} hold molecules with energies and forces only; writing would "
            f"drop the dataset's {', '.join(lost)}; write it to an .extxyz file instead "
            f"(write_ase, or atomlens sample --out <name>.extxyz), which keeps them"
        )


def file_checksum(path: str | os.PathLike) -> str:
    """A fast content hash of a file (BLAKE2b, 128 bit, hex), kept in ``meta.json``."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


class BatchSampler:
    """Yields index arrays of whole batches; reshuffled each epoch from the pair ``(seed, epoch)``.

    With ``world_size > 1`` each rank gets its contiguous share of every global batch, so
    data-parallel training sees exactly the global batches of single-process training.
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise DataError("cannot iterate an empty split")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or (batch_size < 1)
        ):
            raise ValueError(f"the batch size must be an integer >= 1, not {batch_size!r}")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.indices
        if self.shuffle:
            # (seed, epoch) as one entropy pair: with seed + epoch, seed s + 1 replayed seed
            # s's orders one epoch late (ensemble members seed + k saw each other's batches)
            rng = np.random.default_rng([self.seed, self.epoch])
            order = order[rng.permutation(len(order))]
        self.epoch += 1
        for b in range(len(self)):
            glob = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield np.array_split(glob, self.world_size)[self.rank]


class BatchDataset(torch.utils.data.Dataset):
    """Adapter for :class:`torch.utils.data.DataLoader`: an index array -> a :class:`Batch`."""

    def __init__(self, data: PackedDataset, cutoff: float | None, dtype=torch.float32):
        self.data, self.cutoff, self.dtype = data, cutoff, dtype

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx) -> Batch:
        return self.data.batch(idx, self.cutoff, self.dtype)


def make_loader(
    data: PackedDataset,
    indices: np.ndarray,
    batch_size: int,
    cutoff: float | None,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    dtype=torch.float32,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`Batch` objects over ``indices`` of ``data``."""
    sampler = BatchSampler(indices, batch_size, shuffle, seed, rank, world_size)
    return torch.utils.data.DataLoader(
        BatchDataset(data, cutoff, dtype),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        persistent_workers=num_workers > 0,
    )


def _identity(batch: Batch) -> Batch:
    return batch


def _looks_per_atom(values: np.ndarray, n_structures: int, n_atoms: int) -> bool:
    """Format-1 datasets did not declare per-atom targets: arrays of one row per atom with
    a second axis (forces), or one value per atom where atoms outnumber structures."""
    return values.shape[0] == n_atoms and (values.ndim > 1 or n_structures != n_atoms)


def dataset_from_atoms(
    atoms_list,
    source: str = "<atoms>",
    energy_unit: str | None = None,
    length_unit: str | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    targets: bool = True,
) -> PackedDataset:
    """Pack ASE ``Atoms`` (validated: elements, NaN, overlaps, cells) with their energies,
    forces and stress.

    Values come from each structure's calculator results (e.g. a ``SinglePointCalculator``,
    as ASE's extxyz and db readers leave them), else from ``atoms.info[energy_key]``,
    ``atoms.arrays[forces_key]``, ``atoms.info[stress_key]``. Units are never guessed: the
    structures state them (``energy_unit`` / ``length_unit`` in every ``info``) or the
    caller declares them (``energy_unit="eV"``, ``"kcal/mol"``, ...; forces in
    energy/length, positions in Angstrom unless ``length_unit``); they are stored as
    targets ``energy`` (eV), ``forces`` (eV/Angstrom), ``stress`` (eV/Angstrom^3) when
    every structure has them (one finite number per energy, (n_atoms, 3) forces, 3x3 or
    Voigt stress; calculator results only when they belong to the atoms). Ready for ``atomlens.training.train_model(config, data=...)``.
    ``targets=False`` packs the geometry only. Periodic ``Atoms`` keep their cell and pbc.
    """
    from .sources.ase_files import pack_frames

    if not isinstance(atoms_list, (list, tuple)):
        atoms_list = [atoms_list]
    if len(atoms_list) == 0:
        raise DataError(f"{source}: the dataset is empty")
    keys = (energy_key, forces_key, stress_key) if targets else (None, None, None)
    return pack_frames(
        list(atoms_list), source, *keys, energy_unit=energy_unit, length_unit=length_unit
    )
