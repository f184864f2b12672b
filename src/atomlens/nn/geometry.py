"""Pair geometry: the one place where atom positions become pair vectors.

    r_ij = r_j - r_i + shift_ij          (Angstrom; shift_ij = n_ij . cell, a lattice vector)

Every model, the filter tables, the ASE calculator and the insight probes read distances
through :func:`pair_vectors`. For the symmetric layout (:class:`~atomlens.data.batch.Pairs`)
only the first half of the pairs is evaluated: the reversed half has r_ji = -r_ij.

Strain (for stress): a symmetric strain eps deforms every length of a structure,
x -> x (1 + eps) for positions, cell vectors and therefore the periodic shifts, and

    sigma = (1 / V) dE/d eps          (eV/Angstrom^3; ASE's sign: positive under tension)

which :func:`apply_strain` makes differentiable.
"""

from __future__ import annotations

import torch

from ..data.batch import Pairs


def pair_vectors(positions: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """r_ij = r_j - r_i + shift_ij for the pairs a model evaluates, ``(n_evaluated, 3)``.

    With ``pairs.symmetric`` these are the first half of the pairs (each unordered pair once).
    """
    n = pairs.n_evaluated
    i, j = pairs.i[:n], pairs.j[:n]
    vectors = torch.index_select(positions, 0, j) - torch.index_select(positions, 0, i)
    if pairs.shifts is not None:
        vectors = vectors + pairs.shifts[:n]
    return vectors


def pair_distances(positions: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """|r_ij| for the pairs a model evaluates, ``(n_evaluated,)`` Angstrom."""
    return pair_vectors(positions, pairs).norm(dim=-1)


def apply_strain(
    positions: torch.Tensor,
    pairs: Pairs,
    cell: torch.Tensor,
    structure_index: torch.Tensor,
    strain: torch.Tensor,
) -> tuple[torch.Tensor, Pairs, torch.Tensor]:
    """Deform positions, periodic shifts and cells by ``1 + eps`` per structure.

    ``strain`` is ``(n_structures, 3, 3)`` (symmetrised here); at ``strain = 0`` nothing moves,
    and ``dE/d strain`` is the virial. Returns ``(positions, pairs, cell)`` deformed.
    """
    eps = 0.5 * (strain + strain.transpose(1, 2))
    positions = positions + torch.einsum("ax,axy->ay", positions, eps[structure_index])
    if pairs.shifts is not None:
        pair_structure = structure_index[pairs.i]
        shifts = pairs.shifts + torch.einsum("px,pxy->py", pairs.shifts, eps[pair_structure])
        pairs = Pairs(pairs.i, pairs.j, shifts, pairs.symmetric)
    cell = cell + torch.bmm(cell, eps)
    return positions, pairs, cell


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|det(cell)| per structure, ``(n_structures,)`` Angstrom^3."""
    return torch.linalg.det(cell).abs()
