"""The continuous-filter convolution on symmetric pairs, with fused kernels.

With the pairs in symmetric layout (first half ``(a_p, b_p)`` with a < b, second half the
same pairs reversed) and one filter ``W_p`` per unordered pair, SchNet's convolution is

    y_n = sum_{p: a_p = n} x_{b_p} * W_p  +  sum_{p: b_p = n} x_{a_p} * W_p     (cfconv)

and its gradients close over two bilinear maps: d/dx is cfconv itself (the map is
symmetric), and d/dW is the pair product ``P_p = u_{a_p} * v_{b_p} + u_{b_p} * v_{a_p}``,
whose gradients are cfconvs again. So two autograd Functions, each with the other in its
backward, give derivatives of every order (forces, and force training's double backward).

Both run as fused kernels (:mod:`atomlens.nn.kernels`) for large batches; on the CPU the
convolution runs as a hand-written one-pass loop (:mod:`atomlens.nn.cpu_kernels`).

With tabulated filters (``W_p = p_{k_p}(t_p)``, a cubic of the pair's grid interval,
:mod:`atomlens.nn.hermite`) :func:`cfconv_tabulated` goes further on the CPU: one loop
evaluates each pair's filter row where it uses it, so the ``(P, F)`` filter array is never
written or read, and one loop computes every first derivative (w.r.t. the atom features,
the table and the grid coordinates) from ``u_p = g_{a_p} h_{b_p} + g_{b_p} h_{a_p}``.
Higher derivatives (force training's double backward) go through the composed Functions.
The tables end at the cutoff: a pair beyond the grid's end has a zero filter (as the cutoff
function makes it) and every path skips or masks it (:func:`filter_lookup`).
Without forces (QM9 training, inference of energies) the pairs are sorted once per forward
pass by grid interval (:func:`interval_pairs`), and the loops keep each interval's table rows
(and backward their gradient) in registers over its run of pairs (:class:`_IntervalCFConv`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import cpu_kernels, hermite, kernels
from .kernels import FusedKernel


def _cfconv_plain(x, w, a, b):
    y = torch.zeros_like(x)
    return y.index_add_(0, a, x[b] * w).index_add_(0, b, x[a] * w)


def _pair_product_plain(u, v, a, b):
    return u[a] * v[b] + u[b] * v[a]


_cfconv = FusedKernel(_cfconv_plain, scatters=True)
_pair_product = FusedKernel(_pair_product_plain)


class _CFConv(kernels.Function):
    @staticmethod
    def forward(x, w, a, b):
        y = cpu_kernels.cfconv(x, w, a, b)  # one pass over the filters (CPU)
        return _cfconv(x, w, a, b, size=w.numel()) if y is None else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, a, b = inputs
        ctx.save_for_backward(x, w, a, b)

    @staticmethod
    def backward(ctx, grad):
        x, w, a, b = ctx.saved_tensors
        grad_x = _CFConv.apply(grad, w, a, b) if ctx.needs_input_grad[0] else None
        grad_w = _PairProduct.apply(grad, x, a, b) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


class _PairProduct(kernels.Function):
    @staticmethod
    def forward(u, v, a, b):
        return _pair_product(u, v, a, b, size=u.shape[1] * a.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, v, a, b = inputs
        ctx.save_for_backward(u, v, a, b)

    @staticmethod
    def backward(ctx, grad):
        u, v, a, b = ctx.saved_tensors
        grad_u = _CFConv.apply(v, grad, a, b) if ctx.needs_input_grad[0] else None
        grad_v = _CFConv.apply(u, grad, a, b) if ctx.needs_input_grad[1] else None
        return grad_u, grad_v, None, None


def cfconv_symmetric(
    x: torch.Tensor, filters: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor
) -> torch.Tensor:
    """``y_i = sum_j x_j * W_ij`` over symmetric-layout pairs; ``filters`` has one row per
    unordered pair (the first half of ``pair_i``/``pair_j``). Returns ``(n_atoms, F)``."""
    half = pair_i.shape[0] // 2
    a, b = pair_i[:half], pair_j[:half]
    if not torch.compiler.is_compiling() and filters.numel() >= kernels.min_fused_size(x.device):
        kernels.check_rows(pair_i, x.shape[0], "cfconv pair indices")
        return _CFConv.apply(x, filters, a, b)
    # small (one molecule), or inside torch.compile, which fuses the plain formula itself
    return _cfconv_plain(x, filters, a, b)


class _TabulatedCFConv(kernels.Function):
    """y = cfconv(h, lookup(table, x)): the filters of the pairs computed where they are used."""

    @staticmethod
    def forward(h, table, x, a, b):
        return cpu_kernels.tabulated_cfconv(h, table, x, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        h, table, x, a, b = ctx.saved_tensors
        need_h, need_table, need_x = ctx.needs_input_grad[:3]
        # forces (autograd.grad w.r.t. positions) need no table gradient
        need_table = need_table and hermite._engine_needs(table)
        if not torch.is_grad_enabled():  # first derivatives only: one pass
            grads = cpu_kernels.tabulated_cfconv_backward(
                grad, h, table, x, a, b, need_h, need_table, need_x
            )
            return (*grads, None, None)
        if not need_table:  # forces with create_graph (force training): one pass each way
            grad_h, grad_x = _TabulatedCFConvGrad.apply(grad, h, table, x, a, b)
            return grad_h if need_h else None, None, grad_x if need_x else None, None, None
        return _composed_backward(grad, h, table, x, a, b, need_h, need_table, need_x)


def filter_lookup(table: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The ``(P, F)`` filters of pairs at grid coordinates ``grid`` from their Hermite table
    ``(n_intervals, 4, F)``: :func:`~atomlens.nn.hermite.hermite_lookup`, and zero beyond the
    grid's end. The tables end at the cutoff, beyond which the cutoff function makes every
    filter zero (the clamped lookup gives the end's value: zero up to the rounding of the
    coefficients); the C++ loops skip such pairs. Below the grid the lookup clamps."""
    return hermite.hermite_lookup(table, grid) * _not_beyond(grid, table.shape[0])[:, None]


