"""SchNet's filter tables, all interaction blocks at once.

Each interaction block ``k`` tabulates its filter ``W_k(r) = Dense(ssp(Dense(e(r)))) f(r)``
(``e`` the radial basis, ``f`` the cosine cutoff) as cubic Hermite coefficients on one grid
of ``m`` nodes (:mod:`atomlens.models.schnet`). The coefficients need the values and the
r-derivatives on the nodes, so both layers run on ``2m`` rows, ``[e; de/dr]``:

    a = [e; de] W1_k^T                      (2m, F)   first layer, no bias
    h = ssp(a_v + b1_k),  dh = sigmoid(a_v + b1_k) a_d        (values, r-derivatives)
    w = [h; dh] W2_k^T                      (2m, F)   second layer, no bias
    v = (w_v + b2_k) f,   s = (w_d f + (w_v + b2_k) df) spacing
    table_k[i] = [v_i, s_i, 3 (v_i+1 - v_i) - 2 s_i - s_i+1, 2 (v_i - v_i+1) + s_i + s_i+1]

A training step recomputes the tables (the weights change), forward and backward. Written
with PyTorch's operators, block by block, that was about 30 operators per block in the
forward pass and twice as many in the backward pass on ``(m, F)`` arrays: 10-11.5 ms of a
~40 ms QM9 128/6 training step (one thread, CPU time, 2026-12-04), of which the products'
share was about 3 ms. :func:`filter_tables` takes the blocks' weights stacked: float32 CPU
tensors go through one autograd Function whose element-wise parts are C++ loops
(:func:`atomlens.nn.cpu_kernels.filter_hidden`,
:func:`~atomlens.nn.cpu_kernels.filter_table_coefficients` and their transposes) and whose
products are oneDNN's (the first layer of all blocks as one product): 5.6-5.7 ms for the
same tables and gradients. Everything else (float64, other devices, ``torch.compile``,
``torch.func``, no C++ compiler) runs :func:`plain_filter_tables`, the same formulas in
batched PyTorch operators.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import cpu_kernels, kernels
from .activations import shifted_softplus
from .hermite import hermite_coefficients
from .linear import fixed_product


def plain_filter_tables(e_de, fc, dfc, spacing, w1, b1, w2, b2) -> list[torch.Tensor]:
    """The T tables ``(m - 1, 4, F)`` by PyTorch's operators (differentiable any number of
    times). ``e_de``: ``(2m, R)`` radial basis values and r-derivatives on the nodes;
    ``fc``, ``dfc``: ``(m,)`` the cutoff and its derivative; ``spacing``: the node spacing;
    ``w1`` ``(T, F, R)``, ``b1`` ``(T, F)``, ``w2`` ``(T, F, F)``, ``b2`` ``(T, F)``: the
    blocks' filter-network weights, stacked."""
    m = e_de.shape[0] // 2
    a = torch.matmul(e_de, w1.transpose(1, 2))  # (T, 2m, F)
    v = a[:, :m] + b1[:, None, :]
    h = torch.cat((shifted_softplus(v), torch.sigmoid(v) * a[:, m:]), 1)
    w = torch.matmul(h, w2.transpose(1, 2))
    u = w[:, :m] + b2[:, None, :]
    values = u * fc[:, None]
    slopes = (w[:, m:] * fc[:, None] + u * dfc[:, None]) * spacing
    return list(hermite_coefficients(values, slopes).unbind(0))


def filter_tables(e_de, fc, dfc, spacing, w1, b1, w2, b2) -> list[torch.Tensor]:
    """The blocks' Hermite tables, ``(m - 1, 4, F)`` each (arguments: :func:`plain_filter_tables`),
    by the C++ loops and oneDNN's products where they apply (module doc)."""
    tensors = (e_de, fc, dfc, w1, b1, w2, b2)
    if (
        e_de.dtype == torch.float32
        and w1.shape[0] > 0
        and e_de.shape[0] >= 4  # two nodes, one interval
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._are_functorch_transforms_active()
        and not _dual(tensors)  # forward-mode AD: PyTorch's operators carry the tangents
        and not any(t.requires_grad for t in (e_de, fc, dfc))  # the grid's are constants
        and cpu_kernels.available(*tensors)
    ):
        return list(_FilterTables.apply(e_de, fc, dfc, float(spacing), w1, b1, w2, b2))
    return plain_filter_tables(e_de, fc, dfc, spacing, w1, b1, w2, b2)


