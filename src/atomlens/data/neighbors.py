"""Neighbour pairs for isolated molecules, computed vectorised for a whole batch.

Molecules are small (QM9: at most 29 atoms), so all intra-molecular pairs are enumerated
by index arithmetic (no per-molecule Python) and then filtered by the cutoff.
"""

from __future__ import annotations

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
