"""SchNet: continuous-filter convolutions on atom positions (Schütt et al., NeurIPS 2017; JCP 2018).

    x_i^(0) = a_{Z_i}
    W(r_ij) = Dense(ssp(Dense(e(r_ij)))) * f_cut(r_ij),   e_k(r) = exp(-gamma (r - mu_k)^2)
    cfconv:  x_i' = sum_j x_j ∘ W(r_ij)
    v_i = Dense(ssp(Dense(cfconv(Dense(x))_i)));   x_i <- x_i + v_i     (T interaction blocks)

Tabulated filters (``filter_spacing``, with a cutoff): W depends on the distance alone, so
each block evaluates its filter network (and dW/dr, analytically) on a grid of distances
0..r_c and the pairs read W from cubic Hermite polynomials between the grid nodes. Same
weights, same model: at 0.02 Angstrom spacing the filters differ from the direct evaluation
by less than float32 rounding, values and forces stay continuous, and the filter network
runs on ~250 grid points per step instead of on every pair of the batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..data.batch import Pairs
from ..nn import (
    CosineCutoff,
    GaussianRBF,
    ShiftedSoftplus,
    cfconv_symmetric,
    cfconv_tabulated,
    scatter_sum,
)
from ..nn.cfconv import IntervalPairs, filter_lookup, interval_pairs
from ..nn.filter_tables import filter_tables
from ..nn.geometry import pair_distances
from ..nn.linear import Linear, batch_rows, pad_rows
from .base import Representation, hooked

#: training batches carry their atom features in bucket-sized arrays (SchNet.forward)
PAD_TRAINING_BATCHES = True

#: device types on which a model that is not frozen evaluates its filters from tables (the
#: tables are rebuilt every training step, from 250 nodes instead of every pair). On a GPU
#: the filter network runs on every pair instead, as the paper's SchNet does: the same
#: function up to the tables' error (``filter_spacing``), with fewer launches per step.
#: H200, QM9 SchNet 128/6 (benchmarks/gpu_variants.py), training molecules/s at batch 100
#: and 1000: tables 6,749 and 53,935; per-pair filters 8,388 and 71,739 (inference 16,311
#: and 116,405 against 31,438 and 203,138). Frozen models (MD) keep their tables anywhere.
TABLES_ON = ("cpu",)

#: the most grid nodes of a filter table (the tables take nodes x 4 x n_filters numbers
#: per interaction; 20,000 nodes of 128 filters are 41 MB in float32)
MAX_TABLE_NODES = 20_000


class FrozenSchNet(NamedTuple):
    """:meth:`SchNet.freeze`'s weight-only state."""

    #: one Hermite table per block (:meth:`SchNet.filter_tables`), None without tables
    tables: list[torch.Tensor] | None
    #: the first block's ``in2f`` of the embedding table, ``(max_z + 1, n_filters)``
    first_in2f: torch.Tensor | None


class TabulatedFilters(NamedTuple):
    """The filters ``W(r)`` of the evaluated pairs as their Hermite table and the pairs'
    distances in node spacings: the convolution reads them without storing a ``(P, F)``
    array (:func:`~atomlens.nn.cfconv.cfconv_tabulated`); :meth:`values` gives the array."""

    table: torch.Tensor  # (n_intervals, 4, n_filters)
    grid: torch.Tensor  # (P,)
    #: the same pairs in the order of the convolution's by-interval kernels
    #: (:func:`~atomlens.nn.cfconv.interval_pairs`), or None
    by_interval: IntervalPairs | None = None

    def values(self) -> torch.Tensor:
        return filter_lookup(self.table, self.grid)


def filter_values(filters: torch.Tensor | TabulatedFilters) -> torch.Tensor:
    """The ``(P, n_filters)`` filter array of an interaction's ``filters`` argument."""
    return filters.values() if isinstance(filters, TabulatedFilters) else filters