def _dual(tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode tangent."""
    return forward_ad._current_level >= 0 and any(
        forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


class _FilterTables(kernels.Function):
    """:func:`filter_tables` by the C++ loops and oneDNN; a backward pass that builds a graph
    (a second derivative w.r.t. the weights) recomputes :func:`plain_filter_tables` and
    differentiates that instead."""

    @staticmethod
    def forward(ctx, e_de, fc, dfc, spacing, w1, b1, w2, b2):
        n_blocks, width, n_rbf = w1.shape
        a = fixed_product(e_de, w1.reshape(n_blocks * width, n_rbf))  # all blocks: (2m, T F)
        h = cpu_kernels.filter_hidden(a, b1.reshape(-1), n_blocks)  # (T, 2m, F)
        w = [fixed_product(h[k], w2[k]) for k in range(n_blocks)]
        ctx.spacing = spacing
        # with the layers' inputs (2 x 2m x T F floats, 6 MB for 128/6), as PyTorch keeps them
        ctx.save_for_backward(e_de, fc, dfc, w1, b1, w2, b2, a, h)
        # one tensor per block: the backward pass gets their gradients without a copy into
        # one array (6 MB for 128/6)
        return tuple(cpu_kernels.filter_table_coefficients(w, b2, fc, dfc, spacing))

    @staticmethod
    def backward(ctx, *grad):
        e_de, fc, dfc, w1, b1, w2, _, a, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        if (
            torch.is_grad_enabled()
            or torch._C._are_functorch_transforms_active()
            or not all(torch._C._has_storage(g) for g in grad)
        ):  # a graph for a second derivative, or batched gradients (``is_grads_batched``,
            # vmap over the vjp): PyTorch's operators
            return _differentiable_backward(ctx, grad)
        n_blocks, width, n_rbf = w1.shape
        m = e_de.shape[0] // 2
        grad_w = cpu_kernels.filter_table_coefficients_backward(list(grad), fc, dfc, ctx.spacing)
        grad_b2 = grad_w[:, :m].sum(1) if need[7] else None
        grad_w2 = (
            torch.stack([fixed_product(grad_w[k].t(), h[k].t()) for k in range(n_blocks)])
            if need[6]
            else None
        )
        grad_w1 = grad_b1 = None
        if need[4] or need[5]:
            grad_h = [fixed_product(grad_w[k], w2[k].t()) for k in range(n_blocks)]
            grad_a = cpu_kernels.filter_hidden_backward(grad_h, a, b1.reshape(-1))
            if need[5]:
                grad_b1 = grad_a[:m].sum(0).view(n_blocks, width)
            if need[4]:
                # as (e_de^T grad_a)^T: 156 against 582 us as grad_a^T e_de on MKL
                grad_w1 = fixed_product(e_de.t(), grad_a.t()).t().reshape(n_blocks, width, n_rbf)
        return None, None, None, None, grad_w1, grad_b1, grad_w2, grad_b2


def _differentiable_backward(ctx, grad):
    e_de, fc, dfc, w1, b1, w2, b2 = ctx.saved_tensors[:7]
    need = ctx.needs_input_grad
    weights = (w1, b1, w2, b2)
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in weights]
        tables = plain_filter_tables(e_de, fc, dfc, ctx.spacing, *leaves)
        grads = torch.autograd.grad(tables, leaves, grad, create_graph=True, allow_unused=True)
    return (None, None, None, None) + tuple(g if need[4 + k] else None for k, g in enumerate(grads))
