"""Dense layers whose large float32 CPU products run on oneDNN, where that is faster.

PyTorch multiplies float32 CPU matrices with MKL's sgemm. On this project's CPU (AMD EPYC,
Zen 5, AVX-512) that reached 86-94 GFLOP/s on one core, while oneDNN's fp32 inner product
(shipped in every x86 torch build, ``torch.ops.mkldnn._linear_pointwise``) reached 150-188
GFLOP/s on the same products: (672 x 128) @ (128 x 128), 32 aspirins' atoms, in 119-131
instead of 243-251 us; 1,800 rows (a QM9 batch of 100) in 302 instead of 644 us (one
thread, CPU time, 2026-12-03). Both are exact float32 products (no reduced-precision
inputs); they round differently, as two BLAS libraries do (2.3e-6 either way against a
float64 product of those 672 rows).

:class:`Linear` is ``nn.Linear`` (same parameters, state dict and ``isinstance``) whose
products go to oneDNN for float32 CPU inputs of at least :data:`ONEDNN_MIN_ROWS` rows and
:data:`ONEDNN_MIN_WORK` multiply-adds (in compiled code :data:`ONEDNN_MIN_WORK_COMPILED`),
forward and in the backward pass (the product with
the weight and the weight gradient, whose inner dimension is the batch's rows, padded like
the forward's); everything else uses ``F.linear``. Compiled code calls the operator ``atomlens::linear``
(:mod:`atomlens.nn.cpu_kernels`). Inside :func:`plain_products` (force training's forward
pass) and in backward passes that build a graph, outside compiled code, the products are
PyTorch's. ``ATOMLENS_ONEDNN=0`` turns this off; ``ATOMLENS_FUSED=0`` (or
:func:`atomlens.nn.kernels.set_fused`) all of atomlens's kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, kernels

#: rows from which a float32 CPU product goes to oneDNN (measured: 64 rows tie, 128 rows
#: 32 against 49 us, 256 rows 52 against 95 us for a 128 x 128 weight)
ONEDNN_MIN_ROWS = 128
#: and multiply-adds (rows x in x out): below, the Function's overhead per call outweighs the
#: faster product. QM9 64/3 at batch 50 (~900 x 64 x 64 = 3.7 M) trained end to end at
#: 2,754-2,873 mol/CPU-s on oneDNN against 3,420-3,659 on MKL; 672 x 128 x 128 (11 M, 32
#: aspirins) and 1,800 x 128 x 128 (29 M, QM9 128/6) gain
ONEDNN_MIN_WORK = 1 << 23
#: the same inside compiled code, which calls the operator without the Function's overhead:
#: 672 x 128 x 64 (32 aspirins' atoms into the head's 64 features, 5.5 M) took 57 us on
#: oneDNN against 109 on MKL, 672 x 64 x 1 14 against 5 us (one thread, CPU time)
ONEDNN_MIN_WORK_COMPILED = 1 << 20

#: oneDNN's inner product, or None: no oneDNN in this torch build, or ``ATOMLENS_ONEDNN=0``
#: (PyTorch's products only; ``ATOMLENS_FUSED=0`` also turns off the other kernels)
_ONEDNN = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available() and os.environ.get("ATOMLENS_ONEDNN", "1") != "0"
    else None
)


_state = {"plain": 0}


@contextlib.contextmanager
def plain_products():
    """Inside: every product is ``F.linear``'s. For force training's forward pass, whose
    backward pass builds a graph that is differentiated again: there PyTorch's products and
    their C++ autograd beat oneDNN's Function (its Python overhead and copies, per call, in
    both passes): aspirin E+F training at batch 32 ran 86-96 ms per step with MKL against
    101-111 ms with oneDNN (one thread, CPU time, alternated)."""
    _state["plain"] += 1
    try:
        yield
    finally:
        _state["plain"] -= 1


def _onednn_takes(
    x: torch.Tensor,
    out_features: int,
    min_rows: int = ONEDNN_MIN_ROWS,
    min_work: int | None = None,
) -> bool:
    """Whether a product of ``x`` (rows x in) into ``out_features`` runs on oneDNN, as far
    as ``x`` decides (:func:`_onednn_applies` adds the weight's checks). ``min_work``: the
    least rows x in x out (default: :data:`ONEDNN_MIN_WORK`, or
    :data:`ONEDNN_MIN_WORK_COMPILED` in compiled code)."""
    compiling = torch.compiler.is_compiling()
    if min_work is None:
        min_work = ONEDNN_MIN_WORK_COMPILED if compiling else ONEDNN_MIN_WORK
    return (
        _ONEDNN is not None
        and not _state["plain"]
        and kernels.fused_enabled()
        and x.dim() == 2
        and x.shape[0] >= min_rows
        and x.shape[0] * x.shape[1] * out_features >= min_work
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and (
            cpu_kernels.compiled_ops_ready(x)  # compiling: the operator
            if compiling
            else not torch._C._functorch.is_functorch_wrapped_tensor(x)
        )
    )


def _onednn_applies(
    x: torch.Tensor,
    weight: torch.Tensor,
    min_rows: int = ONEDNN_MIN_ROWS,
    min_work: int | None = None,
) -> bool:
    return (
        _onednn_takes(x, weight.shape[0], min_rows, min_work)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and (
            cpu_kernels.compiled_ops_ready(x, weight)
            if torch.compiler.is_compiling()
            else not torch._C._functorch.is_functorch_wrapped_tensor(weight)
        )
    )


def batch_rows(x: torch.Tensor) -> int:
    """The rows to carry a batch's atom features ``x`` (atoms x features) in through a
    network of :class:`Linear` layers: the bucket size (:func:`_bucket`) of its atoms where
    their products run on oneDNN outside compiled code, else as many rows as it has.

    A QM9 batch's atom count changes from step to step, so every product padded its input
    (and its output gradient) to the bucket size: about 60 copies of ~1,800 x 128 per
    training step. A representation that pads its features once (:func:`pad_rows`, the
    extra rows zero and never read by the pair operations) and slices them off at its end
    gives the layers bucket-sized inputs, which they use as they are."""
    n = x.shape[0]
    if torch.compiler.is_compiling() or not _onednn_takes(x, x.shape[-1]):
        return n
    return _bucket(n)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (differentiable; ``x`` if it has them)."""
    return x if rows == x.shape[0] else _pad_rows(x, rows)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its strides are not a dense layout: for oneDNN's
    weight argument, which it reorders into its own layout whatever the strides (a
    transposed view such as the weight gradient's ``x.T`` costs nothing extra there)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a row-major array, for oneDNN's input argument, which the operator makes
    contiguous with PyTorch's copy. A transposed view (a weight gradient's ``grad.T``) is
    copied by atomlens's tiled transpose instead (:func:`cpu_kernels.transpose`): 21 against
    90 us for 1,792 x 128, and a 128 x 128 weight gradient of 1,792 rows in 288 against
    360 us with the product (one thread, CPU time, 2026-12-04)."""
    if t.is_contiguous():
        return t
    if t.t().is_contiguous():
        out = cpu_kernels.transpose(t.t())
        if out is not None:
            return out
    return t.contiguous()


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of 2^max(4, floor(log2 n) - 6): multiples of 16, at
    most 64 sizes per octave, at most 1.6% more from 1,024 rows (6.25% from 256).

    The padded rows are computed and thrown away: with 16 sizes per octave (up to 6.25%)
    a 128/6 QM9 step's products did 1.26% more work than its batches' atoms need, 0.37%
    with 64, and the step ran 0.25 ms faster of ~27.7 (alternated in one process, one
    thread, CPU time, 2026-12-05). oneDNN builds each size's kernel once (an epoch's
    batches of 100 QM9 molecules, 1,709-1,906 atoms, made 14 sizes)."""
    step = 1 << max(4, n.bit_length() - 7)
    return -(-n // step) * step


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (2-D) with zero rows appended up to ``rows``: one copy, and only the new rows
    zeroed (``F.pad`` fills the whole array first: 96-99 against 62 us for ~1,800 x 128)."""
    out = t.new_empty(rows, t.shape[1])
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].zero_()
    return out


#: per layer and product (weight's storage, shape): the rows of its last oneDNN call
_last_rows: dict[tuple, int] = {}


def _repeated(kind: str, weight: torch.Tensor, n: int) -> bool:
    """Whether this layer's (weight's) previous product of this kind had ``n`` rows too."""
    key = (kind, weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))
    repeated = _last_rows.get(key) == n
    if len(_last_rows) > 4096:  # models come and go: forget them
        _last_rows.clear()
    _last_rows[key] = n
    return repeated


def _padded_rows(kind: str, weight: torch.Tensor, m: int) -> int:
    """The rows a product of ``m`` rows runs with: ``m`` when it is a bucket size or this
    layer's previous product of this kind had ``m`` rows too, else :func:`_bucket` (m)."""
    rows = _bucket(m)
    return m if rows != m and _repeated(kind, weight, m) else rows


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x @ weight.T + bias`` by oneDNN; rows that change from call to call are padded with
    zeros to :func:`_bucket` sizes.

    oneDNN builds a kernel for every new shape (0.9 ms for 1,600-1,800 rows here, three
    times the product) and keeps 1,024: QM9 batches, each with its own number of atoms,
    rebuilt on most calls and trained end to end slower than MKL (973 against ~1,220
    mol/CPU-s, 128/6). A layer whose row count differs from its previous call's is padded:
    at most 64 sizes per octave, 30-90 us of copying per 300 us product. A layer called
    with the same rows again (MD, a fixed batch) runs unpadded, without the copy. The C++
    operator of compiled code always pads (:mod:`atomlens.nn.cpu_kernels`).
    """
    m = x.shape[0]
    rows = _padded_rows("x", weight, m)
    if rows != m:
        x = _pad_rows(x, rows)
    y = _ONEDNN(_row_major(x), _dense(weight), bias, "none", [], "")
    return y[:m] if rows != m else y


#: eager code's oneDNN layer as the C++ autograd Function of :mod:`atomlens.nn.cpu_kernels`
#: (``onednn_linear``: the same products, paddings and transposes as :class:`_OneDNNLinear`,
#: whose Python costs about 30 us per layer and call: 44 against 12 us beyond the products
#: for 128 rows, one thread, 2026-12-05); False: the Python Function (compiled code and
#: torch.func transforms always take it)
CPP_FUNCTION = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for large float32 CPU inputs (module doc).

    A layer with one output (a head's last) in compiled code: ``(x * w).sum(-1) + b``, a
    reduction Inductor fuses (and its backward a broadcast), where ``F.linear`` was two MKL
    calls per energy and forces (a 64 -> 1 product and its 672 x 1 x 64 transpose: 0.6% of
    32 aspirins' batched MD step)."""
    if weight.shape[0] == 1 and x.dim() == 2 and torch.compiler.is_compiling():
        out = (x * weight[0]).sum(-1, keepdim=True)
        return out if bias is None else out + bias
    if _onednn_applies(x, weight):
        if (
            CPP_FUNCTION
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
        ):
            module = cpu_kernels._module()  # _onednn_applies checked what _loaded would
            if module is not None:
                return module.onednn_linear(x, weight, bias)
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def fixed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` without autograd, for shapes that repeat on every call (a filter
    table's grid): on oneDNN, unpadded, whatever the row count (oneDNN keeps the shape's
    kernel), from the smaller work of compiled code's operator on (no Function, no padding:
    a 0.02 Angstrom table's 502 x 128 x 128 took 83 us against MKL's 170), else
    ``F.linear``. A transposed ``x`` is copied by :func:`_row_major`, a transposed
    ``weight`` read as it is (:func:`_dense`)."""
    if _onednn_applies(x, weight, min_rows=1, min_work=ONEDNN_MIN_WORK_COMPILED):
        return _ONEDNN(_row_major(x), _dense(weight), None, "none", [], "")
    return F.linear(x, weight)


class _OneDNNLinear(kernels.Function):
    """``x @ weight.T + bias`` by oneDNN; the backward calls :func:`linear` again (any order)."""

    @staticmethod
    def forward(x, weight, bias):
        if torch.compiler.is_compiling():
            return torch.ops.atomlens.linear(x, weight, bias)
        return _onednn_product(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        # a backward pass that builds a graph is differentiated again: PyTorch's products
        # there (as :func:`plain_products`); compiled code has no Python overhead: oneDNN
        if torch.compiler.is_compiling():  # the operator pads rows, not the inner dimension
            if ctx.needs_input_grad[0]:
                grad_x = linear(grad, weight.t())
            if ctx.needs_input_grad[1]:  # N changes: MKL, unless N repeated when traced
                if _repeated("dW", weight, x.shape[0]):
                    grad_weight = linear(grad.t(), x.t())
                else:
                    grad_weight = F.linear(grad.t(), x.t())
        elif not torch.is_grad_enabled() and _onednn_applies(grad, weight.t()):
            need_bias = ctx.has_bias and ctx.needs_input_grad[2]
            grad_x, grad_weight, grad_bias = _onednn_backward(
                grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_bias
            )
        else:
            if ctx.needs_input_grad[0]:
                grad_x = F.linear(grad, weight.t())  # (N, out) @ (out, in)
            if ctx.needs_input_grad[1]:
                grad_weight = F.linear(grad.t(), x.t())  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2] and grad_bias is None:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def _onednn_backward(grad, x, weight, need_x: bool, need_weight: bool, need_bias: bool = False):
    """Both products of the backward pass by oneDNN, outside compiled code and without a
    graph: ``grad @ weight`` and ``grad.T @ x``. Rows that change from call to call are
    padded to :func:`_bucket` sizes as in the forward pass; the weight gradient's inner
    dimension is those rows, so it reuses oneDNN's kernel too (zero rows add nothing).
    With ``need_bias`` the bias gradient ``grad.sum(0)`` comes from the transpose that
    makes ``grad.T`` for the weight gradient (:func:`cpu_kernels.transpose_and_sums`),
    else it is None."""
    m = grad.shape[0]
    rows = _padded_rows("grad", weight, m)
    grad = _pad_rows(grad, rows) if rows != m else _row_major(grad)
    grad_x = grad_weight = grad_bias = None
    if need_x:
        grad_x = _ONEDNN(grad, _dense(weight.t()), None, "none", [], "")
        grad_x = grad_x[:m] if rows != m else grad_x
    if need_weight:
        if rows != m:
            x = _pad_rows(x, rows)
        both = cpu_kernels.transpose_and_sums(grad) if need_bias else None
        if both is not None:
            grad_t, grad_bias = both
        else:
            grad_t = _row_major(grad.t())
        grad_weight = _ONEDNN(grad_t, _dense(x.t()), None, "none", [], "")
    return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """``nn.Linear`` whose products use :func:`linear` (oneDNN for large float32 CPU inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
