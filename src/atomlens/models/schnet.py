"""SchNet: continuous-filter convolutions on atom positions (Schütt et al., NeurIPS 2017; JCP 2018).

    x_i^(0) = a_{Z_i}
    W(r_ij) = Dense(ssp(Dense(e(r_ij)))) * f_cut(r_ij),   e_k(r) = exp(-gamma (r - mu_k)^2)
    cfconv:  x_i' = sum_j x_j ∘ W(r_ij)
    v_i = Dense(ssp(Dense(cfconv(Dense(x))_i)));   x_i <- x_i + v_i     (T interaction blocks)
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import CosineCutoff, GaussianRBF, ShiftedSoftplus, pair_expansion, scatter_sum


class SchNetInteraction(nn.Module):
    """One interaction block: atom-wise -> cfconv -> atom-wise -> ssp -> atom-wise."""

    def __init__(self, n_atom_basis: int, n_filters: int, n_rbf: int):
        super().__init__()
        self.in2f = nn.Linear(n_atom_basis, n_filters, bias=False)
        self.filter_network = nn.Sequential(
            nn.Linear(n_rbf, n_filters), ShiftedSoftplus(), nn.Linear(n_filters, n_filters))
        self.f2out = nn.Sequential(
            nn.Linear(n_filters, n_atom_basis), ShiftedSoftplus(),
            nn.Linear(n_atom_basis, n_atom_basis))

    def forward(self, x, rbf, f_cut, pair_i, pair_j, symmetric: bool) -> torch.Tensor:
        filters = self.filter_network(rbf) * f_cut[:, None]
        y = self.in2f(x)
        messages = torch.index_select(y, 0, pair_j)
        if symmetric:  # one filter per unordered pair serves both directions (no copy)
            messages = (messages.view(2, -1, y.shape[1]) * filters).view(-1, y.shape[1])
        else:
            messages = messages * filters
        return self.f2out(scatter_sum(messages, pair_i, x.shape[0]))


class SchNet(nn.Module):
    """SchNet representation: atomic numbers and positions -> atom features (n_atoms, F).

    Args:
        n_atom_basis: F, feature size of atoms.
        n_interactions: T, number of interaction blocks.
        n_filters: size of the continuous filters (F in the paper).
        n_rbf, rbf_stop, rbf_gamma: radial basis (centres 0..rbf_stop Angstrom).
        cutoff: cosine cutoff radius in Angstrom, or ``None`` for none (NeurIPS version).
        max_z: largest atomic number the embedding knows.
    """

    def __init__(self, n_atom_basis: int = 128, n_interactions: int = 6, n_filters: int = 128,
                 n_rbf: int = 20, cutoff: float | None = 5.0, rbf_stop: float | None = None,
                 rbf_gamma: float | None = None, max_z: int = 100):
        super().__init__()
        self.n_atom_basis, self.cutoff = n_atom_basis, cutoff
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.rbf = GaussianRBF(n_rbf, rbf_stop if rbf_stop is not None else (cutoff or 30.0),
                               gamma=rbf_gamma)
        self.cutoff_fn = CosineCutoff(cutoff) if cutoff is not None else None
        self.interactions = nn.ModuleList(
            SchNetInteraction(n_atom_basis, n_filters, n_rbf) for _ in range(n_interactions))

    def forward(self, numbers, positions, pair_i, pair_j, symmetric: bool = True) -> torch.Tensor:
        x = self.embedding(numbers)
        rbf, f_cut = pair_expansion(self.rbf, self.cutoff_fn, positions, pair_i, pair_j, symmetric)
        for interaction in self.interactions:
            x = x + interaction(x, rbf, f_cut, pair_i, pair_j, symmetric)
        return x
