"""Packed molecular datasets: contiguous arrays plus offsets, memory-mapped from disk.

A dataset of ``n_structures`` molecules with ``n_atoms_total`` atoms in all is stored as

* ``numbers``   (n_atoms_total,) int16     atomic numbers
* ``positions`` (n_atoms_total, 3) float64 Angstrom
* ``offsets``   (n_structures + 1,) int64  atoms of structure m are offsets[m]:offsets[m+1]
* ``targets``   name -> (n_structures,) or (n_atoms_total, ...) arrays, in internal units
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
from .batch import Batch
from .neighbors import molecular_pairs

FORMAT_VERSION = 1
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
    ):
        self.numbers = numbers
        self.positions = positions
        self.offsets = offsets
        self.targets = dict(targets or {})
        self.units = {"positions": "Angstrom", **(units or {})}
        self.extras = dict(extras or {})
        self.meta = dict(meta or {})

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
    ) -> PackedDataset:
        """Pack a list of ``(numbers, positions)``; per-atom targets are lists of arrays."""
        if len(structures) == 0:
            raise DataError(f"{source}: the dataset is empty")
        counts = np.array([len(z) for z, _ in structures], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        numbers = np.concatenate([np.asarray(z, dtype=np.int16) for z, _ in structures])
        positions = np.concatenate(
            [np.asarray(r, dtype=np.float64).reshape(-1, 3) for _, r in structures]
        )
        packed_targets = {}
        for name, values in (targets or {}).items():
            first = np.asarray(values[0])
            if first.ndim >= 1 and first.shape[0] == counts[0] and first.ndim == 2:
                packed_targets[name] = np.concatenate([np.asarray(v, np.float64) for v in values])
            else:
                packed_targets[name] = np.asarray(values, dtype=np.float64).reshape(len(counts))
        packed_extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        ds = cls(numbers, positions, offsets, packed_targets, units, packed_extras, meta)
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
            raise DataError(f"{source}: numbers {self.numbers.shape} and positions "
                            f"{self.positions.shape} do not fit (n_atoms,) and (n_atoms, 3)")
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != self.numbers.shape[0]:
            raise DataError(f"{source}: offsets must run from 0 to the number of atoms "
                            f"({self.numbers.shape[0]}); they run from {offsets[0]} to "
                            f"{offsets[-1]}")
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
            if values.shape[0] not in (n, self.numbers.shape[0]):
                raise DataError(f"{source}: target {name!r} has {values.shape[0]} rows, "
                                f"expected {n} structures or {self.numbers.shape[0]} atoms")
            if not np.isfinite(values).all():
                raise DataError(f"{source}: target {name!r} has non-finite values")
            if name not in self.units:
                raise DataError(f"{source}: target {name!r} has no unit recorded")
        for name, values in self.extras.items():
            if values.shape[:1] != (n,):
                raise DataError(f"{source}: extra {name!r} has shape {values.shape} for {n} "
                                f"structures")

    def _check_overlaps(self, source: str) -> None:
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
                    f"(overlapping atoms)")

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms_per(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def elements(self) -> np.ndarray:
        return np.unique(np.asarray(self.numbers))

    def is_per_atom(self, name: str) -> bool:
        return self.targets[name].shape[0] == self.numbers.shape[0] and (
            self.targets[name].ndim > 1 or len(self) != self.numbers.shape[0])

    def atom_index(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the per-atom arrays that belong to structures ``idx``, in order."""
        starts = self.offsets[idx]
        counts = self.offsets[idx + 1] - starts
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        return shift + np.arange(int(counts.sum()))

    def batch(self, idx: Sequence[int] | np.ndarray, cutoff: float | None = None,
              dtype: torch.dtype = torch.float32) -> Batch:
        """Gather the structures ``idx`` into one :class:`Batch` (pairs within ``cutoff``)."""
        idx = np.asarray(idx, dtype=np.int64)
        atom = self.atom_index(idx)
        counts = torch.from_numpy(self.offsets[idx + 1] - self.offsets[idx])
        positions = torch.from_numpy(np.asarray(self.positions[atom])).to(dtype)
        pair_i, pair_j = molecular_pairs(counts, positions, cutoff)
        targets = {}
        for name, values in self.targets.items():
            rows = atom if self.is_per_atom(name) else idx
            targets[name] = torch.from_numpy(np.asarray(values[rows])).to(dtype)
        return Batch(
            numbers=torch.from_numpy(np.asarray(self.numbers[atom]).astype(np.int64)),
            positions=positions,
            structure_index=torch.repeat_interleave(torch.arange(len(idx)), counts),
            n_atoms_per=counts,
            pair_i=pair_i,
            pair_j=pair_j,
            n_structures=len(idx),
            targets=targets,
        )

    def atoms(self, m: int):
        """Structure ``m`` as an :class:`ase.Atoms` (targets attached as info / arrays)."""
        from ase import Atoms

        a, b = int(self.offsets[m]), int(self.offsets[m + 1])
        atoms = Atoms(numbers=np.asarray(self.numbers[a:b]), positions=np.asarray(self.positions[a:b]))
        for name, values in self.targets.items():
            if self.is_per_atom(name):
                atoms.arrays[name] = np.asarray(values[a:b])
            else:
                atoms.info[name] = float(values[m])
        for name, values in self.extras.items():
            atoms.info[name] = values[m].item() if hasattr(values[m], "item") else values[m]
        return atoms

    def subset(self, idx: Sequence[int] | np.ndarray) -> PackedDataset:
        """A new in-memory dataset of the structures ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        atom = self.atom_index(idx)
        counts = self.offsets[idx + 1] - self.offsets[idx]
        targets = {k: np.asarray(v[atom] if self.is_per_atom(k) else v[idx])
                   for k, v in self.targets.items()}
        return PackedDataset(
            np.asarray(self.numbers[atom]), np.asarray(self.positions[atom]),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), targets, dict(self.units),
            {k: np.asarray(v[idx]) for k, v in self.extras.items()}, dict(self.meta))

    @staticmethod
    def concatenate(parts: Iterable[PackedDataset]) -> PackedDataset:
        parts = list(parts)
        if not parts:
            raise DataError("nothing to concatenate: the dataset is empty")
        counts = np.concatenate([p.n_atoms_per for p in parts])
        return PackedDataset(
            np.concatenate([np.asarray(p.numbers) for p in parts]),
            np.concatenate([np.asarray(p.positions) for p in parts]),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            {k: np.concatenate([np.asarray(p.targets[k]) for p in parts]) for k in parts[0].targets},
            dict(parts[0].units),
            {k: np.concatenate([np.asarray(p.extras[k]) for p in parts]) for k in parts[0].extras},
            dict(parts[0].meta))

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
            meta = {"format_version": FORMAT_VERSION, "n_structures": len(self),
                    "n_atoms": int(self.numbers.shape[0]), "units": self.units,
                    "targets": sorted(self.targets), "extras": sorted(self.extras),
                    "meta": self.meta,
                    "checksums": {p.name: file_checksum(p) for p in sorted(tmp.glob("*.npy"))}}
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

            numbers, positions, offsets = read("numbers.npy"), read("positions.npy"), read("offsets.npy")
            targets = {k: read(f"target.{k}.npy") for k in meta["targets"]}
            extras = {k: read(f"extra.{k}.npy") for k in meta["extras"]}
            changed = [name for name, value in meta.get("checksums", {}).items()
                       if file_checksum(path / name) != value]
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: packed dataset is damaged or truncated ({err})") from err
        if changed:
            raise DataError(f"{path}: packed dataset is damaged: {', '.join(changed)} changed "
                            f"since it was written (checksum in meta.json differs); rebuild it")
        if len(offsets) != meta["n_structures"] + 1 or numbers.shape[0] != meta["n_atoms"]:
            raise DataError(f"{path}: packed dataset is truncated (sizes disagree with meta.json)")
        dataset = cls(numbers, positions, np.asarray(offsets), targets, meta["units"], extras,
                      meta.get("meta", {}))
        dataset.check_arrays(str(path))
        return dataset


def file_checksum(path: str | os.PathLike) -> str:
    """A fast content hash of a file (BLAKE2b, 128 bit, hex), kept in ``meta.json``."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


