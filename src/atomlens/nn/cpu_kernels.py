"""Hand-written CPU kernels: the symmetric continuous-filter convolution, the table scatter.

Over symmetric pairs (``a_p < b_p``, one filter row ``W_p`` per unordered pair) the
convolution adds ``x[b_p] * W_p`` into row ``a_p`` and ``x[a_p] * W_p`` into row ``b_p``.
Inductor's fused kernel (:mod:`atomlens.nn.kernels`) makes one pass over the pairs per
direction, so the ``(P, F)`` filter array is read twice; in a QM9 training step that array
(15,000 pairs x 128 features, 7 MB) comes from L3 or memory. This loop reads it once and
updates both rows: on one such call (1,794 atoms, 14,082 pairs, one thread, CPU time),
0.46 instead of 1.08 ms with warm caches and 0.58 instead of 1.51 ms with cold ones.

The transpose of a filter-table lookup (the gradient w.r.t. the Hermite table, once per
interaction in every training step) adds each pair's gradient row into its interval's four
table rows with weights 1, t, t^2, t^3. Inductor's loop ran over the 4P (pair, row)
combinations and recomputed the pair's interval for each. This loop reads each gradient row
once and adds all four: 1.0-1.8 instead of 2.1-3.3 ms on the same batch's 14,082 pairs
(one thread, CPU time, warm and cold caches).

Both are compiled with ``torch.utils.cpp_extension.load_inline`` on first use (a C++
compiler, and ninja, a dependency; about 25 s once, cached by torch under
``TORCH_EXTENSIONS_DIR``), and run single-threaded like atomlens's other scatter kernels. Without a compiler (or
``ATOMLENS_FUSED=0``) they return None and the caller uses the Inductor kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings

import torch

from . import kernels

_LOG = logging.getLogger("atomlens")

#: bump when the source changes: torch caches builds by name
_NAME = "atomlens_cpu_kernels_v2"

_SOURCE = r"""
#include <torch/extension.h>

template <typename T>
static void cfconv_rows(const T* __restrict x, const T* __restrict w, const int64_t* a,
                        const int64_t* b, T* __restrict y, int64_t pairs, int64_t width) {
  for (int64_t p = 0; p < pairs; ++p) {
    const T* wp = w + p * width;
    const T* xa = x + a[p] * width;
    const T* xb = x + b[p] * width;
    T* ya = y + a[p] * width;
    T* yb = y + b[p] * width;
#pragma omp simd
    for (int64_t f = 0; f < width; ++f) {
      const T filter = wp[f];
      ya[f] += xb[f] * filter;
      yb[f] += xa[f] * filter;
    }
  }
}

torch::Tensor cfconv(torch::Tensor x, torch::Tensor w, torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cfconv: shapes");
  TORCH_CHECK(a.numel() == w.size(0) && b.numel() == w.size(0), "cfconv: one pair per row");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cfconv: dtypes");
  TORCH_CHECK(a.scalar_type() == torch::kLong && b.scalar_type() == torch::kLong, "cfconv: int64");
  auto xc = x.contiguous(), wc = w.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  auto y = torch::zeros_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "cfconv", [&] {
    cfconv_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                          ac.data_ptr<int64_t>(), bc.data_ptr<int64_t>(),
                          y.data_ptr<scalar_t>(), wc.size(0), wc.size(1));
  });
  return y;
}

