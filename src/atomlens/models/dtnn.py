"""DTNN: deep tensor neural network (Schütt et al., Nat. Commun. 8, 13890, 2017).

    c_i^(0) = C_{Z_i}
    d_hat_ij,k = exp(-(d_ij - k Delta_mu)^2 / (2 sigma^2))
    v_ij = tanh( W^fc ( (W^cf c_j + b^f1) ∘ (W^df d_hat_ij + b^f2) ) )      (factorised tensor layer)
    c_i^(t+1) = c_i^(t) + sum_{j != i} v_ij^(t)                            (T passes)

A smooth cosine cutoff (default 20 Angstrom, the end of the paper's distance expansion)
multiplies v_ij, so atoms farther apart do not interact at all: two distant copies of a
molecule have exactly twice its energy (size extensivity).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batch import Pairs
from ..nn import CosineCutoff, GaussianRBF, scatter_sum
from ..nn.geometry import pair_distances
from ..nn.linear import Linear
from .base import Representation


class DTNNInteraction(nn.Module):
    """v_ij = tanh(W^fc((W^cf c_j + b^f1) ∘ (W^df d_hat_ij + b^f2)))."""

    def __init__(self, n_atom_basis: int, n_factors: int, n_rbf: int):
        super().__init__()
        self.coefficient_to_factor = Linear(n_atom_basis, n_factors)  # W^cf, b^f1
        self.distance_to_factor = Linear(n_rbf, n_factors)  # W^df, b^f2
        self.factor_to_coefficient = Linear(n_factors, n_atom_basis, bias=False)  # W^fc

    def forward(self, c, rbf, f_cut, pairs: Pairs) -> torch.Tensor:
        distance_factor = self.distance_to_factor(rbf)
        coefficient_factor = torch.index_select(self.coefficient_to_factor(c), 0, pairs.j)
        if pairs.symmetric:  # one distance factor per unordered pair serves both directions
            n_factors = distance_factor.shape[1]
            product = (coefficient_factor.view(2, -1, n_factors) * distance_factor).view(
                -1, n_factors
            )
            f_cut = f_cut.repeat(2)
        else:
            product = coefficient_factor * distance_factor
        v = torch.tanh(self.factor_to_coefficient(product))
        return scatter_sum(v * f_cut[:, None], pairs.i, c.shape[0])


class DTNN(Representation):
    """DTNN representation: atomic numbers and positions -> coefficient vectors (n_atoms, B).

    Args:
        n_atom_basis: B, size of the atom coefficient vectors.
        n_interactions: T, interaction passes.
        n_factors: size of the factorised tensor layer.
        n_rbf, rbf_start, rbf_stop, rbf_gamma: Gaussian distance expansion, centres evenly
            spaced from ``rbf_start`` to ``rbf_stop``. The paper (Methods) puts them every
            Delta_mu = 0.2 Angstrom from mu_min = -1 to mu_max = 20 Angstrom for GDB-9 (106
            centres) with sigma = 0.2 Angstrom, i.e. gamma = 1 / (2 sigma^2) = 12.5. Starting at
            0 (the default, 101 centres) differs only for distances below ~0.5 Angstrom, which
            molecules never have: the centres below 0 are < 1e-6 at d = 1 Angstrom.
        cutoff: cosine cutoff in Angstrom (``None``: interact at any distance).
        shared_interactions: one set of interaction weights for all passes.
    """

    def __init__(
        self,
        n_atom_basis: int = 30,
        n_interactions: int = 3,
        n_factors: int = 60,
        n_rbf: int = 101,
        cutoff: float | None = 20.0,
        rbf_stop: float | None = 20.0,
        rbf_gamma: float | None = 12.5,
        shared_interactions: bool = False,
        max_z: int = 100,
        rbf_start: float = 0.0,
    ):
        super().__init__()
        if rbf_stop is None and cutoff is None:
            raise ValueError("DTNN needs rbf_stop (the last Gaussian centre) without a cutoff")
        self.n_atom_basis, self.cutoff = n_atom_basis, cutoff
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.rbf = GaussianRBF(
            n_rbf, rbf_stop if rbf_stop is not None else cutoff, start=rbf_start, gamma=rbf_gamma
        )
        self.cutoff_fn = CosineCutoff(cutoff) if cutoff is not None else None
        n_distinct = 1 if shared_interactions else n_interactions
        blocks = [DTNNInteraction(n_atom_basis, n_factors, n_rbf) for _ in range(n_distinct)]
        self.interactions = nn.ModuleList(blocks)
        self.n_interactions = n_interactions

    def forward(self, numbers, positions, pairs: Pairs, frozen=None) -> torch.Tensor:
        """Coefficient vectors ``(n_atoms, n_atom_basis)`` after T passes."""
        c = self.embedding(numbers)
        d = pair_distances(positions, pairs)
        rbf = self.rbf(d)
        f_cut = self.cutoff_fn(d) if self.cutoff_fn is not None else torch.ones_like(d)
        for t in range(self.n_interactions):
            block = self.interactions[t % len(self.interactions)]
            c = c + block(c, rbf, f_cut, pairs)
        return c