class BatchSampler:
    """Yields index arrays of whole batches; reshuffled each epoch from ``seed + epoch``.

    With ``world_size > 1`` each rank gets its contiguous share of every global batch, so
    data-parallel training sees exactly the global batches of single-process training.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise DataError("cannot iterate an empty split")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
                batch_size < 1):
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
            order = order[np.random.default_rng(self.seed + self.epoch).permutation(len(order))]
        self.epoch += 1
        for b in range(len(self)):
            glob = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.array_split(glob, self.world_size)[self.rank]


class BatchDataset(torch.utils.data.Dataset):
    """Adapter for :class:`torch.utils.data.DataLoader`: an index array -> a :class:`Batch`."""

    def __init__(self, data: PackedDataset, cutoff: float | None, dtype=torch.float32):
        self.data, self.cutoff, self.dtype = data, cutoff, dtype

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx) -> Batch:
        return self.data.batch(idx, self.cutoff, self.dtype)


def make_loader(data: PackedDataset, indices: np.ndarray, batch_size: int, cutoff: float | None,
                shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, dtype=torch.float32) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`Batch` objects over ``indices`` of ``data``."""
    sampler = BatchSampler(indices, batch_size, shuffle, seed, rank, world_size)
    return torch.utils.data.DataLoader(
        BatchDataset(data, cutoff, dtype), sampler=sampler, batch_size=None,
        num_workers=num_workers, collate_fn=_identity, persistent_workers=num_workers > 0)


def _identity(batch: Batch) -> Batch:
    return batch


def dataset_from_atoms(atoms_list, source: str = "<atoms>") -> PackedDataset:
    """Pack ASE Atoms objects (validated: elements, NaN, overlaps) without targets."""
    if not isinstance(atoms_list, (list, tuple)):
        atoms_list = [atoms_list]
    return PackedDataset.from_structures(
        [(a.get_atomic_numbers(), a.get_positions()) for a in atoms_list], source=source)