def _not_beyond(x: torch.Tensor, n: int) -> torch.Tensor:
    """1 for grid coordinates up to the grid's end ``n``, 0 beyond (NaN: 1, stays NaN)."""
    return (~(x > float(n))).to(x.dtype)


def _composed_backward(grad, h, table, x, a, b, need_h, need_table, need_x):
    """The first derivatives of the tabulated cfconv from the composed Functions (lookup,
    cfconv, pair product, table scatter), differentiable to any order."""
    n = float(table.shape[0] // 4)
    inside = (x >= 0.0) & (x <= n)  # no gradient w.r.t. x beyond the grid (as the kernel)
    kept = _not_beyond(x, int(n))[:, None]  # zero filters beyond the grid's end
    x = x.clamp(0.0, n)  # the kernel's clamp, differentiable
    w = hermite._Lookup.apply(table, x, 0) * kept
    grad_h = _CFConv.apply(grad, w, a, b) if need_h else None
    grad_table = grad_x = None
    if need_table or need_x:
        grad_w = _PairProduct.apply(grad, h, a, b) * kept
        if need_table:
            grad_table = hermite._Scatter.apply(grad_w, x, 0, table.shape[0])
        if need_x:
            grad_x = hermite._Dot.apply(grad_w, table, x, 1) * inside
    return grad_h, grad_table, grad_x, None, None


class _TabulatedCFConvGrad(kernels.Function):
    """(dL/dh, dL/dx) of the tabulated cfconv given g = dL/dy, as a differentiable function of
    (g, h, table, x): the forces' part of force training, whose second backward pass runs
    as one loop too."""

    @staticmethod
    def forward(grad, h, table, x, a, b):
        grad_h, _, grad_x = cpu_kernels.tabulated_cfconv_backward(
            grad, h, table, x, a, b, True, False, True
        )
        return grad_h, grad_x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_grad_h, grad_grad_x):
        grad, h, table, x, a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative: the composed Functions
            grads = _composed_backward(grad, h, table, x, a, b, True, False, True)
            # an output that does not depend on the wanted inputs contributes nothing
            outputs = [
                (out, g)
                for out, g in zip((grads[0], grads[2]), (grad_grad_h, grad_grad_x))
                if out.requires_grad
            ]
            wanted = [t for t, n in zip((grad, h, table, x), ctx.needs_input_grad) if n]
            found = iter(
                torch.autograd.grad(
                    [o for o, _ in outputs],
                    wanted,
                    [g for _, g in outputs],
                    create_graph=True,
                    allow_unused=True,
                )
                if outputs
                else [None] * len(wanted)
            )
            return (*(next(found) if n else None for n in ctx.needs_input_grad[:4]), None, None)
        grads = cpu_kernels.tabulated_cfconv_double_backward(
            grad_grad_h, grad_grad_x, grad, h, table, x, a, b
        )
        return (*(g if n else None for g, n in zip(grads, ctx.needs_input_grad)), None, None)


