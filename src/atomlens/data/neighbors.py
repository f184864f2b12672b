"""Neighbour pairs: molecules by index arithmetic, periodic cells by a cell list (vesin).

Molecules are small (QM9: at most 29 atoms), so all intra-molecular pairs are enumerated
by index arithmetic for a whole batch (no per-molecule Python) and then filtered by the
cutoff. Periodic structures go through vesin's compiled cell list, one call per structure;
packed datasets cache the result, and MD reuses it across steps (:class:`VerletList`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def molecular_pairs(
    n_atoms_per: torch.Tensor,
    positions: torch.Tensor | None = None,
    cutoff: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All directed pairs (i, j), i != j, of atoms in the same structure, in symmetric layout.

    The first half of the returned pairs has i < j, the second half is the same pairs
    reversed, so a model may evaluate pair functions of the distance once per unordered pair
    (``n_pairs // 2`` is a shape, known without a host sync).

    Args:
        n_atoms_per: (n_structures,) atoms per structure; atoms are stored contiguously.
        positions: (n_atoms, 3) positions in Angstrom; needed only with ``cutoff``.
        cutoff: keep pairs closer than this (Angstrom); ``None`` keeps all pairs.

    Returns:
        pair_i, pair_j: (n_pairs,) int64 atom indices into the batch.
    """
    counts = n_atoms_per.to(torch.int64)
    device = counts.device
    n_atoms = int(counts.sum())
    offsets = torch.cumsum(counts, 0) - counts
    structure = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    row_len = counts[structure]  # each atom pairs with every atom of its structure
    pair_i = torch.repeat_interleave(torch.arange(n_atoms, device=device), row_len)
    row_start = torch.cumsum(row_len, 0) - row_len
    local_j = torch.arange(pair_i.shape[0], device=device) - row_start[pair_i]
    pair_j = offsets[structure[pair_i]] + local_j
    keep = pair_i < pair_j
    pair_i, pair_j = pair_i[keep], pair_j[keep]
    if cutoff is not None:
        if positions is None:
            raise ValueError("positions are needed to filter pairs by a cutoff")
        d2 = (positions[pair_i] - positions[pair_j]).pow(2).sum(-1)
        near = d2 < cutoff * cutoff
        pair_i, pair_j = pair_i[near], pair_j[near]
    return torch.cat([pair_i, pair_j]), torch.cat([pair_j, pair_i])


#: the smallest volume (Angstrom^3), area (Angstrom^2) or length (Angstrom) that the periodic
#: cell vectors of a structure (3, 2 or 1 of them) may span
MIN_CELL_EXTENT = 1e-6


def cell_problem(cell: np.ndarray, pbc: np.ndarray) -> str | None:
    """What makes ``cell`` unusable for a structure periodic along ``pbc``, or None.

    The cell must be finite, and its periodic vectors independent: the volume they span (3
    periodic directions), their area (2: a slab, a sheet) or length (1: a wire) at least
    :data:`MIN_CELL_EXTENT`. The vectors of the directions that are not periodic may be
    anything, zero included (ASE's slabs, sheets and nanotubes leave them zero)."""
    cell = np.asarray(cell, dtype=np.float64)
    if not np.isfinite(cell).all():
        return f"its cell has non-finite (NaN/inf) entries: {cell.tolist()}"
    rows = cell[np.asarray(pbc, dtype=bool)]
    if len(rows) == 0:
        return None
    extent = math.sqrt(max(float(np.linalg.det(rows @ rows.T)), 0.0))  # the Gram determinant
    if not extent >= MIN_CELL_EXTENT:
        kind = {3: "volume", 2: "area", 1: "length"}[len(rows)]
        return (
            f"its periodic cell vectors span no {kind} ({extent:.3g}; they must be "
            f"independent): cell {cell.tolist()}, pbc {np.asarray(pbc).tolist()}"
        )
    return None


def periodic_pairs(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unordered pair within ``cutoff`` of one periodic structure, once: ``(i, j, n)``.

    ``n`` (n_pairs, 3) int are the cell shifts of j's image, so that
    r_ij = r_j - r_i + n_ij . cell < cutoff. Computed by vesin (a compiled cell list); cells
    smaller than twice the cutoff give every image, an atom's own images included (i == j,
    n != 0). Combine with :meth:`Pairs.symmetric_from_half` for the symmetric layout.

    Args:
        positions: (n_atoms, 3) Angstrom. cell: (3, 3) lattice vectors as rows (Angstrom).
        pbc: (3,) bool, periodic directions. cutoff: Angstrom.
    """
    from vesin import NeighborList

    if cutoff is None:
        raise ValueError("periodic structures need a model with a cutoff")
    from .dataset import DataError

    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64)
    # checked at every build, not only when a structure is first seen: a cell that goes NaN
    # in a run (a blown-up NPT step) reached vesin, which killed the process (SIGFPE)
    problem = cell_problem(cell, pbc)
    if problem is not None:
        raise DataError(f"a periodic structure: {problem}")
    positions = np.asarray(positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        raise DataError("a periodic structure has non-finite (NaN/inf) positions")
    i, j, shifts = NeighborList(cutoff=float(cutoff), full_list=False).compute(
        positions, cell, pbc.tolist(), "ijS"
    )
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)


class VerletList:
    """Pairs within ``cutoff + skin`` of one structure, reused until an atom moves skin / 2.

    For molecular dynamics: the list is rebuilt when any atom has moved more than half the
    skin since the last build (then no pair can have crossed into the cutoff unseen), or
    when the cell, the periodicity or the atoms change. Pairs beyond the cutoff stay in the
    list; the models' smooth cutoff gives them exactly zero weight.
    """

    def __init__(self, cutoff: float | None, skin: float = 1.0):
        self.cutoff, self.skin = cutoff, float(skin)
        self._reference: np.ndarray | None = None
        self._cell = self._pbc = None
        self.pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.builds = 0

    def update(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> bool:
        """Rebuild the list if needed; True when it was rebuilt."""
        positions = np.asarray(positions, dtype=np.float64)
        cell, pbc = np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool)
        if (
            self._reference is not None
            and self._reference.shape == positions.shape
            and np.array_equal(cell, self._cell)
            and np.array_equal(pbc, self._pbc)
        ):
            moved = np.einsum(
                "ax,ax->a", positions - self._reference, positions - self._reference
            ).max(initial=0.0)
            if moved <= (0.5 * self.skin) ** 2:
                return False
        reach = None if self.cutoff is None else self.cutoff + self.skin
        if pbc.any():
            self.pairs = periodic_pairs(positions, cell, pbc, reach)
        else:
            n = len(positions)
            i, j = np.triu_indices(n, k=1)
            if reach is not None:
                d2 = ((positions[j] - positions[i]) ** 2).sum(-1)
                i, j = i[d2 < reach * reach], j[d2 < reach * reach]
            self.pairs = (i.astype(np.int64), j.astype(np.int64), np.zeros((len(i), 3), np.int64))
        self._reference, self._cell, self._pbc = positions.copy(), cell.copy(), pbc.copy()
        self.builds += 1
        return True