def tabulate_filters(
    rbf: GaussianRBF, cutoff_fn: CosineCutoff, grid: torch.Tensor, nets: list[nn.Sequential]
) -> list[torch.Tensor]:
    """Hermite tables of W(r) = net(e(r)) f_cut(r) on ``grid``, one per filter network
    ``(Linear, ShiftedSoftplus, Linear)``, all at once (:mod:`atomlens.nn.filter_tables`)."""
    e, de = rbf.value_and_derivative(grid)
    fc, dfc = cutoff_fn.value_and_derivative(grid)
    stacked = [
        torch.stack([getattr(net[layer], name) for net in nets])
        for layer in (0, 2)
        for name in ("weight", "bias")
    ]
    return filter_tables(torch.cat((e, de)), fc, dfc, grid[1] - grid[0], *stacked)


class SchNetInteraction(nn.Module):
    """One interaction block: atom-wise -> cfconv -> atom-wise -> ssp -> atom-wise."""

    def __init__(self, n_atom_basis: int, n_filters: int, n_rbf: int):
        super().__init__()
        self.in2f = Linear(n_atom_basis, n_filters, bias=False)
        self.filter_network = nn.Sequential(
            Linear(n_rbf, n_filters), ShiftedSoftplus(), Linear(n_filters, n_filters)
        )
        self.f2out = nn.Sequential(
            Linear(n_filters, n_atom_basis),
            ShiftedSoftplus(),
            Linear(n_atom_basis, n_atom_basis),
        )

    def filter_table(
        self, rbf: GaussianRBF, cutoff_fn: CosineCutoff, grid: torch.Tensor
    ) -> torch.Tensor:
        """Hermite coefficients of W(r) = filter_network(e(r)) f_cut(r) on ``grid``, this
        block's alone (:meth:`SchNet.filter_tables` makes all blocks' at once)."""
        return tabulate_filters(rbf, cutoff_fn, grid, [self.filter_network])[0]

    def forward(
        self,
        x,
        filters: torch.Tensor | TabulatedFilters,
        pairs: Pairs,
        in2f_x: torch.Tensor | None = None,
        last_dense: bool = True,
    ) -> torch.Tensor:
        """``filters``: W(r) of the evaluated pairs (the unordered ones if symmetric), an
        array or :class:`TabulatedFilters` (hooks that change them: :func:`filter_values`).
        ``in2f_x``: ``in2f(x)`` where the caller has it (the first block's, per element:
        :meth:`SchNet.embedded_in2f`). ``last_dense=False``: the block's update before its
        last atom-wise layer (``ssp(Dense(cfconv(...)))``, :meth:`SchNet.last_update`)."""
        y = self.in2f(x) if in2f_x is None else in2f_x
        if pairs.symmetric and isinstance(filters, TabulatedFilters):
            conv = cfconv_tabulated(
                y, filters.table, filters.grid, pairs.i, pairs.j, filters.by_interval
            )
        elif pairs.symmetric:  # one filter per unordered pair serves both directions
            conv = cfconv_symmetric(y, filter_values(filters), pairs.i, pairs.j)
        else:
            messages = torch.index_select(y, 0, pairs.j) * filter_values(filters)
            conv = scatter_sum(messages, pairs.i, x.shape[0])
        if last_dense:
            return self.f2out(conv)
        return self.f2out[1](self.f2out[0](conv))