def cfconv_tabulated(
    x: torch.Tensor,
    table: torch.Tensor,
    grid: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    by_interval: IntervalPairs | None = None,
) -> torch.Tensor:
    """:func:`cfconv_symmetric` with the filters ``W = filter_lookup(table, grid)``.

    ``table``: ``(n_intervals, 4, F)`` (:func:`~atomlens.nn.hermite.hermite_coefficients`);
    ``grid``: the unordered pairs' distances in node spacings, clamped to the table's start
    as :func:`~atomlens.nn.hermite.hermite_lookup` clamps them; beyond its end the filters are
    zero (:func:`filter_lookup`: the table ends at the cutoff). Plain CPU float tensors run
    one hand-written loop forward and one backward (no ``(P, F)`` filter array; under
    ``torch.compile`` as operators); anything else the lookup and :func:`cfconv_symmetric`.
    ``by_interval``: these pairs sorted by :func:`interval_pairs`, which those loops then
    take in that order (ignored unless sorted from these very ``grid``, ``pair_i`` and
    ``pair_j`` for ``x``'s rows: a hook that replaced one gets the first-atom order). Returns
    ``(n_atoms, F)``.
    """
    n = table.shape[0]
    half = pair_i.shape[0] // 2
    if (
        torch.compiler.is_compiling()
        and cpu_kernels.compiled_ops_ready(x, table, grid)
        and pair_i.dtype == torch.int64
    ):
        # MD's compiled step: Inductor calls the operator between its own kernels
        return cpu_kernels.TabulatedCFConvOp.apply(
            x, table.reshape(4 * n, -1), grid, pair_i[:half], pair_j[:half]
        )
    if (
        not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and cpu_kernels.available(x, table, grid)
        and pair_i.dtype == torch.int64
    ):
        if (
            by_interval is not None
            and not grid.requires_grad
            and by_interval.serves(grid, pair_i, pair_j, x.shape[0])
        ):  # its sort checked every pair's atoms against x's rows (once for all blocks)
            return _IntervalCFConv.apply(
                x, table.reshape(4 * n, -1), by_interval.grid, by_interval.a, by_interval.b
            )
        kernels.check_rows(pair_i, x.shape[0], "cfconv pair indices")
        return _TabulatedCFConv.apply(
            x, table.reshape(4 * n, -1), grid, pair_i[:half], pair_j[:half]
        )
    return cfconv_symmetric(x, filter_lookup(table, grid), pair_i, pair_j)


#: unordered pairs from which :func:`interval_pairs` reorders them: a QM9 batch of 100 has
#: ~14,000, one molecule ~150 (where the order gains nothing)
MIN_INTERVAL_PAIRS = 2048
#: and filters: at 64 the first-atom loops keep a whole atom row in registers, and a 64/3
#: QM9 training step ran 10.8 ms in interval order against 10.4 in first-atom order; 128/6
#: 27.9 against 28.5 (medians of 5 alternations, one thread, CPU time)
MIN_INTERVAL_WIDTH = 128