template <typename T>
static void scatter_rows(const T* __restrict g, const T* __restrict x, T* __restrict out,
                         int64_t pairs, int64_t width, int64_t intervals, int64_t order) {
  for (int64_t p = 0; p < pairs; ++p) {
    const T xv = x[p];
    int64_t k = 0;
    T t = xv;  // NaN: row 0, NaN weights (as the Python lookup)
    if (!std::isnan(xv)) {
      T row = std::floor(xv);
      row = row < T(0) ? T(0) : (row > T(intervals - 1) ? T(intervals - 1) : row);
      k = static_cast<int64_t>(row);
      t = xv - row;
    }
    T w0 = 0, w1 = 0, w2 = 0, w3 = 0;  // d^order/dt^order of [1, t, t^2, t^3]
    if (order == 0) { w0 = 1; w1 = t; w2 = t * t; w3 = t * t * t; }
    else if (order == 1) { w1 = 1; w2 = 2 * t; w3 = 3 * t * t; }
    else if (order == 2) { w2 = 2; w3 = 6 * t; }
    else if (order == 3) { w3 = 6; }
    const T* gp = g + p * width;
    T* o = out + 4 * k * width;
#pragma omp simd
    for (int64_t f = 0; f < width; ++f) {
      const T gv = gp[f];
      o[f] += w0 * gv;
      o[width + f] += w1 * gv;
      o[2 * width + f] += w2 * gv;
      o[3 * width + f] += w3 * gv;
    }
  }
}

torch::Tensor table_scatter(torch::Tensor grad, torch::Tensor x, int64_t order, int64_t rows) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 1 && x.size(0) == grad.size(0), "scatter: shapes");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "scatter: dtypes");
  TORCH_CHECK(rows % 4 == 0 && rows >= 4, "scatter: four rows per interval");
  auto g = grad.contiguous(), xc = x.contiguous();
  auto out = torch::zeros({rows, g.size(1)}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "table_scatter", [&] {
    scatter_rows<scalar_t>(g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), g.size(0), g.size(1), rows / 4, order);
  });
  return out;
}
"""

_state: dict = {"module": None, "failed": False}


@contextlib.contextmanager
def _ninja_on_path():
    """``load_inline`` runs ``ninja`` from PATH. The ``ninja`` dependency installs it beside
    the interpreter, which PATH lacks when a virtual environment is used without being
    activated (``.venv/bin/python``): add that folder for the build, then restore PATH."""
    folder = os.path.dirname(sys.executable)
    if shutil.which("ninja") or not shutil.which("ninja", path=folder):
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = folder + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def _module():
    if _state["module"] is None and not _state["failed"]:
        try:
            from torch.utils.cpp_extension import load_inline

            _LOG.info("atomlens: compiling the C++ pair kernels (once; cached on disk)")
            with _ninja_on_path():
                _state["module"] = load_inline(
                    _NAME,
                    cpp_sources=_SOURCE,
                    functions=["cfconv", "table_scatter"],
                    extra_cflags=["-O3", "-fopenmp-simd"],
                )
        except Exception as error:  # noqa: BLE001 (no compiler or ninja, unsupported platform)
            _state["failed"] = True
            warnings.warn(
                f"atomlens: C++ pair kernels unavailable ({type(error).__name__}: "
                f"{str(error)[:200]}); using the compiled PyTorch kernels",
                stacklevel=3,
            )
    return _state["module"]


def _loaded(*floats: torch.Tensor):
    """The built module if these kernels apply to ``floats``, else None: fused kernels on,
    plain (not torch.func-wrapped) CPU tensors of one dtype, float32 or float64, and a
    successful build."""
    dtype = floats[0].dtype
    if (
        not kernels.fused_enabled()
        or dtype not in (torch.float32, torch.float64)
        or any(
            t.dtype != dtype
            or t.device.type != "cpu"
            or torch._C._functorch.is_functorch_wrapped_tensor(t)
            for t in floats
        )
    ):
        return None
    return _module()


def cfconv(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """The symmetric cfconv of plain float CPU tensors in one pass, or None where this
    kernel does not apply (other devices or dtypes, torch.func wrappers, no compiler,
    fused kernels off)."""
    module = _loaded(x, w)
    return None if module is None else module.cfconv(x, w, a, b)


def table_scatter(grad: torch.Tensor, x: torch.Tensor, order: int, n_rows: int):
    """The transpose of a Hermite-table lookup w.r.t. the table
    (:func:`atomlens.nn.hermite._scatter_plain`) in one pass over ``grad``: each pair's
    four weighted rows added at once; or None where this kernel does not apply."""
    module = _loaded(grad, x)
    return None if module is None else module.table_scatter(grad, x, int(order), int(n_rows))
