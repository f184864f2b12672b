"""Tabulated functions of one variable: piecewise cubic Hermite polynomials on a uniform grid.

A table holds, for every interval ``k`` between grid nodes, the coefficients of
``p_k(t) = c0 + c1 t + c2 t^2 + c3 t^3`` (``t`` in [0, 1]) for ``F`` functions at once. A
lookup at grid coordinate ``x`` is a weighted sum of the four coefficient rows of interval
``floor(x)``, one ``embedding_bag`` call that reads the table (small, cache-resident) and
writes the ``(P, F)`` result: no ``(P, 4, F)`` intermediate. Derivatives of every order
w.r.t. ``x`` and the table are lookups and scatters again, so force training (double
backward) works.
"""

from __future__ import annotations

import torch
from torch.nn.functional import embedding_bag

from . import cpu_kernels, kernels
from .kernels import FusedKernel


def hermite_coefficients(values: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Table ``(n_nodes - 1, 4, F)`` from values and slopes ``(n_nodes, F)`` at the nodes
    (leading dimensions, such as one per function family, carried through: ``(..., n_nodes,
    F)`` -> ``(..., n_nodes - 1, 4, F)``).

    ``slopes`` are the derivatives already multiplied by the node spacing. Value and first
    derivative are continuous across nodes (C1), so forces from a tabulated energy are too.
    """
    v0, v1 = values[..., :-1, :], values[..., 1:, :]
    m0, m1 = slopes[..., :-1, :], slopes[..., 1:, :]
    return torch.stack([v0, m0, 3.0 * (v1 - v0) - 2.0 * m0 - m1, 2.0 * (v0 - v1) + m0 + m1], -2)


def _weights(x: torch.Tensor, n: int, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened table and the weights d^order/dt^order [1, t, t^2, t^3]."""
    # the compiled kernels do not check rows: clamp in integers (bf16 rounds n - 1 up to n
    # for n = 500), and NaN distances read row 0 (and give NaN through t)
    k = torch.nan_to_num(x.floor(), nan=0.0).long().clamp(0, n - 1)
    t = x - k
    one = torch.ones_like(t)
    if order == 0:
        w = [one, t, t * t, t * t * t]
    elif order == 1:
        w = [0 * one, one, 2 * t, 3 * t * t]
    elif order == 2:
        w = [0 * one, 0 * one, 2 * one, 6 * t]
    else:
        w = [0 * one, 0 * one, 0 * one, (6 if order == 3 else 0) * one]
    rows = k[:, None] * 4 + torch.arange(4, device=x.device)
    return rows, torch.stack(w, 1)


def _engine_needs(tensor: torch.Tensor) -> bool:
    """Whether the running backward pass goes on into ``tensor``'s graph.

    ``torch.autograd.grad(E, positions)`` (forces) need not scatter into the filter tables
    although they require grad; custom Functions are not told, so ask the engine.
    """
    node = tensor.grad_fn
    if node is None:
        return True
    try:
        return torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # not inside a backward pass, or an older torch
        return True


def _lookup_eager(table, x, order):
    rows, w = _weights(x, table.shape[0] // 4, order)
    return embedding_bag(rows, table, per_sample_weights=w, mode="sum")


def _lookup_plain(table, x, order):
    rows, w = _weights(x, table.shape[0] // 4, order)
    return (table[rows] * w[:, :, None]).sum(1)


def _dot_plain(grad, table, x, order):
    """sum_f grad[p, f] * lookup(table, x, order)[p, f]: the gradient w.r.t. x."""
    return (grad * _lookup_plain(table, x, order)).sum(1)


def _scatter_plain(grad, x, order, n_rows):
    rows, w = _weights(x, n_rows // 4, order)
    out = grad.new_zeros((n_rows, grad.shape[1]))
    return out.index_add_(0, rows.view(-1), (w[:, :, None] * grad[:, None, :]).flatten(0, 1))


_dot = FusedKernel(_dot_plain)
_scatter = FusedKernel(_scatter_plain, scatters=True)


class _Lookup(kernels.Function):
    """y[p] = sum_s w_s(t_p) table[4 k_p + s], the ``order``-th t-derivative of the cubic."""

    @staticmethod
    def forward(table, x, order):
        return _lookup_eager(table, x, order)  # embedding_bag beats a compiled gather here

    @staticmethod
    def setup_context(ctx, inputs, output):
        table, x, order = inputs
        ctx.save_for_backward(table, x)
        ctx.order = order

    @staticmethod
    def backward(ctx, grad):
        table, x = ctx.saved_tensors
        grad_table = grad_x = None
        if ctx.needs_input_grad[0] and _engine_needs(table):
            grad_table = _Scatter.apply(grad, x, ctx.order, table.shape[0])
        if ctx.needs_input_grad[1]:
            grad_x = _Dot.apply(grad, table, x, ctx.order + 1)
        return grad_table, grad_x, None


class _Dot(kernels.Function):
    """d[p] = sum_f g[p, f] lookup(table, x, order)[p, f]."""

    @staticmethod
    def forward(grad, table, x, order):
        return _dot(grad, table, x, order, size=grad.numel())

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, table, x, order = inputs
        ctx.save_for_backward(grad, table, x)
        ctx.order = order

    @staticmethod
    def backward(ctx, grad_out):
        grad, table, x = ctx.saved_tensors
        grad_grad = grad_table = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_grad = _Lookup.apply(table, x, ctx.order) * grad_out[:, None]
        if ctx.needs_input_grad[1] and _engine_needs(table):
            grad_table = _Scatter.apply(grad * grad_out[:, None], x, ctx.order, table.shape[0])
        if ctx.needs_input_grad[2]:
            grad_x = _Dot.apply(grad, table, x, ctx.order + 1) * grad_out
        return grad_grad, grad_table, grad_x, None


class _Scatter(kernels.Function):
    """The transpose of :class:`_Lookup` w.r.t. the table: out[4 k_p + s] += w_s(t_p) g[p]."""

    @staticmethod
    def forward(grad, x, order, n_rows):
        out = cpu_kernels.table_scatter(grad, x, order, n_rows)  # one pass over grad (CPU)
        return _scatter(grad, x, order, n_rows, size=grad.numel()) if out is None else out

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, order, _ = inputs
        ctx.save_for_backward(grad, x)
        ctx.order = order

    @staticmethod
    def backward(ctx, grad_out):
        grad, x = ctx.saved_tensors
        grad_grad = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_grad = _Lookup.apply(grad_out, x, ctx.order)
        if ctx.needs_input_grad[1]:
            grad_x = _Dot.apply(grad, grad_out, x, ctx.order + 1)
        return grad_grad, grad_x, None, None


def hermite_lookup(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Evaluate the tabulated functions at grid coordinates ``x`` (``d / spacing``): ``(P, F)``.

    ``table`` is ``(n_intervals, 4, F)`` from :func:`hermite_coefficients`; ``x`` beyond the
    last node reads the last node's value (zero gradient). Differentiable to any order.
    """
    n = table.shape[0]
    x = x.clamp(0.0, float(n))
    table = table.reshape(4 * n, -1)
    if torch.compiler.is_compiling() or x.shape[0] * table.shape[1] < kernels.min_fused_size(
        x.device
    ):
        return _lookup_plain(table, x, 0)  # small, or under torch.compile: plain autograd
    return _Lookup.apply(table, x, 0)