class IntervalPairs(NamedTuple):
    """The unordered pairs of a symmetric layout sorted for :class:`_IntervalCFConv` (grid
    coordinates, first and second atoms), with what they were sorted from."""

    grid: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    source: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # grid, pair_i, pair_j
    n_atoms: int

    @staticmethod
    def sort(grid, pair_i, pair_j, n_intervals: int, n_atoms: int) -> IntervalPairs | None:
        """Sort the first half of ``pair_i``/``pair_j`` (atoms in ``[0, n_atoms)``) with
        their ``grid``; None without the by-interval kernels (no AVX-512)."""
        half = pair_i.shape[0] // 2
        found = cpu_kernels.interval_order(grid, pair_i[:half], pair_j[:half], n_intervals, n_atoms)
        return None if found is None else IntervalPairs(*found, (grid, pair_i, pair_j), n_atoms)

    def serves(self, grid, pair_i, pair_j, n_atoms: int) -> bool:
        """Whether these were sorted from these very tensors, for ``n_atoms`` rows."""
        g, i, j = self.source
        return g is grid and i is pair_i and j is pair_j and n_atoms == self.n_atoms


def interval_pairs(
    grid: torch.Tensor,
    pair_i: torch.Tensor,
    pair_j: torch.Tensor,
    n_intervals: int,
    width: int,
    n_atoms: int,
) -> IntervalPairs | None:
    """The unordered pairs of a symmetric layout (grid coordinates ``grid``, the first half
    of ``pair_i``/``pair_j``, atoms in ``[0, n_atoms)``) reordered for
    :class:`_IntervalCFConv`, once per forward pass and shared by every interaction block
    (``width``: their filters); None where that path
    does not apply: positions that need gradients (forces: the pass in first-atom order also
    gives dL/dx), compiled or traced code, functorch transforms, batches of fewer than
    :data:`MIN_INTERVAL_PAIRS` pairs, fewer than :data:`MIN_INTERVAL_WIDTH` filters, or no
    AVX-512 (:func:`atomlens.nn.cpu_kernels.interval_order`).

    Training without forces (QM9) spends about a sixth of each step in the convolution's
    backward pass, which in this order keeps each interval's table rows and their gradient
    in registers over a run of pairs instead of reading and updating them per pair."""
    if (  # tracing and transforms first: no size is looked at (symbolic there)
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or grid.requires_grad
        or pair_i.dtype != torch.int64
        or width < MIN_INTERVAL_WIDTH
        or pair_i.shape[0] // 2 < MIN_INTERVAL_PAIRS
        or not cpu_kernels.available(grid)
    ):
        return None
    return IntervalPairs.sort(grid, pair_i, pair_j, n_intervals, n_atoms)


class _IntervalCFConv(_TabulatedCFConv):
    """:class:`_TabulatedCFConv` for pairs in :func:`interval_pairs`' order: the
    by-interval loops forward and for the first derivatives w.r.t. ``h`` and the table;
    anything else (a graph of the backward pass) as the parent does, which takes the pairs
    in any order."""

    @staticmethod
    def forward(h, table, x, a, b):
        return cpu_kernels.tabulated_cfconv_by_interval(h, table, x, a, b)

    @staticmethod
    def backward(ctx, grad):
        h, table, x, a, b = ctx.saved_tensors
        need_h, need_table, need_x = ctx.needs_input_grad[:3]
        need_table = need_table and hermite._engine_needs(table)
        if torch.is_grad_enabled() or need_x:
            return _TabulatedCFConv.backward(ctx, grad)
        grad_h, grad_table = cpu_kernels.tabulated_cfconv_by_interval_backward(
            grad, h, table, x, a, b, need_h, need_table
        )
        return grad_h, grad_table, None, None, None