class SchNet(Representation):
    """SchNet representation: atomic numbers and positions -> atom features (n_atoms, F).

    Args:
        n_atom_basis: F, feature size of atoms.
        n_interactions: T, number of interaction blocks.
        n_filters: size of the continuous filters (F in the paper).
        n_rbf, rbf_stop, rbf_gamma: radial basis (centres 0..rbf_stop Angstrom).
        cutoff: cosine cutoff radius in Angstrom, or ``None`` for none (NeurIPS version).
        max_z: largest atomic number the embedding knows.
        filter_spacing: evaluate the filters from tables with nodes this far apart
            (Angstrom), or ``None`` to evaluate the filter network on every pair. Ignored
            without a cutoff. At 0.02 Angstrom a trained QM9 model's forces move by at most
            0.034 meV/Angstrom in float64 (0.005 at 0.01), its energies by 0.001 meV; in
            float32 its largest force error is 0.053 meV/Angstrom (0.041 at 0.01), its
            energies' float32 rounding (``benchmarks/table_error.py``). Tables are used on
            the CPU and by frozen models (:data:`TABLES_ON`).
    """

    def __init__(
        self,
        n_atom_basis: int = 128,
        n_interactions: int = 6,
        n_filters: int = 128,
        n_rbf: int = 20,
        cutoff: float | None = 5.0,
        rbf_stop: float | None = None,
        rbf_gamma: float | None = None,
        max_z: int = 100,
        filter_spacing: float | None = 0.02,
    ):
        super().__init__()
        self.n_atom_basis, self.cutoff = n_atom_basis, cutoff
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.rbf = GaussianRBF(
            n_rbf, rbf_stop if rbf_stop is not None else (cutoff or 30.0), gamma=rbf_gamma
        )
        self.cutoff_fn = CosineCutoff(cutoff) if cutoff is not None else None
        self.interactions = nn.ModuleList(
            SchNetInteraction(n_atom_basis, n_filters, n_rbf) for _ in range(n_interactions)
        )
        if filter_spacing is not None and not (
            math.isfinite(filter_spacing) and filter_spacing > 0
        ):
            raise ValueError(f"filter_spacing must be positive, not {filter_spacing}")
        if (
            cutoff is not None
            and filter_spacing is not None
            and (cutoff / filter_spacing > MAX_TABLE_NODES)
        ):
            raise ValueError(
                f"filter_spacing={filter_spacing:g} Angstrom gives "
                f"{cutoff / filter_spacing:.3g} table nodes per filter (the limit "
                f"is {MAX_TABLE_NODES:,}, {cutoff / MAX_TABLE_NODES:.2g} Angstrom "
                f"at cutoff {cutoff:g}); 0.02 Angstrom is already exact to float32"
            )
        self.filter_spacing = filter_spacing if cutoff is not None else None

    def freeze(self) -> FrozenSchNet:
        """The filter tables (tabulated filters) and the first block's ``in2f`` of the
        embedding table (:meth:`embedded_in2f`), to compute once for a frozen model."""
        tables = self.filter_tables() if self.filter_spacing is not None else None
        first = None
        if self.interactions:
            first = self.interactions[0].in2f(self._embedding_table())
        return FrozenSchNet(tables, first)

    def filter_tables(self) -> list[torch.Tensor]:
        """One Hermite table ``(n_intervals, 4, n_filters)`` per interaction block.

        Differentiable w.r.t. the weights (training recomputes them every step); a frozen
        model computes them once (:meth:`freeze`) and passes them to :meth:`forward` (MD).
        """
        n = math.ceil(self.cutoff / self.filter_spacing - 1e-9)
        p = self.embedding.weight
        grid = torch.linspace(0.0, self.cutoff, n + 1, dtype=p.dtype, device=p.device)
        nets = [block.filter_network for block in self.interactions]
        return tabulate_filters(self.rbf, self.cutoff_fn, grid, nets) if nets else []

    def last_update(self) -> nn.Module | None:
        """The atom-wise layer that ends the last interaction block, whose output the
        features add up (``x_T = x_{T-1} + last(s)``): a caller with a linear head can fold
        the head's first layer into it (:meth:`AtomisticModel.freeze`); None without blocks."""
        return self.interactions[-1].f2out[2] if len(self.interactions) else None

    def split_modules(self) -> list[nn.Module]:
        """This model and its last block's modules (``split_last`` calls that block for its
        update before the last layer, and the block's layers one by one)."""
        return [self, *self.interactions[-1].modules()] if len(self.interactions) else [self]

    def forward(
        self,
        numbers,
        positions,
        pairs: Pairs,
        frozen: FrozenSchNet | list[torch.Tensor] | None = None,
        split_last: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Atom features ``(n_atoms, n_atom_basis)``; ``frozen``: :meth:`freeze`'s state (or
        its filter tables alone).
        ``split_last``: ``(x_{T-1}, s)`` instead, the features before the last block and
        that block's update before :meth:`last_update` (the features are
        ``x_{T-1} + last_update()(s)``)."""
        x = self.embedding(numbers)
        n_atoms = x.shape[0]
        if self.training and PAD_TRAINING_BATCHES:
            # one padding to the dense layers' bucket size instead of one per layer
            # (atomlens.nn.linear.batch_rows); no pair reads the extra rows
            x = pad_rows(x, batch_rows(x))
        d = pair_distances(positions, pairs)
        first_in2f = None
        if isinstance(frozen, FrozenSchNet):
            frozen, first_in2f = frozen.tables, frozen.first_in2f
        tabulated = frozen is not None or (
            self.filter_spacing is not None and positions.device.type in TABLES_ON
        )
        if tabulated:
            tables = self.filter_tables() if frozen is None else frozen
            x_grid = d * (tables[0].shape[0] / self.cutoff)  # distance in node spacings
            # without forces, the pairs once in the order the convolution runs fastest in
            by_interval = (
                interval_pairs(x_grid, pairs.i, pairs.j, *tables[0].shape[::2], x.shape[0])
                if pairs.symmetric
                else None
            )
        else:
            rbf = self.rbf(d)
            f_cut = self.cutoff_fn(d) if self.cutoff_fn is not None else torch.ones_like(d)
        first = self.embedded_in2f(numbers, x.shape[0], first_in2f)
        for k, interaction in enumerate(self.interactions):
            if tabulated:
                filters = TabulatedFilters(tables[k], x_grid, by_interval)
            else:
                filters = interaction.filter_network(rbf) * f_cut[:, None]
            in2f_x = first if k == 0 else None
            if split_last and k == len(self.interactions) - 1:
                update = interaction(x, filters, pairs, in2f_x=in2f_x, last_dense=False)
                return x[:n_atoms], update[:n_atoms]
            x = x + interaction(x, filters, pairs, in2f_x=in2f_x)
        return x[:n_atoms]

    def embedded_in2f(
        self, numbers: torch.Tensor, rows: int, per_element: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The first block's ``in2f`` of the embedding, ``in2f(a)[Z_i]``, in ``rows`` rows
        (zeros past the atoms); None for fewer atoms than the embedding has rows, and where
        hooks watch those modules (explanations fit and apply their rules to the atom rows
        there). ``per_element``: ``in2f(a)`` computed once (:meth:`freeze`), used for any
        number of atoms.

        The first block's input is the embedding alone, a function of the element: its
        filter-generating layer is a product of the embedding table (max_z + 1 rows) instead
        of the atoms' rows (in training also its two backward products), the same values up
        to the products' rounding. Training steps of 100 QM9 molecules (1,808 atoms) drop 3
        of their 77 large products."""
        if not self.interactions:
            return None
        if per_element is None and numbers.shape[0] <= self.embedding.num_embeddings:
            return None
        block = self.interactions[0]
        if hooked(self.embedding, block, block.in2f):
            return None
        if per_element is None:
            per_element = block.in2f(self._embedding_table())
        return pad_rows(torch.index_select(per_element, 0, numbers), rows)

    def _embedding_table(self) -> torch.Tensor:
        """The embedding's weight, its padding row detached (it gets no gradient, as in
        ``nn.Embedding``)."""
        table = self.embedding.weight
        if self.embedding.padding_idx is not None:
            padding = (
                torch.arange(table.shape[0], device=table.device) == self.embedding.padding_idx
            )
            table = torch.where(padding[:, None], table.detach(), table)
        return table
