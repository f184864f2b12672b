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
"""

from __future__ import annotations

import torch

from . import cpu_kernels, kernels
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
    if not torch.compiler.is_compiling() and filters.numel() >= kernels.MIN_FUSED_SIZE:
        kernels.check_rows(pair_i, x.shape[0], "cfconv pair indices")
        return _CFConv.apply(x, filters, a, b)
    # small (one molecule), or inside torch.compile, which fuses the plain formula itself
    return _cfconv_plain(x, filters, a, b)
