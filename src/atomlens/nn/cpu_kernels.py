"""Hand-written CPU kernels: the symmetric continuous-filter convolution (with stored or
tabulated filters) and the table scatter.

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

With tabulated filters (SchNet's default) the convolution goes further: one loop reads
each pair's four table rows, evaluates its filter row in registers and updates both atoms,
so the ``(P, F)`` filter array is never written or read; one backward loop gives the
gradients w.r.t. the atom features, the table and the pairs' grid coordinates (forces) from
the same rows. On a QM9 128/6 training step (one thread, CPU time) the step went from 0.083
to 0.067 s; on 32 aspirins' MD step (eager) the pair work from ~9.5 to 3.6 ms.
``torch.compile`` (MD's compiled step, compiled training) calls the same two loops as the
operators ``atomlens::tabulated_cfconv`` and ``atomlens::tabulated_cfconv_backward``, the
shifted softplus and its derivative as ``atomlens::shifted_softplus`` and
``atomlens::shifted_softplus_backward`` (:mod:`atomlens.nn.activations`), and oneDNN's
float32 inner product (:mod:`atomlens.nn.linear`) as ``atomlens::linear``: their
schemas are defined in Python, their CPU kernels registered from C++ when the module loads,
so Inductor's C++ wrapper calls them without entering the interpreter.

All are compiled with ``torch.utils.cpp_extension.load_inline`` on first use (a C++
compiler, and ninja, a dependency; about 30 s once, cached by torch under
``TORCH_EXTENSIONS_DIR``) for the processor they run on (:func:`_build_target`), and run
single-threaded like atomlens's other scatter kernels. Without a compiler (or
``ATOMLENS_FUSED=0``) they return None and the caller uses the Inductor kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from . import kernels

_LOG = logging.getLogger("atomlens")

#: bump when the source changes: torch caches builds by name
_NAME = "atomlens_cpu_kernels_v35"

_SOURCE = r"""
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

// every pair's two atoms in [0, rows): an index outside would read and write outside the
// feature rows. The model's callers check their pairs once per batch (kernels.check_rows);
// the operators are public, so each call checks too (a few us for 10^4 pairs)
static void check_atoms(const torch::Tensor& a, const torch::Tensor& b, int64_t rows,
                        const char* what) {
  auto ac = a.contiguous(), bc = b.contiguous();
  const int64_t* ia = ac.data_ptr<int64_t>();
  const int64_t* ib = bc.data_ptr<int64_t>();
  const int64_t n = ac.numel();
  uint64_t worst = 0;  // unsigned: a negative index counts as larger than any row count
  for (int64_t p = 0; p < n; ++p)
    worst = std::max(worst, std::max(static_cast<uint64_t>(ia[p]), static_cast<uint64_t>(ib[p])));
  TORCH_CHECK(n == 0 || worst < static_cast<uint64_t>(rows), what,
              ": a pair's atom index outside [0, ", rows, ")");
}

torch::Tensor cfconv(torch::Tensor x, torch::Tensor w, torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "cfconv: shapes");
  TORCH_CHECK(a.numel() == w.size(0) && b.numel() == w.size(0), "cfconv: one pair per row");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cfconv: dtypes");
  TORCH_CHECK(a.scalar_type() == torch::kLong && b.scalar_type() == torch::kLong, "cfconv: int64");
  check_atoms(a, b, x.size(0), "cfconv");
  auto xc = x.contiguous(), wc = w.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  auto y = torch::zeros_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "cfconv", [&] {
    cfconv_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                          ac.data_ptr<int64_t>(), bc.data_ptr<int64_t>(),
                          y.data_ptr<scalar_t>(), wc.size(0), wc.size(1));
  });
  return y;
}

// the interval k (clamped to the table) and t = x - k of grid coordinate x; NaN: row 0 and
// t = NaN, so the result is NaN (as the Python lookup)
template <typename T>
static inline void interval(T x, int64_t intervals, int64_t& k, T& t) {
  k = 0;
  t = x;
  if (!std::isnan(x)) {
    T row = std::floor(x);
    row = row < T(0) ? T(0) : (row > T(intervals - 1) ? T(intervals - 1) : row);
    k = static_cast<int64_t>(row);
    t = x - row;
  }
}

// the same with x first clamped to [0, intervals], as hermite_lookup does; false where x
// lies outside (x gets no gradient there)
template <typename T>
static inline bool clamped_interval(T x, int64_t intervals, int64_t& k, T& t) {
  const bool inside = !(x < T(0)) && !(x > T(intervals));  // NaN: inside, and stays NaN
  interval(x < T(0) ? T(0) : (x > T(intervals) ? T(intervals) : x), intervals, k, t);
  return inside;
}

// whether a pair lies beyond the grid's end, where its filter is zero: SchNet's tables end
// at the cutoff, beyond which the cutoff function makes every filter zero (the clamped
// lookup would give the end's value, zero up to the coefficients' rounding). The loops
// skip such pairs: no output, no gradient. A Verlet list's skin and padding carry them (838
// of the 5,632 pairs listed for 32 aspirins). NaN is not beyond (it stays NaN)
template <typename T>
static inline bool beyond(T x, int64_t intervals) {
  return x > T(intervals);
}

template <typename T>
static void scatter_rows(const T* __restrict g, const T* __restrict x, T* __restrict out,
                         int64_t pairs, int64_t width, int64_t intervals, int64_t order) {
  for (int64_t p = 0; p < pairs; ++p) {
    int64_t k;
    T t;
    interval(x[p], intervals, k, t);
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

// one vector register of floats or doubles as one value (GCC/Clang vector extensions): 64
// bytes where the build has AVX-512 (32 registers), else 32. Only AVX-512 builds take the
// pairs in runs (RUNS): with AVX2's 16 registers the chunked loops ran slower than the pair
// by pair ones (QM9 block, a build without AVX-512 on this CPU: backward 0.85 against 0.71
// ms, forward 0.37 against 0.34)
#ifdef __AVX512F__
#define ATOMLENS_VECTOR_BYTES 64
constexpr bool RUNS = true;
#else
#define ATOMLENS_VECTOR_BYTES 32
constexpr bool RUNS = false;
#endif
typedef float vfloat __attribute__((vector_size(ATOMLENS_VECTOR_BYTES), aligned(4), may_alias));
typedef double vdouble __attribute__((vector_size(ATOMLENS_VECTOR_BYTES), aligned(8), may_alias));
template <typename T> struct vec_of;
template <> struct vec_of<float> { typedef vfloat type; };
template <> struct vec_of<double> { typedef vdouble type; };
template <typename T>
static inline typename vec_of<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename vec_of<T>::type*>(p);
}
template <typename T>
static inline void vstore(T* p, typename vec_of<T>::type v) {
  *reinterpret_cast<typename vec_of<T>::type*>(p) = v;
}
// W = c0 + t (c1 + t (c2 + t c3)) of one vector of features, c0 at c, rows width apart
template <typename T>
static inline typename vec_of<T>::type hermite_filter(const T* c, int64_t width,
                                                      typename vec_of<T>::type t) {
  return vload(c) + t * (vload(c + width) + t * (vload(c + 2 * width) + t * vload(c + 3 * width)));
}
// vectors per chunk of features: an atom's rows stay in registers one chunk at a time
constexpr int CHUNK = 4;

// The pairs come sorted by their first atom a (the neighbour list's order; unsorted pairs
// give runs of one, with the same result): a run of pairs with one atom a shares its rows
// (h_a, and g_a and dL/dh_a backward), which are then read once per run and kept in
// registers, a chunk of CHUNK vectors of features at a time (2 in forces' backward pass,
// which also keeps a dL/dx vector per pair), instead of read and written per
// pair. QM9 pairs come in runs of ~8: forward 0.239 against 0.279 ms, backward 0.569 against
// 0.629 ms (one block of a 128/6 batch, one thread, CPU time, alternated). Atom a's output
// row is read after its run's pairs have updated their b rows: a pair of an atom with its
// own periodic image (a == b) adds both halves.

// the end of the run of pairs from p0 that share their first atom
static inline int64_t run_end(const int64_t* a, int64_t p0, int64_t pairs) {
  int64_t p1 = p0 + 1;
  while (p1 < pairs && a[p1] == a[p0]) ++p1;
  return p1;
}

// pair p's part of the tabulated cfconv for features [f0, f1)
template <typename T>
__attribute__((always_inline)) static inline void tabulated_pair(
    const T* __restrict h, const T* __restrict table, const T* x, const int64_t* a,
    const int64_t* b, T* __restrict y, int64_t p, int64_t f0, int64_t f1, int64_t width,
    int64_t intervals) {
  int64_t k;
  T t;
  clamped_interval(x[p], intervals, k, t);
  const T* c0 = table + 4 * k * width;
  const T* c1 = c0 + width;
  const T* c2 = c1 + width;
  const T* c3 = c2 + width;
  const T* ha = h + a[p] * width;
  const T* hb = h + b[p] * width;
  T* ya = y + a[p] * width;
  T* yb = y + b[p] * width;
#pragma omp simd
  for (int64_t f = f0; f < f1; ++f) {
    const T filter = c0[f] + t * (c1[f] + t * (c2[f] + t * c3[f]));
    ya[f] += hb[f] * filter;
    yb[f] += ha[f] * filter;
  }
}

// cfconv with the filters read from their Hermite table: W_p = c0 + t (c1 + t (c2 + t c3))
// of interval k_p, computed where it is used and never stored
template <typename T>
static void tabulated_rows(const T* __restrict h, const T* __restrict table, const T* x,
                           const int64_t* a, const int64_t* b, T* __restrict y,
                           int64_t pairs, int64_t width, int64_t intervals) {
  if (!RUNS) {
    for (int64_t p = 0; p < pairs; ++p)
      if (!beyond(x[p], intervals))
        tabulated_pair<T>(h, table, x, a, b, y, p, 0, width, width, intervals);
    return;
  }
  typedef typename vec_of<T>::type V;
  constexpr int64_t L = ATOMLENS_VECTOR_BYTES / sizeof(T), C = CHUNK * L;
  const int64_t full = width / C * C;  // features in whole chunks; the rest pair by pair
  for (int64_t p0 = 0, p1; p0 < pairs; p0 = p1) {
    p1 = run_end(a, p0, pairs);
    const T* ha = h + a[p0] * width;
    T* ya = y + a[p0] * width;
    for (int64_t f0 = 0; f0 < full; f0 += C) {
      V hav[CHUNK], sum[CHUNK];
      _Pragma("GCC unroll 4") for (int j = 0; j < CHUNK; ++j) {
        hav[j] = vload(ha + f0 + j * L);
        sum[j] = V{};
      }
      for (int64_t p = p0; p < p1; ++p) {
        if (beyond(x[p], intervals)) continue;
        int64_t k;
        T t;
        clamped_interval(x[p], intervals, k, t);
        const V tv = V{} + t;
        const T* c = table + 4 * k * width + f0;
        const T* hb = h + b[p] * width + f0;
        T* yb = y + b[p] * width + f0;
        _Pragma("GCC unroll 4") for (int j = 0; j < CHUNK; ++j) {
          const int64_t o = j * L;
          const V filter = hermite_filter(c + o, width, tv);
          sum[j] += vload(hb + o) * filter;
          vstore(yb + o, vload(yb + o) + hav[j] * filter);
        }
      }
      _Pragma("GCC unroll 4") for (int j = 0; j < CHUNK; ++j)
          vstore(ya + f0 + j * L, vload(ya + f0 + j * L) + sum[j]);
    }
    for (int64_t p = p0; full < width && p < p1; ++p)
      if (!beyond(x[p], intervals))
        tabulated_pair<T>(h, table, x, a, b, y, p, full, width, width, intervals);
  }
}

// its gradients in one pass over the pairs: u_p = g_a h_b + g_b h_a is dL/dW_p;
// dL/dh_a += g_b W_p, dL/dh_b += g_a W_p; dL/dx_p = u_p . dW/dt; table rows += [1 t t^2 t^3] u_p
// pair p's part for features [f0, f1): its part of dL/dx_p is returned (inlined: called
// through a function GCC kept, forces' backward took 6% longer)
template <typename T, bool NEED_H, bool NEED_TABLE, bool NEED_X>
__attribute__((always_inline)) static inline T tabulated_backward_pair(
    const T* __restrict g, const T* __restrict h, const T* __restrict table, const int64_t* a,
    const int64_t* b, T* __restrict grad_h, T* __restrict grad_table, int64_t p, int64_t k, T t,
    int64_t f0, int64_t f1, int64_t width) {
  const T tt = t * t, ttt = tt * t;
  const T* c0 = table + 4 * k * width;
  const T* c1 = c0 + width;
  const T* c2 = c1 + width;
  const T* c3 = c2 + width;
  const T* ga = g + a[p] * width;
  const T* gb = g + b[p] * width;
  const T* ha = h + a[p] * width;
  const T* hb = h + b[p] * width;
  T* gha = grad_h + (NEED_H ? a[p] * width : 0);
  T* ghb = grad_h + (NEED_H ? b[p] * width : 0);
  T* r0 = grad_table + (NEED_TABLE ? 4 * k * width : 0);
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t f = f0; f < f1; ++f) {
    const T u = ga[f] * hb[f] + gb[f] * ha[f];
    if (NEED_H) {
      const T filter = c0[f] + t * (c1[f] + t * (c2[f] + t * c3[f]));
      gha[f] += gb[f] * filter;
      ghb[f] += ga[f] * filter;
    }
    if (NEED_X) dot += u * (c1[f] + t * (T(2) * c2[f] + T(3) * t * c3[f]));
    if (NEED_TABLE) {
      r0[f] += u;
      r0[width + f] += t * u;
      r0[2 * width + f] += tt * u;
      r0[3 * width + f] += ttt * u;
    }
  }
  return dot;
}

// all pairs. With AVX-512 in runs of one first atom, a chunk of features at a time; forces'
// dL/dx_p adds up over the chunks in a vector per pair of the run, summed at its end (2
// vectors per chunk there: 32 aspirins' listed pairs, dL/dh and dL/dx, 216 us against 226
// with 4, 235 with 8 and 295 pair by pair, which AVX2 builds keep; one thread, CPU time)
template <typename T, bool NEED_H, bool NEED_TABLE, bool NEED_X>
static void tabulated_backward_rows(const T* __restrict g, const T* __restrict h,
                                    const T* __restrict table, const T* x, const int64_t* a,
                                    const int64_t* b, T* __restrict grad_h,
                                    T* __restrict grad_table, T* __restrict grad_x,
                                    int64_t pairs, int64_t width, int64_t intervals) {
  if (!RUNS) {
    for (int64_t p = 0; p < pairs; ++p) {
      int64_t k;
      T t;
      const bool inside = clamped_interval(x[p], intervals, k, t);
      if (beyond(x[p], intervals)) {
        if (NEED_X) grad_x[p] = T(0);
        continue;
      }
      const T dot = tabulated_backward_pair<T, NEED_H, NEED_TABLE, NEED_X>(
          g, h, table, a, b, grad_h, grad_table, p, k, t, 0, width, width);
      if (NEED_X) grad_x[p] = inside ? dot : T(0);  // no gradient off the grid
    }
    return;
  }
  typedef typename vec_of<T>::type V;
  constexpr int CH = NEED_X ? 2 : CHUNK;
  constexpr int64_t L = ATOMLENS_VECTOR_BYTES / sizeof(T), C = CH * L;
  const int64_t full = width / C * C;  // features in whole chunks
  std::vector<V> dots;  // dL/dx of the run's pairs, a vector each
  for (int64_t p0 = 0, p1; p0 < pairs; p0 = p1) {
    p1 = run_end(a, p0, pairs);
    if (NEED_X) dots.assign(p1 - p0, V{});
    const T* ga = g + a[p0] * width;
    const T* ha = h + a[p0] * width;
    T* gha = grad_h + (NEED_H ? a[p0] * width : 0);
    for (int64_t f0 = 0; f0 < full; f0 += C) {
      V gav[CH], hav[CH], sum[CH];
      _Pragma("GCC unroll 4") for (int j = 0; j < CH; ++j) {
        gav[j] = vload(ga + f0 + j * L);
        hav[j] = vload(ha + f0 + j * L);
        sum[j] = V{};
      }
      for (int64_t p = p0; p < p1; ++p) {
        if (beyond(x[p], intervals)) continue;
        int64_t k;
        T t;
        clamped_interval(x[p], intervals, k, t);
        const V tv = V{} + t, tt = tv * tv, ttt = tt * tv;
        const T* c = table + 4 * k * width + f0;
        const T* gb = g + b[p] * width + f0;
        const T* hb = h + b[p] * width + f0;
        T* ghb = grad_h + (NEED_H ? b[p] * width + f0 : 0);
        T* r = grad_table + (NEED_TABLE ? 4 * k * width + f0 : 0);
        V dot = NEED_X ? dots[p - p0] : V{};
        _Pragma("GCC unroll 4") for (int j = 0; j < CH; ++j) {
          const int64_t o = j * L;
          const V gbv = vload(gb + o);
          const V c3 = vload(c + 3 * width + o), q = vload(c + 2 * width + o) + tv * c3;
          if (NEED_H) {
            const V filter = vload(c + o) + tv * (vload(c + width + o) + tv * q);
            sum[j] += gbv * filter;
            vstore(ghb + o, vload(ghb + o) + gav[j] * filter);
          }
          if (NEED_TABLE || NEED_X) {
            const V u = gav[j] * vload(hb + o) + gbv * hav[j];
            if (NEED_X) dot += u * (vload(c + width + o) + tv * (q + q + tv * c3));
            if (NEED_TABLE) {
              vstore(r + o, vload(r + o) + u);
              vstore(r + width + o, vload(r + width + o) + tv * u);
              vstore(r + 2 * width + o, vload(r + 2 * width + o) + tt * u);
              vstore(r + 3 * width + o, vload(r + 3 * width + o) + ttt * u);
            }
          }
        }
        if (NEED_X) dots[p - p0] = dot;
      }
      if (NEED_H)
        _Pragma("GCC unroll 4") for (int j = 0; j < CH; ++j)
            vstore(gha + f0 + j * L, vload(gha + f0 + j * L) + sum[j]);
    }
    for (int64_t p = p0; (NEED_X || full < width) && p < p1; ++p) {  // past the chunks; dL/dx
      int64_t k;
      T t;
      const bool inside = clamped_interval(x[p], intervals, k, t);
      if (beyond(x[p], intervals)) {
        if (NEED_X) grad_x[p] = T(0);
        continue;
      }
      const T rest = full < width ? tabulated_backward_pair<T, NEED_H, NEED_TABLE, NEED_X>(
                                        g, h, table, a, b, grad_h, grad_table, p, k, t, full,
                                        width, width)
                                  : T(0);
      if (NEED_X) {
        const V& d = dots[p - p0];
        T dot = rest;
        _Pragma("GCC unroll 16") for (int64_t l = 0; l < L; ++l) dot += d[l];
        grad_x[p] = inside ? dot : T(0);  // no gradient off the grid
      }
    }
  }
}

// the derivatives of that backward's (dL/dh, dL/dx) (forces) w.r.t. g, h, the table and x,
// given A = d./d(dL/dh) (N, F) and c = d./d(dL/dx) (P,) (force training's second pass):
//   dW    = A_a g_b + A_b g_a                   (through dL/dh)
//   d/dg_b += A_a W + c h_a W',  d/dg_a += A_b W + c h_b W',  d/dh_b += c g_a W',  d/dh_a += c g_b W'
//   table rows += [1 t t^2 t^3] dW + [0 1 2t 3t^2] c u,   d/dx = dW . W' + c u . W''
template <typename T>
static void tabulated_double_backward_rows(
    const T* __restrict A, const T* __restrict c, const T* __restrict g,
    const T* __restrict h, const T* __restrict table, const T* x, const int64_t* a,
    const int64_t* b, T* __restrict grad_g, T* __restrict grad_h, T* __restrict grad_table,
    T* __restrict grad_x, int64_t pairs, int64_t width, int64_t intervals) {
  for (int64_t p = 0; p < pairs; ++p) {
    if (beyond(x[p], intervals)) {
      grad_x[p] = T(0);
      continue;
    }
    int64_t k;
    T t;
    const bool inside = clamped_interval(x[p], intervals, k, t);
    const T cp = inside ? c[p] : T(0);  // dL/dx_p is zero outside the grid
    const T tt = t * t, ttt = tt * t;
    const T* c0 = table + 4 * k * width;
    const T* c1 = c0 + width;
    const T* c2 = c1 + width;
    const T* c3 = c2 + width;
    const int64_t ra = a[p] * width, rb = b[p] * width;
    T* r0 = grad_table + 4 * k * width;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < width; ++f) {
      const T w = c0[f] + t * (c1[f] + t * (c2[f] + t * c3[f]));
      const T dw = c1[f] + t * (T(2) * c2[f] + T(3) * t * c3[f]);
      const T ddw = T(2) * c2[f] + T(6) * t * c3[f];
      const T Aa = A[ra + f], Ab = A[rb + f];
      const T ga = g[ra + f], gb = g[rb + f], ha = h[ra + f], hb = h[rb + f];
      const T u = ga * hb + gb * ha;
      const T dW = Aa * gb + Ab * ga;
      const T cu = cp * u, cdw = cp * dw;
      grad_g[rb + f] += Aa * w + ha * cdw;
      grad_g[ra + f] += Ab * w + hb * cdw;
      grad_h[rb + f] += ga * cdw;
      grad_h[ra + f] += gb * cdw;
      r0[f] += dW;
      r0[width + f] += t * dW + cu;
      r0[2 * width + f] += tt * dW + T(2) * t * cu;
      r0[3 * width + f] += ttt * dW + T(3) * tt * cu;
      dot += dW * dw + cu * ddw;
    }
    grad_x[p] = inside ? dot : T(0);
  }
}

static void check_tabulated(const torch::Tensor& h, const torch::Tensor& table,
                            const torch::Tensor& x, const torch::Tensor& a,
                            const torch::Tensor& b) {
  TORCH_CHECK(h.dim() == 2 && table.dim() == 2 && h.size(1) == table.size(1),
              "tabulated cfconv: shapes");
  TORCH_CHECK(table.size(0) % 4 == 0 && table.size(0) >= 4, "tabulated cfconv: table rows");
  TORCH_CHECK(x.dim() == 1 && a.numel() == x.numel() && b.numel() == x.numel(),
              "tabulated cfconv: one grid coordinate per pair");
  TORCH_CHECK(h.scalar_type() == table.scalar_type() && x.scalar_type() == h.scalar_type(),
              "tabulated cfconv: dtypes");
  TORCH_CHECK(a.scalar_type() == torch::kLong && b.scalar_type() == torch::kLong,
              "tabulated cfconv: int64");
  check_atoms(a, b, h.size(0), "tabulated cfconv");
}

std::vector<torch::Tensor> tabulated_cfconv_double_backward(
    torch::Tensor grad_grad_h, torch::Tensor grad_grad_x, torch::Tensor grad, torch::Tensor h,
    torch::Tensor table, torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  check_tabulated(h, table, x, a, b);
  TORCH_CHECK(grad.sizes() == h.sizes() && grad_grad_h.sizes() == h.sizes() &&
                  grad_grad_x.sizes() == x.sizes(),
              "tabulated cfconv: gradient shapes");
  TORCH_CHECK(grad.scalar_type() == h.scalar_type() &&
                  grad_grad_h.scalar_type() == h.scalar_type() &&
                  grad_grad_x.scalar_type() == h.scalar_type(),
              "tabulated cfconv: gradient dtypes");
  auto Ac = grad_grad_h.contiguous(), cc = grad_grad_x.contiguous(), gc = grad.contiguous();
  auto hc = h.contiguous(), tc = table.contiguous(), xc = x.contiguous();
  auto ac = a.contiguous(), bc = b.contiguous();
  auto grad_g = torch::zeros_like(hc), grad_h = torch::zeros_like(hc);
  auto grad_table = torch::zeros_like(tc);
  auto grad_x = torch::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "tabulated_cfconv_double_backward", [&] {
    tabulated_double_backward_rows<scalar_t>(
        Ac.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
        hc.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
        ac.data_ptr<int64_t>(), bc.data_ptr<int64_t>(), grad_g.data_ptr<scalar_t>(),
        grad_h.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(), xc.size(0), hc.size(1), tc.size(0) / 4);
  });
  return {grad_g, grad_h, grad_table, grad_x};
}

// The same convolution and its first derivatives w.r.t. h and the table (no forces) with
// the pairs ordered by grid interval instead of by first atom (interval_order): within a
// block of atoms, the pairs of one interval k come together, so a chunk of interval k's
// four table rows (and, backward, of their four gradient rows) stays in registers over the
// run instead of being read (and updated) per pair: per pair and vector of features the
// backward pass then reads g_a, g_b, h_a, h_b and updates dL/dh_a, dL/dh_b, where the
// pass in first-atom order also reads four table rows and updates four gradient rows. QM9
// batch of 100 (13,809 pairs, 128 features), one thread, CPU time: backward 0.308 against
// 0.459 ms, forward 0.198 against 0.215 ms alone; inside 128/6 training steps (profiled)
// 0.46 against 0.62-0.70 ms and 0.26-0.28 against 0.27-0.31 ms per block, about 1 ms less
// per step (the ordering itself: 0.035 ms per step)
template <typename T>
static inline int64_t run_interval(const T* x, int64_t p, int64_t intervals) {
  int64_t k;
  T t;
  clamped_interval(x[p], intervals, k, t);
  return k;
}

// every pair's interval and offset, computed once (the chunks of features reuse them)
template <typename T>
static void pair_intervals(const T* x, int64_t pairs, int64_t intervals,
                           std::vector<int64_t>& k, std::vector<T>& t) {
  k.resize(pairs);
  t.resize(pairs);
  for (int64_t p = 0; p < pairs; ++p) clamped_interval(x[p], intervals, k[p], t[p]);
}

// interval k's four coefficient rows for CH vectors of features from f0, in registers
template <typename T, int CH>
struct TableChunk {
  typedef typename vec_of<T>::type V;
  V c0[CH], c1[CH], c2[CH], c3[CH];
  TableChunk(const T* row, int64_t width, int64_t f0) {
    _Pragma("GCC unroll 4") for (int j = 0; j < CH; ++j) {
      const int64_t o = f0 + j * static_cast<int64_t>(sizeof(V) / sizeof(T));
      c0[j] = vload(row + o);
      c1[j] = vload(row + width + o);
      c2[j] = vload(row + 2 * width + o);
      c3[j] = vload(row + 3 * width + o);
    }
  }
  V filter(int j, V t) const { return c0[j] + t * (c1[j] + t * (c2[j] + t * c3[j])); }
};

// features per pass over the pairs: a pass reads (and backward updates) a quarter megabyte
// of a 250-interval table, which then stays in L2 beside its atom block's rows; a 128/6 QM9
// training step ran 31.5 ms in two passes of 64 features against 32.7 in one (medians of 4
// alternations, one thread, CPU time)
constexpr int64_t FEATURE_BLOCK = 64;

// the pairs' runs of one interval (interval_order makes them long), for each block of
// FEATURE_BLOCK features of the first `full` (whole chunks of C): calls
// run(p0, p1, k, f0, f1, last) with t_p in ts, `last` on the block that ends at `full`
template <typename T, typename Run>
static void interval_runs(const T* x, int64_t pairs, int64_t intervals, int64_t full,
                          int64_t C, std::vector<T>& ts, Run run) {
  std::vector<int64_t> ks;
  pair_intervals(x, pairs, intervals, ks, ts);
  const int64_t block = std::max(C, FEATURE_BLOCK / C * C);
  for (int64_t f0 = 0; f0 < full || f0 == 0; f0 += block) {
    const int64_t f1 = std::min(full, f0 + block);
    for (int64_t p0 = 0, p1; p0 < pairs; p0 = p1) {
      for (p1 = p0 + 1; p1 < pairs && ks[p1] == ks[p0];) ++p1;
      run(p0, p1, ks[p0], f0, f1, f1 >= full);
    }
  }
}

// vectors of features per chunk: forward keeps 4 table rows of CH vectors in registers,
// backward also their 4 gradient rows (32 registers: 4 and 2 measured fastest)
constexpr int FORWARD_CHUNK = 4, BACKWARD_CHUNK = 2;

template <typename T>
static void tabulated_rows_by_interval(const T* __restrict h, const T* __restrict table,
                                       const T* x, const int64_t* a, const int64_t* b,
                                       T* __restrict y, int64_t pairs, int64_t width,
                                       int64_t intervals) {
  typedef typename vec_of<T>::type V;
  constexpr int64_t L = ATOMLENS_VECTOR_BYTES / sizeof(T), C = FORWARD_CHUNK * L;
  const int64_t full = width / C * C;
  std::vector<T> ts;
  interval_runs(x, pairs, intervals, full, C, ts,
                [&](int64_t p0, int64_t p1, int64_t k, int64_t b0, int64_t b1, bool last) {
    for (int64_t f0 = b0; f0 < b1; f0 += C) {
      const TableChunk<T, FORWARD_CHUNK> c(table + 4 * k * width, width, f0);
      for (int64_t p = p0; p < p1; ++p) {
        if (beyond(x[p], intervals)) continue;
        const V tv = V{} + ts[p];
        const T* ha = h + a[p] * width + f0;
        const T* hb = h + b[p] * width + f0;
        T* ya = y + a[p] * width + f0;
        T* yb = y + b[p] * width + f0;
        _Pragma("GCC unroll 4") for (int j = 0; j < FORWARD_CHUNK; ++j) {
          const int64_t o = j * L;
          const V filter = c.filter(j, tv);
          vstore(ya + o, vload(ya + o) + vload(hb + o) * filter);
          vstore(yb + o, vload(yb + o) + vload(ha + o) * filter);
        }
      }
    }
    for (int64_t p = p0; last && full < width && p < p1; ++p)
      if (!beyond(x[p], intervals))
        tabulated_pair<T>(h, table, x, a, b, y, p, full, width, width, intervals);
  });
}

// reads n values in order, a vector per cache line and nothing else: the caches then hold
// an array that a pass reads in scattered order, fetched at the memory's streaming speed
template <typename T>
static void touch_lines(const T* p, int64_t n) {
  typedef typename vec_of<T>::type V;
  constexpr int64_t LINE = 64 / sizeof(T);
  V sum0{}, sum1{};
  for (int64_t i = 0; i + 2 * LINE <= n; i += 2 * LINE) {
    sum0 += vload(p + i);
    sum1 += vload(p + i + LINE);
  }
  sum0 += sum1;
  volatile T sink = sum0[0];  // the loads stay (each line's first value at least)
  (void)sink;
}

template <typename T, bool NEED_H, bool NEED_TABLE>
static void tabulated_backward_by_interval(const T* __restrict g, const T* __restrict h,
                                           const T* __restrict table, const T* x,
                                           const int64_t* a, const int64_t* b,
                                           T* __restrict grad_h, T* __restrict grad_table,
                                           int64_t pairs, int64_t width, int64_t intervals,
                                           int64_t rows) {
  typedef typename vec_of<T>::type V;
  constexpr int64_t L = ATOMLENS_VECTOR_BYTES / sizeof(T), C = BACKWARD_CHUNK * L;
  const int64_t full = width / C * C;
  std::vector<T> ts;
  // h (saved by the forward pass) and the table are rarely still cached when the backward
  // pass comes; read in order first, they arrive faster than scattered over the runs: 3.03
  // against 3.27 ms per 128/6 QM9 training step for the six blocks (one thread, CPU time,
  // alternated, 2026-12-05). The forward pass is better without (its h is fresh)
  if (NEED_TABLE) touch_lines(h, rows * width);
  if (NEED_H) touch_lines(table, 4 * intervals * width);
  interval_runs(x, pairs, intervals, full, C, ts,
                [&](int64_t p0, int64_t p1, int64_t k, int64_t b0, int64_t b1, bool last) {
    T* r = grad_table + (NEED_TABLE ? 4 * k * width : 0);
    for (int64_t f0 = b0; f0 < b1; f0 += C) {
      const TableChunk<T, BACKWARD_CHUNK> c(table + 4 * k * width, width, f0);
      V r0[BACKWARD_CHUNK], r1[BACKWARD_CHUNK], r2[BACKWARD_CHUNK], r3[BACKWARD_CHUNK];
      _Pragma("GCC unroll 4") for (int j = 0; j < BACKWARD_CHUNK; ++j) r0[j] = r1[j] = r2[j] =
          r3[j] = V{};
      for (int64_t p = p0; p < p1; ++p) {
        if (beyond(x[p], intervals)) continue;
        const V tv = V{} + ts[p], tt = tv * tv, ttt = tt * tv;
        const T* ga = g + a[p] * width + f0;
        const T* gb = g + b[p] * width + f0;
        const T* ha = h + a[p] * width + f0;
        const T* hb = h + b[p] * width + f0;
        T* gha = grad_h + (NEED_H ? a[p] * width + f0 : 0);
        T* ghb = grad_h + (NEED_H ? b[p] * width + f0 : 0);
        _Pragma("GCC unroll 4") for (int j = 0; j < BACKWARD_CHUNK; ++j) {
          const int64_t o = j * L;
          const V gav = vload(ga + o), gbv = vload(gb + o);
          if (NEED_H) {
            const V filter = c.filter(j, tv);
            vstore(gha + o, vload(gha + o) + gbv * filter);
            vstore(ghb + o, vload(ghb + o) + gav * filter);
          }
          if (NEED_TABLE) {
            const V u = gav * vload(hb + o) + gbv * vload(ha + o);
            r0[j] += u;
            r1[j] += tv * u;
            r2[j] += tt * u;
            r3[j] += ttt * u;
          }
        }
      }
      if (NEED_TABLE)
        _Pragma("GCC unroll 4") for (int j = 0; j < BACKWARD_CHUNK; ++j) {
          const int64_t o = f0 + j * L;
          vstore(r + o, vload(r + o) + r0[j]);
          vstore(r + width + o, vload(r + width + o) + r1[j]);
          vstore(r + 2 * width + o, vload(r + 2 * width + o) + r2[j]);
          vstore(r + 3 * width + o, vload(r + 3 * width + o) + r3[j]);
        }
    }
    for (int64_t p = p0; last && p < p1 && full < width; ++p)  // past the chunks
      if (!beyond(x[p], intervals))
        tabulated_backward_pair<T, NEED_H, NEED_TABLE, false>(g, h, table, a, b, grad_h,
                                                            grad_table, p, k, ts[p], full,
                                                            width, width);
  });
}

// the pairs (x, a, b) reordered for those kernels: by block of 2^shift atoms (of the first
// atom a; a block's rows of h, g and dL/dh stay in cache), then by grid interval, each run
// in its given order. Both atoms of every pair must lie in [0, atoms). A counting sort
// (stable, O(pairs + keys)) where the keys, blocks x intervals, are at most 4 per pair plus
// 2^16; else (a fine grid beside a few pairs) a stable sort by key
std::vector<torch::Tensor> interval_order(torch::Tensor x, torch::Tensor a, torch::Tensor b,
                                          int64_t intervals, int64_t shift, int64_t atoms) {
  TORCH_CHECK(x.dim() == 1 && a.dim() == 1 && a.numel() == x.numel() && b.numel() == x.numel(),
              "interval order: shapes");
  TORCH_CHECK(a.scalar_type() == torch::kLong && b.scalar_type() == torch::kLong,
              "interval order: int64");
  TORCH_CHECK(intervals >= 1 && intervals < (int64_t(1) << 31) && shift >= 0 && shift < 62 &&
                  atoms >= 0,
              "interval order: arguments");
  auto xc = x.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const int64_t pairs = xc.size(0);
  auto xs = torch::empty_like(xc), as = torch::empty_like(ac), bs = torch::empty_like(bc);
  if (pairs == 0) return {xs, as, bs};
  const int64_t* ia = ac.data_ptr<int64_t>();
  const int64_t* ib = bc.data_ptr<int64_t>();
  int64_t top = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ia[p] >= 0 && ia[p] < atoms && ib[p] >= 0 && ib[p] < atoms,
                "interval order: pair ", p, " has atom ", ia[p], " or ", ib[p],
                " outside [0, ", atoms, ")");
    top = std::max(top, ia[p] >> shift);
  }
  // atoms < 2^63 and intervals < 2^31: (top + 1) * intervals < 2^(63 - shift + 31) fits
  const int64_t keys = (top + 1) * intervals;
  std::vector<int64_t> key(pairs), order(pairs);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "interval_order", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    for (int64_t p = 0; p < pairs; ++p)
      key[p] = (ia[p] >> shift) * intervals + run_interval(px, p, intervals);
  });
  if (keys <= 4 * pairs + (int64_t(1) << 16)) {
    std::vector<int64_t> start(keys + 1, 0);
    for (int64_t p = 0; p < pairs; ++p) ++start[key[p] + 1];
    for (int64_t q = 1; q <= keys; ++q) start[q] += start[q - 1];
    for (int64_t p = 0; p < pairs; ++p) order[start[key[p]]++] = p;
  } else {
    for (int64_t p = 0; p < pairs; ++p) order[p] = p;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t u, int64_t v) { return key[u] < key[v]; });
  }
  int64_t* oa = as.data_ptr<int64_t>();
  int64_t* ob = bs.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "interval_order", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    scalar_t* ox = xs.data_ptr<scalar_t>();
    for (int64_t q = 0; q < pairs; ++q) {
      ox[q] = px[order[q]];
      oa[q] = ia[order[q]];
      ob[q] = ib[order[q]];
    }
  });
  return {xs, as, bs};
}

// the convolution in first-atom order, or (by_interval) in interval order
static torch::Tensor convolution(torch::Tensor h, torch::Tensor table, torch::Tensor x,
                                 torch::Tensor a, torch::Tensor b, bool by_interval) {
  check_tabulated(h, table, x, a, b);
  auto hc = h.contiguous(), tc = table.contiguous(), xc = x.contiguous();
  auto ac = a.contiguous(), bc = b.contiguous();
  auto y = torch::zeros_like(hc);
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "tabulated_cfconv", [&] {
    auto rows = by_interval ? tabulated_rows_by_interval<scalar_t> : tabulated_rows<scalar_t>;
    rows(hc.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
         ac.data_ptr<int64_t>(), bc.data_ptr<int64_t>(), y.data_ptr<scalar_t>(), xc.size(0),
         hc.size(1), tc.size(0) / 4);
  });
  return y;
}

torch::Tensor tabulated_cfconv(torch::Tensor h, torch::Tensor table, torch::Tensor x,
                               torch::Tensor a, torch::Tensor b) {
  return convolution(h, table, x, a, b, false);
}

torch::Tensor tabulated_cfconv_by_interval(torch::Tensor h, torch::Tensor table,
                                           torch::Tensor x, torch::Tensor a, torch::Tensor b) {
  return convolution(h, table, x, a, b, true);
}

// whether the by-interval kernels are this build's fast path (AVX-512's 32 registers)
bool interval_kernels() { return RUNS; }

template <typename T, bool NH, bool NT>
static void backward_x(bool need_x, bool by_interval, const T* g, const T* h, const T* table,
                       const T* x, const int64_t* a, const int64_t* b, T* gh, T* gt, T* gx,
                       int64_t pairs, int64_t width, int64_t intervals, int64_t rows) {
  if (by_interval)  // no dL/dx there
    tabulated_backward_by_interval<T, NH, NT>(g, h, table, x, a, b, gh, gt, pairs, width,
                                              intervals, rows);
  else if (need_x)
    tabulated_backward_rows<T, NH, NT, true>(g, h, table, x, a, b, gh, gt, gx, pairs, width,
                                             intervals);
  else
    tabulated_backward_rows<T, NH, NT, false>(g, h, table, x, a, b, gh, gt, gx, pairs, width,
                                              intervals);
}

// the first derivatives in one pass over the pairs, in first-atom order or (by_interval,
// without dL/dx) in interval order
static std::vector<torch::Tensor> first_derivatives(torch::Tensor grad, torch::Tensor h,
                                                    torch::Tensor table, torch::Tensor x,
                                                    torch::Tensor a, torch::Tensor b,
                                                    bool need_h, bool need_table, bool need_x,
                                                    bool by_interval) {
  TORCH_CHECK(!(by_interval && need_x), "tabulated cfconv: no dL/dx in interval order");
  check_tabulated(h, table, x, a, b);
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == h.scalar_type(),
              "tabulated cfconv: gradient shape");
  auto gc = grad.contiguous(), hc = h.contiguous(), tc = table.contiguous();
  auto xc = x.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  auto grad_h = need_h ? torch::zeros_like(hc) : torch::Tensor();
  auto grad_table = need_table ? torch::zeros_like(tc) : torch::Tensor();
  auto grad_x = need_x ? torch::empty_like(xc) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "tabulated_cfconv_backward", [&] {
    using T = scalar_t;
    T* gh = need_h ? grad_h.data_ptr<T>() : nullptr;
    T* gt = need_table ? grad_table.data_ptr<T>() : nullptr;
    T* gx = need_x ? grad_x.data_ptr<T>() : nullptr;
    const T* args[4] = {gc.data_ptr<T>(), hc.data_ptr<T>(), tc.data_ptr<T>(), xc.data_ptr<T>()};
    const int64_t* ia = ac.data_ptr<int64_t>();
    const int64_t* ib = bc.data_ptr<int64_t>();
    const int64_t pairs = xc.size(0), width = hc.size(1), intervals = tc.size(0) / 4;
    const int64_t rows = hc.size(0);
    const bool n_x = need_x, by = by_interval;
    if (need_h && need_table)
      backward_x<T, true, true>(n_x, by, args[0], args[1], args[2], args[3], ia, ib, gh, gt, gx,
                                pairs, width, intervals, rows);
    else if (need_h)
      backward_x<T, true, false>(n_x, by, args[0], args[1], args[2], args[3], ia, ib, gh, gt, gx,
                                 pairs, width, intervals, rows);
    else if (need_table)
      backward_x<T, false, true>(n_x, by, args[0], args[1], args[2], args[3], ia, ib, gh, gt, gx,
                                 pairs, width, intervals, rows);
    else
      backward_x<T, false, false>(n_x, by, args[0], args[1], args[2], args[3], ia, ib, gh, gt,
                                  gx, pairs, width, intervals, rows);
  });
  return {grad_h, grad_table, grad_x};
}

std::vector<torch::Tensor> tabulated_cfconv_backward(torch::Tensor grad, torch::Tensor h,
                                                     torch::Tensor table, torch::Tensor x,
                                                     torch::Tensor a, torch::Tensor b,
                                                     bool need_h, bool need_table,
                                                     bool need_x) {
  return first_derivatives(grad, h, table, x, a, b, need_h, need_table, need_x, false);
}

std::vector<torch::Tensor> tabulated_cfconv_by_interval_backward(
    torch::Tensor grad, torch::Tensor h, torch::Tensor table, torch::Tensor x, torch::Tensor a,
    torch::Tensor b, bool need_h, bool need_table) {
  auto grads = first_derivatives(grad, h, table, x, a, b, need_h, need_table, false, true);
  return {grads[0], grads[1]};
}

// the shifted softplus ssp(v) = ln(1 + e^v) - ln 2 = max(v, 0) + log1p(e^-|v|) - ln 2 and its
// derivative sigmoid(v), float32, in one pass each. exp and log1p are written here as
// branch-free polynomials so that the compiler vectorizes the loop (PyTorch's softplus and
// the subtraction of ln 2 were two passes at ~1.2 ns per element on this project's CPU).
// e^-a, a >= 0: a = k ln2 - r, |r| <= ln2/2 (Cody-Waite: ln2 in two parts), e^r by its
// Taylor series to r^7 (relative error < 1e-8), 2^-k from the exponent bits; beyond a = 87
// (e^-87 = 1.6e-38, float32's normal numbers end at 1.2e-38) the result is 0
template <typename F>
static inline F exp_taylor(F r) {  // e^r, |r| <= ln2/2, float or a vector of floats
  F p = F{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

static inline float exp_neg(float a) {
  const bool under = !(a <= 87.0f);  // NaN too: k stays in range (the caller keeps NaN)
  a = under ? 87.0f : a;
  const int32_t k = static_cast<int32_t>(a * 1.44269504088896341f + 0.5f);  // a >= 0: rounds
  const float kf = static_cast<float>(k);
  const float p = exp_taylor((kf * 0.693145751953125f - a) + kf * 1.428606765330187e-06f);
  // 2^-k, or 0.0f beyond 87: a mask on the bits, not a select on the result (GCC 12 left
  // the loop scalar with that select: "control flow in loop")
  const int32_t bits = ((127 - k) << 23) & (under ? 0 : -1);
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// log(1 + t), 0 <= t <= 1: u = 1 + t = 2^e m with m in [1/sqrt2, sqrt2), log m = 2 atanh(s),
// s = (m - 1)/(m + 1), |s| < 0.172, by its series to s^9 (error < 1e-9); the rounding of
// 1 + t is added back as (t - (u - 1))/u
static inline float log1p_unit(float t) {
  const float u = 1.0f + t;
  const float rounding = (t - (u - 1.0f)) / u;
  const bool upper = u > 1.41421356237309505f;
  const float f = (upper ? 0.5f * u : u) - 1.0f;
  const float s = f / (2.0f + f), s2 = s * s;
  float q = 2.0f / 9.0f;
  q = q * s2 + 2.0f / 7.0f;
  q = q * s2 + 2.0f / 5.0f;
  q = q * s2 + 2.0f / 3.0f;
  q = q * s2 + 2.0f;
  return (upper ? 0.693147180559945309f : 0.0f) + s * q + rounding;
}

// ssp(v) and sigmoid(v) from e = e^-|v|: sigmoid(v) = 1/(1 + e^-v) for v > 0, e^v/(1 + e^v)
// otherwise (the shifted softplus's loops and the filter tables' use these two only)
static inline float ssp_from(float v, float e) {
  return (v > 0.0f ? v : 0.0f) + (log1p_unit(e) - 0.693147180559945309f);
}

static inline float sigmoid_from(float v, float e) { return (v > 0.0f ? 1.0f : e) / (1.0f + e); }

// the shifted softplus's forward loop, written on vector registers (GCC vector extensions;
// GCC's own vectorizer gives up on this loop's selects for some forms of it): e^-|v| as
// exp_neg does, then log(1 + e) = e q(e) with q the degree-9 interpolant of log(1 + t)/t at
// the Chebyshev nodes of [0, 1] (error below 3e-9; no division and no range reduction).
// 1,856 x 128 values: 0.078 against 0.114 ms with exp_neg and log1p_unit (two divisions)
// in a loop GCC vectorized (one thread, CPU time)
typedef int32_t vint __attribute__((vector_size(ATOMLENS_VECTOR_BYTES)));

template <typename F>
static inline F log1p_poly(F t) {
  F q = F{} - 3.1760570085e-03f;
  q = q * t + 1.9542527214e-02f;
  q = q * t - 5.6373612738e-02f;
  q = q * t + 1.0543623785e-01f;
  q = q * t - 1.5269667068e-01f;
  q = q * t + 1.9663274255e-01f;
  q = q * t - 2.4951616262e-01f;
  q = q * t + 3.3329710499e-01f;
  q = q * t - 4.9999892648e-01f;
  q = q * t + 9.9999999466e-01f;
  return t * q;
}

static inline vfloat exp_neg_vec(vfloat a) {  // exp_neg, lane by lane
  const vint under = !(a <= 87.0f);
  a = under ? vfloat{} + 87.0f : a;
  const vint k = __builtin_convertvector(a * 1.44269504088896341f + 0.5f, vint);
  const vfloat kf = __builtin_convertvector(k, vfloat);
  const vfloat p =
      exp_taylor((kf * 0.693145751953125f - a) + kf * 1.428606765330187e-06f);
  const vint bits = ((127 - k) << 23) & ~under;
  return p * reinterpret_cast<const vfloat&>(bits);
}

static inline float ssp_poly(float v) {  // one value, as the vector loop computes it
  const float value =
      (v > 0.0f ? v : 0.0f) + (log1p_poly(exp_neg(std::fabs(v))) - 0.693147180559945309f);
  return v != v ? v : value;
}

static void ssp_rows(const float* __restrict x, float* __restrict y, int64_t n) {
  constexpr int64_t L = ATOMLENS_VECTOR_BYTES / sizeof(float);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vfloat v = vload(x + i);
    const vfloat a = v < 0.0f ? -v : v;
    const vfloat value =
        (v > 0.0f ? v : vfloat{}) + (log1p_poly(exp_neg_vec(a)) - 0.693147180559945309f);
    vstore(y + i, v != v ? v : value);  // NaN stays NaN
  }
  for (; i < n; ++i) y[i] = ssp_poly(x[i]);
}

// grad * sigmoid(v)
static void ssp_grad_rows(const float* __restrict grad, const float* __restrict x,
                          float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float value = grad[i] * sigmoid_from(v, exp_neg(std::fabs(v)));
    out[i] = v != v ? v : value;
  }
}

// out (cols x rows) = in^T for a row-major float32 (rows x cols) matrix: the input oneDNN's
// inner product needs for a weight gradient (grad^T, features x rows), which it otherwise
// copies with PyTorch's transpose. 16 x 16 tiles in registers where the processor has
// AVX-512 (unpack within 128-bit lanes, then a 4 x 4 transpose of the lanes), walked down
// column strips: each output row is then written in order. 1,792 x 128: 21 against 90 us.
// With sums (not null, zeroed): also the column sums of in (a layer's bias gradient, from
// the rows the transpose reads anyway), added up a strip's tiles in registers
#ifdef __AVX512F__
static inline void transpose_tile16(const float* in, int64_t ld_in, float* out, int64_t ld_out,
                                    __m512* sum) {
  __m512 r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(in + k * ld_in);
  if (sum) {
    for (int k = 0; k < 8; ++k) t[k] = _mm512_add_ps(r[k], r[k + 8]);
    for (int k = 0; k < 4; ++k) t[k] = _mm512_add_ps(t[k], t[k + 4]);
    *sum = _mm512_add_ps(*sum, _mm512_add_ps(_mm512_add_ps(t[0], t[2]),
                                             _mm512_add_ps(t[1], t[3])));
  }
  for (int k = 0; k < 8; ++k) {  // lane l of t[2k], t[2k+1]: rows 2k, 2k+1 interleaved
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // lane l of r[4k + c]: rows 4k..4k+3 of column 4l + c
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 2]), d = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // the lanes: column 4l + c gathers lane l of r[c + 4k]
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_ps(out + c * ld_out, _mm512_shuffle_f32x4(u0, u2, 0x88));
    _mm512_storeu_ps(out + (4 + c) * ld_out, _mm512_shuffle_f32x4(u0, u2, 0xDD));
    _mm512_storeu_ps(out + (8 + c) * ld_out, _mm512_shuffle_f32x4(u1, u3, 0x88));
    _mm512_storeu_ps(out + (12 + c) * ld_out, _mm512_shuffle_f32x4(u1, u3, 0xDD));
  }
}
#endif

static void transpose_matrix(const float* __restrict in, float* __restrict out, int64_t rows,
                             int64_t cols, float* __restrict sums) {
  int64_t full_rows = 0, full_cols = 0;  // the part done in 16 x 16 register tiles
#ifdef __AVX512F__
  full_rows = rows / 16 * 16;
  full_cols = cols / 16 * 16;
  for (int64_t j = 0; j < full_cols; j += 16) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < full_rows; i += 16)
      transpose_tile16(in + i * cols + j, cols, out + j * rows + i, rows, sums ? &sum : nullptr);
    if (sums) _mm512_storeu_ps(sums + j, sum);
  }
#endif
  const int64_t B = 16;  // the rest in 16 x 16 blocks of plain loops
  for (int64_t j0 = 0; j0 < cols; j0 += B)
    for (int64_t i0 = 0; i0 < rows; i0 += B) {
      if (i0 + B <= full_rows && j0 + B <= full_cols) continue;
      const int64_t i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) {
          out[j * rows + i] = in[i * cols + j];
          if (sums) sums[j] += in[i * cols + j];
        }
    }
}

// {x^T, the column sums of x if sums else an undefined tensor}
std::vector<torch::Tensor> transpose(torch::Tensor x, bool sums) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "transpose: 2-D float32");
  auto xc = x.contiguous();
  auto out = torch::empty({xc.size(1), xc.size(0)}, xc.options());
  auto column_sums = sums ? torch::zeros({xc.size(1)}, xc.options()) : torch::Tensor();
  transpose_matrix(xc.data_ptr<float>(), out.data_ptr<float>(), xc.size(0), xc.size(1),
                   sums ? column_sums.data_ptr<float>() : nullptr);
  return {out, column_sums};
}

torch::Tensor shifted_softplus(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "shifted_softplus: float32");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  ssp_rows(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}

torch::Tensor shifted_softplus_backward(torch::Tensor grad, torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && grad.scalar_type() == torch::kFloat,
              "shifted_softplus_backward: float32");
  TORCH_CHECK(grad.sizes() == x.sizes(), "shifted_softplus_backward: shapes");
  auto gc = grad.contiguous(), xc = x.contiguous();
  auto out = torch::empty_like(xc);
  ssp_grad_rows(gc.data_ptr<float>(), xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel());
  return out;
}

// SchNet's filter tables (atomlens.nn.filter_tables): the filter networks of all T
// interaction blocks on one grid of m nodes, as values and r-derivatives (2m rows), between
// the products, which oneDNN computes. One pass each instead of ~15 PyTorch operators per
// block (and twice as many in the backward pass) on (m, F) arrays.
//
// hidden layer: a (2m, T F) first-layer products of [e(r); de/dr] (no bias), b1 (T F):
//   h = ssp(a + b1), dh = sigmoid(a + b1) * da, written block by block as (T, 2m, F)
torch::Tensor filter_hidden(torch::Tensor a, torch::Tensor b1, int64_t blocks) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat && b1.scalar_type() == torch::kFloat,
              "filter_hidden: float32");
  TORCH_CHECK(a.dim() == 2 && a.size(0) % 2 == 0 && blocks > 0 && a.size(1) % blocks == 0 &&
                  b1.numel() == a.size(1),
              "filter_hidden: shapes");
  auto ac = a.contiguous(), bc = b1.contiguous();
  const int64_t rows = ac.size(0), m = rows / 2, width = ac.size(1), f_out = width / blocks;
  auto h = torch::empty({blocks, rows, f_out}, ac.options());
  const float* pa = ac.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* ph = h.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      const float* av = pa + r * width + k * f_out;
      const float* ad = pa + (m + r) * width + k * f_out;
      const float* bk = pb + k * f_out;
      float* hv = ph + (k * rows + r) * f_out;
      float* hd = ph + (k * rows + m + r) * f_out;
#pragma omp simd
      for (int64_t f = 0; f < f_out; ++f) {
        const float v = av[f] + bk[f];
        const float e = exp_neg(std::fabs(v));
        const float value = ssp_from(v, e);
        hv[f] = v != v ? v : value;  // NaN stays NaN
        hd[f] = v != v ? v : sigmoid_from(v, e) * ad[f];
      }
    }
  }
  return h;
}

// its transpose: grad, T blocks' (2m, F) gradients of (h, dh) -> the gradient of a, (2m, T F)
torch::Tensor filter_hidden_backward(std::vector<torch::Tensor> grad, torch::Tensor a,
                                     torch::Tensor b1) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat && b1.scalar_type() == torch::kFloat,
              "filter_hidden_backward: float32");
  auto ac = a.contiguous(), bc = b1.contiguous();
  const int64_t blocks = static_cast<int64_t>(grad.size()), rows = ac.size(0), m = rows / 2,
                width = ac.size(1);
  TORCH_CHECK(blocks > 0 && width % blocks == 0 && bc.numel() == width,
              "filter_hidden_backward: shapes");
  const int64_t f_out = width / blocks;
  std::vector<torch::Tensor> gc;
  for (auto& g : grad) {
    TORCH_CHECK(g.scalar_type() == torch::kFloat && g.dim() == 2 && g.size(0) == rows &&
                    g.size(1) == f_out,
                "filter_hidden_backward: gradient shapes");
    gc.push_back(g.contiguous());
  }
  auto out = torch::empty_like(ac);
  const float* pa = ac.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      const float* av = pa + r * width + k * f_out;
      const float* ad = pa + (m + r) * width + k * f_out;
      const float* bk = pb + k * f_out;
      const float* gv = gc[k].data_ptr<float>() + r * f_out;
      const float* gd = gc[k].data_ptr<float>() + (m + r) * f_out;
      float* ov = po + r * width + k * f_out;
      float* od = po + (m + r) * width + k * f_out;
#pragma omp simd
      for (int64_t f = 0; f < f_out; ++f) {
        const float v = av[f] + bk[f];
        const float sig = sigmoid_from(v, exp_neg(std::fabs(v)));
        // d ssp/dv = sigmoid; d(sigmoid * da)/dv = sigmoid (1 - sigmoid) da
        const float value = gv[f] * sig + gd[f] * ad[f] * (sig * (1.0f - sig));
        ov[f] = v != v ? v : value;
        od[f] = v != v ? v : gd[f] * sig;
      }
    }
  }
  return out;
}

// cubic Hermite coefficients: w, T blocks' (2m, F) second-layer products of [h; dh] (no
// bias), b2 (T, F), cutoff f and df/dr on the nodes (m), node spacing s:
//   v_i = (w_i + b2) f_i,   s_i = (dw_i f_i + (w_i + b2) df_i) s      (values, slopes)
//   table[k, i] = [v_i, s_i, 3 (v_i+1 - v_i) - 2 s_i - s_i+1, 2 (v_i - v_i+1) + s_i + s_i+1]
std::vector<torch::Tensor> filter_table_coefficients(std::vector<torch::Tensor> w,
                                                     torch::Tensor b2, torch::Tensor fc,
                                                     torch::Tensor dfc, double spacing) {
  TORCH_CHECK(!w.empty() && b2.scalar_type() == torch::kFloat &&
                  fc.scalar_type() == torch::kFloat && dfc.scalar_type() == torch::kFloat,
              "filter_table_coefficients: float32");
  auto bc = b2.contiguous(), fcc = fc.contiguous(), dfcc = dfc.contiguous();
  const int64_t blocks = static_cast<int64_t>(w.size()), rows = w[0].size(0), m = rows / 2,
                width = w[0].size(1), n = m - 1;
  std::vector<torch::Tensor> wc;
  for (auto& t : w) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 2 && t.size(0) == rows &&
                    t.size(1) == width,
                "filter_table_coefficients: product shapes");
    wc.push_back(t.contiguous());
  }
  TORCH_CHECK(rows % 2 == 0 && m >= 2 && bc.numel() == blocks * width && fcc.numel() == m &&
                  dfcc.numel() == m,
              "filter_table_coefficients: shapes");
  std::vector<torch::Tensor> tables;
  for (int64_t k = 0; k < blocks; ++k) tables.push_back(torch::empty({n, 4, width}, bc.options()));
  const float* pb = bc.data_ptr<float>();
  const float* pf = fcc.data_ptr<float>();
  const float* pdf = dfcc.data_ptr<float>();
  const float sp = static_cast<float>(spacing);
  for (int64_t k = 0; k < blocks; ++k) {
    const float* bk = pb + k * width;
    float* pt = tables[k].data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const float* w0 = wc[k].data_ptr<float>() + i * width;
      const float* w1 = w0 + width;
      const float* d0 = wc[k].data_ptr<float>() + (m + i) * width;
      const float* d1 = d0 + width;
      const float f0 = pf[i], f1 = pf[i + 1], df0 = pdf[i], df1 = pdf[i + 1];
      float* t = pt + i * 4 * width;
#pragma omp simd
      for (int64_t f = 0; f < width; ++f) {
        const float u0 = w0[f] + bk[f], u1 = w1[f] + bk[f];
        const float v0 = u0 * f0, v1 = u1 * f1;
        const float s0 = (d0[f] * f0 + u0 * df0) * sp, s1 = (d1[f] * f1 + u1 * df1) * sp;
        t[f] = v0;
        t[width + f] = s0;
        t[2 * width + f] = 3.0f * (v1 - v0) - 2.0f * s0 - s1;
        t[3 * width + f] = 2.0f * (v0 - v1) + s0 + s1;
      }
    }
  }
  return tables;
}

// its transpose: the T tables' gradients (m - 1, 4, F) -> the gradient of w, (T, 2m, F)
torch::Tensor filter_table_coefficients_backward(std::vector<torch::Tensor> grad,
                                                 torch::Tensor fc, torch::Tensor dfc,
                                                 double spacing) {
  TORCH_CHECK(!grad.empty() && fc.scalar_type() == torch::kFloat &&
                  dfc.scalar_type() == torch::kFloat,
              "filter_table_coefficients_backward: float32");
  auto fcc = fc.contiguous(), dfcc = dfc.contiguous();
  const int64_t blocks = static_cast<int64_t>(grad.size()), n = grad[0].size(0), m = n + 1,
                width = grad[0].size(2), rows = 2 * m;
  std::vector<torch::Tensor> gc;
  for (auto& g : grad) {
    TORCH_CHECK(g.scalar_type() == torch::kFloat && g.dim() == 3 && g.size(0) == n &&
                    g.size(1) == 4 && g.size(2) == width,
                "filter_table_coefficients_backward: gradient shapes");
    gc.push_back(g.contiguous());
  }
  TORCH_CHECK(fcc.numel() == m && dfcc.numel() == m, "filter_table_coefficients_backward: nodes");
  auto out = torch::empty({blocks, rows, width}, fcc.options());
  const float* pf = fcc.data_ptr<float>();
  const float* pdf = dfcc.data_ptr<float>();
  const float sp = static_cast<float>(spacing);
  float* po = out.data_ptr<float>();
  const std::vector<float> zeros(4 * width, 0.0f);  // the missing interval of the end nodes
  for (int64_t k = 0; k < blocks; ++k) {
    for (int64_t i = 0; i < m; ++i) {
      // node i is the left end of interval i (i < n) and the right end of interval i - 1
      const float* pg = gc[k].data_ptr<float>();
      const float* gl = i < n ? pg + i * 4 * width : zeros.data();
      const float* gr = i > 0 ? pg + (i - 1) * 4 * width : zeros.data();
      const float fi = pf[i], dfi = pdf[i];
      float* ow = po + (k * rows + i) * width;
      float* od = po + (k * rows + m + i) * width;
#pragma omp simd
      for (int64_t f = 0; f < width; ++f) {
        const float gv = (gl[f] - 3.0f * gl[2 * width + f] + 2.0f * gl[3 * width + f]) +
                         (3.0f * gr[2 * width + f] - 2.0f * gr[3 * width + f]);
        const float gs = ((gl[width + f] - 2.0f * gl[2 * width + f] + gl[3 * width + f]) +
                          (gr[3 * width + f] - gr[2 * width + f])) *
                         sp;
        ow[f] = gv * fi + gs * dfi;
        od[f] = gs * fi;
      }
    }
  }
  return out;
}

// the two loops as the CPU kernels of the operators atomlens::tabulated_cfconv(_backward)
// (schemas defined from Python): Inductor's C++ wrapper calls them through the dispatcher
// without entering Python; a gradient not asked for is an empty tensor
static torch::Tensor tabulated_cfconv_kernel(const torch::Tensor& h, const torch::Tensor& table,
                                             const torch::Tensor& x, const torch::Tensor& a,
                                             const torch::Tensor& b) {
  return tabulated_cfconv(h, table, x, a, b);
}

static std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> tabulated_cfconv_backward_kernel(
    const torch::Tensor& grad, const torch::Tensor& h, const torch::Tensor& table,
    const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b, bool need_h,
    bool need_table, bool need_x) {
  auto grads = tabulated_cfconv_backward(grad, h, table, x, a, b, need_h, need_table, need_x);
  for (auto& g : grads)
    if (!g.defined()) g = torch::empty({0}, h.options());
  return {grads[0], grads[1], grads[2]};
}

static int64_t bucket(int64_t n) {  // atomlens.nn.linear._bucket
  if (n <= 0) return n;
  const int64_t bits = 64 - __builtin_clzll(static_cast<unsigned long long>(n));
  const int64_t step = int64_t(1) << std::max<int64_t>(4, bits - 7);
  return (n + step - 1) / step * step;
}

// oneDNN's float32 inner product through the dispatcher (no oneDNN headers needed)
static torch::Tensor onednn_call(const torch::Tensor& x, const torch::Tensor& weight,
                                 const torch::Tensor& bias) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, weight, bias.defined() ? c10::IValue(bias) : c10::IValue(),
                                 c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                                 c10::IValue(std::string(""))};
  op.callBoxed(stack);
  return stack[0].toTensor();
}

// a weight for oneDNN: read as it is if dense (a transposed view too), else a copy
static torch::Tensor dense_layout(const torch::Tensor& t) {
  return t.is_contiguous() || t.t().is_contiguous() ? t : t.contiguous();
}

// an input for oneDNN: row-major (a transposed view by the tiled transpose)
static torch::Tensor row_major(const torch::Tensor& t) {
  if (t.is_contiguous()) return t;
  if (t.scalar_type() == torch::kFloat && t.t().is_contiguous()) return transpose(t.t(), false)[0];
  return t.contiguous();
}

static torch::Tensor zero_padded(const torch::Tensor& t, int64_t rows) {
  auto out = torch::empty({rows, t.size(1)}, t.options());
  out.narrow(0, 0, t.size(0)).copy_(t);
  out.narrow(0, t.size(0), rows - t.size(0)).zero_();
  return out;
}

// oneDNN's float32 inner product (atomlens.nn.linear) as the operator atomlens::linear:
// torch.compile keeps it as one call (Inductor's own lowering of mkldnn::_linear_pointwise
// needs frozen weights). Rows padded with zeros to atomlens.nn.linear's bucket sizes (few
// kernels for oneDNN); a transposed weight is read in place, a transposed input copied by
// the operator itself (PyTorch's copy)
static torch::Tensor linear_kernel(const torch::Tensor& x, const torch::Tensor& weight,
                                   const std::optional<torch::Tensor>& bias) {
  const int64_t m = x.size(0), rows = bucket(m);
  auto y = onednn_call(dense_layout(rows != m ? zero_padded(x, rows) : x), dense_layout(weight),
                       bias.has_value() ? *bias : torch::Tensor());
  return rows != m ? y.narrow(0, 0, m) : y;
}

// atomlens.nn.linear's oneDNN layer as a C++ autograd Function (eager code): the same
// products, paddings and transposes as its Python Function (_OneDNNLinear, which compiled
// code and the tests of its hooks keep), without Python's cost per call. Six chained layers
// of 128 rows cost 44 us each beyond their products through the Python Function, 12 us
// through PyTorch's C++ F.linear (one thread, CPU time, 2026-12-05).
//
// Per layer (its weight's storage, shape, strides) and product: the rows of its last call;
// the rows a call runs with: m where the bucket size is m or this layer's previous call of
// this kind had m rows too, else bucket(m) (as atomlens.nn.linear._padded_rows)
static std::mutex g_rows_mutex;
static std::map<std::tuple<int, const void*, int64_t, int64_t, int64_t, int64_t>, int64_t>
    g_last_rows;

static int64_t padded_rows(int kind, const torch::Tensor& weight, int64_t m) {
  const int64_t rows = bucket(m);
  if (rows == m) return rows;
  const auto key = std::make_tuple(kind, weight.data_ptr(), weight.size(0), weight.size(1),
                                   weight.stride(0), weight.stride(1));
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  auto found = g_last_rows.find(key);
  const bool repeated = found != g_last_rows.end() && found->second == m;
  if (g_last_rows.size() > 4096) g_last_rows.clear();  // models come and go
  g_last_rows[key] = m;
  return repeated ? m : rows;
}

struct OneDNNLinearFunction : public torch::autograd::Function<OneDNNLinearFunction> {
  // without a bias, `bias` is an empty tensor (every argument the Function tracks must be
  // a defined tensor) and has_bias false
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x,
                               torch::Tensor weight, torch::Tensor bias, bool has_bias) {
    const int64_t m = x.size(0), rows = padded_rows(0, weight, m);
    auto y = onednn_call(rows != m ? zero_padded(x, rows) : row_major(x),
                         dense_layout(weight), has_bias ? bias : torch::Tensor());
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = has_bias;
    return rows != m ? y.narrow(0, 0, m) : y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& weight = saved[1];
    const torch::Tensor& grad = grads[0];
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    torch::Tensor grad_x, grad_weight, grad_bias;
    if (!at::GradMode::is_enabled() && grad.has_storage() && grad.dim() == 2 &&
        grad.scalar_type() == torch::kFloat) {
      // both products on oneDNN, rows padded as the forward pass's; the weight gradient's
      // input grad^T from the tiled transpose, which adds up the bias gradient on the way
      const int64_t m = grad.size(0), rows = padded_rows(1, weight, m);
      const auto g = rows != m ? zero_padded(grad, rows) : row_major(grad);
      if (need_x) {
        grad_x = onednn_call(g, dense_layout(weight.t()), torch::Tensor());
        if (rows != m) grad_x = grad_x.narrow(0, 0, m);
      }
      if (need_weight) {
        auto both = transpose(g, need_bias);
        if (need_bias) grad_bias = both[1];
        const auto xx = rows != m ? zero_padded(x, rows) : x;
        grad_weight = onednn_call(both[0], dense_layout(xx.t()), torch::Tensor());
      } else if (need_bias) {  // the same sums as with the weight gradient, to the last bit
        grad_bias = transpose(g, true)[1];
      }
    } else {  // a graph for a second derivative, or batched gradients: PyTorch's products
      if (need_x) grad_x = at::matmul(grad, weight);
      if (need_weight) grad_weight = at::matmul(grad.t(), x);
    }
    if (need_bias && !grad_bias.defined()) grad_bias = grad.sum(0);
    return {grad_x, grad_weight, grad_bias, torch::Tensor()};
  }
};

torch::Tensor onednn_linear(torch::Tensor x, torch::Tensor weight,
                            std::optional<torch::Tensor> bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  auto empty = has_bias ? *bias : x.new_empty({0});
  pybind11::gil_scoped_release no_gil;  // other Python threads run during the products
  return OneDNNLinearFunction::apply(x, weight, empty, has_bias);
}

// forget every layer's last row count (the next call of each pads to the bucket size)
void forget_rows() {
  std::lock_guard<std::mutex> lock(g_rows_mutex);
  g_last_rows.clear();
}

// the shifted softplus and its derivative as operators (float32: other dtypes never reach
// them, see atomlens.nn.activations)
static torch::Tensor shifted_softplus_kernel(const torch::Tensor& x) {
  return shifted_softplus(x);
}

static torch::Tensor shifted_softplus_backward_kernel(const torch::Tensor& grad,
                                                      const torch::Tensor& x) {
  return shifted_softplus_backward(grad, x);
}

// a second build loaded beside the first (tests of the AVX2 paths on an AVX-512 machine)
// leaves the operators to the first: one CPU kernel per operator
#ifndef ATOMLENS_NO_OPERATORS
TORCH_LIBRARY_IMPL(atomlens, CPU, m) {
  m.impl("shifted_softplus", &shifted_softplus_kernel);
  m.impl("shifted_softplus_backward", &shifted_softplus_backward_kernel);
  m.impl("tabulated_cfconv", &tabulated_cfconv_kernel);
  m.impl("tabulated_cfconv_backward", &tabulated_cfconv_backward_kernel);
  m.impl("linear", &linear_kernel);
}
#endif
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


#: the compiler flags of every build. ``-fno-trapping-math`` (floating-point operations raise
#: no signals, which they never do here; results are unchanged) lets GCC turn the
#: shifted softplus's selects into vector blends: without it that loop stayed scalar, 2.1
#: instead of 0.13 ms for 1,818 x 128 values. ``-Wno-psabi``: no notes on how GCC passes
#: 64-byte vectors between functions (the kernels never pass them across a library boundary)
_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-Wno-psabi"]


def _build_target() -> tuple[str, list[str]]:
    """The build's name and the compiler flags for this processor.

    ``-march=native`` lets the compiler use the processor's vector units (AVX2, AVX-512):
    the tabulated convolution ran twice as fast with it on this project's CPU (0.26 against
    0.52 ms forward, 0.37 against 0.68 ms backward, 32 aspirins' pairs). A build for one
    processor may not run on another, and torch caches builds by name in one folder (a home
    directory shared by a cluster's nodes), so the name carries a digest of the processor's
    instruction-set flags; where they cannot be read the build is generic.
    """
    flags = ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo,
    ):
        for line in cpuinfo:
            key = line.split(":", 1)[0].strip().lower()
            if key in ("flags", "features"):  # x86, ARM
                flags = line.split(":", 1)[1].strip()
                break
    if not flags:
        return f"{_NAME}_generic", _CFLAGS
    digest = hashlib.sha256(flags.encode()).hexdigest()[:10]
    return f"{_NAME}_{digest}", [*_CFLAGS, "-march=native"]


def _build(name: str, cflags: list[str]):
    from torch.utils.cpp_extension import load_inline

    with _ninja_on_path():
        return load_inline(
            name,
            cpp_sources=_SOURCE,
            functions=[
                "cfconv",
                "table_scatter",
                "tabulated_cfconv",
                "tabulated_cfconv_backward",
                "tabulated_cfconv_double_backward",
                "tabulated_cfconv_by_interval",
                "tabulated_cfconv_by_interval_backward",
                "interval_order",
                "onednn_linear",
                "forget_rows",
                "interval_kernels",
                "shifted_softplus",
                "shifted_softplus_backward",
                "filter_hidden",
                "filter_hidden_backward",
                "filter_table_coefficients",
                "filter_table_coefficients_backward",
                "transpose",
            ],
            extra_cflags=cflags,
        )


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds the library ``name`` (loaded, not built)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # noqa: BLE001 (a private helper of torch's: say it rather than guess)
        return False


def _module():
    if _state["module"] is None and not _state["failed"]:
        targets = [_build_target()]
        if not _built(targets[0][0]):
            _LOG.info("compiling the C++ pair kernels (once; cached on disk)")
        if targets[0][0] != f"{_NAME}_generic":  # a compiler without -march=native: generic
            targets.append((f"{_NAME}_generic", _CFLAGS))
        errors = []
        for name, cflags in targets:
            try:
                _state["module"] = _build(name, cflags)
                break
            except Exception as error:  # noqa: BLE001 (no compiler or ninja, unsupported platform)
                errors.append(f"{type(error).__name__}: {str(error)[:200]}")
        else:
            _state["failed"] = True
            said = "; ".join(dict.fromkeys(errors))  # both builds often fail alike
            if _compiler_works():
                warnings.warn(
                    f"atomlens: C++ pair kernels unavailable ({said}); using the kernels "
                    f"torch.compile generates",
                    stacklevel=3,
                )
            else:  # torch.compile's kernels need the compiler too: one warning, not three
                kernels.no_compiler()
                warnings.warn(
                    f"atomlens: no working C++ compiler ({said}); running plain PyTorch "
                    f"without compiled kernels or compiled MD steps, slower. Install g++ or "
                    f"clang++ (or point CXX at one) for them",
                    stacklevel=3,
                )
    return _state["module"]


def _compiler_works() -> bool:
    """Whether torch.compile finds a working C++ compiler (``CXX`` or its default)."""
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 (InvalidCxxCompiler, or a torch without the helper)
        return False


def _applies(floats: tuple[torch.Tensor, ...], tracing: bool = False) -> bool:
    """Fused kernels on, and ``floats`` CPU tensors of one dtype, float32 or float64; outside
    tracing also plain ones (not torch.func-wrapped: the eager Functions do not serve those)."""
    dtype = floats[0].dtype
    return (
        kernels.fused_enabled()
        and dtype in (torch.float32, torch.float64)
        and all(
            t.dtype == dtype
            and t.device.type == "cpu"
            and (tracing or not torch._C._functorch.is_functorch_wrapped_tensor(t))
            for t in floats
        )
    )


def _loaded(*floats: torch.Tensor):
    """The built module if these kernels apply to ``floats`` (:func:`_applies`) and the build
    succeeds, else None."""
    return _module() if _applies(floats) else None


def available(*floats: torch.Tensor) -> bool:
    """Whether these kernels run on ``floats`` (plain CPU float32/float64 tensors of one
    dtype, fused kernels on, the module built)."""
    return _loaded(*floats) is not None


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


def tabulated_cfconv(h: torch.Tensor, table: torch.Tensor, x: torch.Tensor, a, b):
    """``cfconv(h, W)`` with ``W = filter_lookup(table, x)`` computed per pair where it is
    used, never stored (:func:`atomlens.nn.cfconv.cfconv_tabulated`); or None where this
    kernel does not apply. ``table`` is ``(4 n_intervals, F)``; ``x`` below 0 is clamped to 0
    as :func:`~atomlens.nn.hermite.hermite_lookup` does (no gradient there); pairs beyond
    ``n_intervals`` have zero filters (:func:`atomlens.nn.cfconv.filter_lookup`) and are
    skipped."""
    module = _loaded(h, table, x)
    return None if module is None else module.tabulated_cfconv(h, table, x, a, b)


def tabulated_cfconv_backward(
    grad, h, table, x, a, b, need_h: bool, need_table: bool, need_x: bool
) -> tuple:
    """The first derivatives of :func:`tabulated_cfconv` w.r.t. ``h``, ``table`` and ``x``
    (None where not needed) in one pass over the pairs."""
    grad_h, grad_table, grad_x = _module().tabulated_cfconv_backward(
        grad, h, table, x, a, b, bool(need_h), bool(need_table), bool(need_x)
    )
    return grad_h, grad_table, grad_x


#: atoms per block of :func:`interval_order` (2^8 = 256: ~14 QM9 molecules, whose rows of
#: h, g and dL/dh, 3 x 128 KB at 128 features, stay in L2 while the block's pairs run; blocks
#: of 8, 16, 32 and 64 molecules gave backward 0.355, 0.336, 0.378 and 0.383 ms on a QM9
#: batch of 100, one thread, CPU time)
INTERVAL_BLOCK_SHIFT = 8


def interval_order(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, intervals: int, atoms: int):
    """The pairs ``(x, a, b)`` (grid coordinates, first and second atoms, each in
    ``[0, atoms)``: else a RuntimeError) in the order that
    :func:`tabulated_cfconv_by_interval` runs fastest in: by block of
    2^:data:`INTERVAL_BLOCK_SHIFT` first atoms, then by grid interval of ``x`` (clamped to
    ``[0, intervals]`` as the lookup clamps it; NaN counts as interval 0), each group in its
    given order. New arrays, no autograd; None where the kernels do not apply or are not
    this build's fast path (no AVX-512)."""
    module = _loaded(x)
    if module is None or not module.interval_kernels():
        return None
    return tuple(module.interval_order(x, a, b, int(intervals), INTERVAL_BLOCK_SHIFT, int(atoms)))


def tabulated_cfconv_by_interval(h, table, x, a, b):
    """:func:`tabulated_cfconv` for pairs in :func:`interval_order`: the same result (up to
    the order of float additions) in any order, fastest in that one."""
    return _module().tabulated_cfconv_by_interval(h, table, x, a, b)


def tabulated_cfconv_by_interval_backward(grad, h, table, x, a, b, need_h, need_table):
    """``(dL/dh, dL/dtable)`` of :func:`tabulated_cfconv_by_interval` (None where not
    needed); no derivative w.r.t. ``x`` (:func:`tabulated_cfconv_backward` has it)."""
    grad_h, grad_table = _module().tabulated_cfconv_by_interval_backward(
        grad, h, table, x, a, b, bool(need_h), bool(need_table)
    )
    return grad_h, grad_table


def tabulated_cfconv_double_backward(grad_grad_h, grad_grad_x, grad, h, table, x, a, b):
    """The derivatives of :func:`tabulated_cfconv_backward`'s ``(dL/dh, dL/dx)`` w.r.t.
    ``grad``, ``h``, ``table`` and ``x`` given theirs (``grad_grad_h``, ``grad_grad_x``), in
    one pass over the pairs: force training's second backward pass."""
    return tuple(
        _module().tabulated_cfconv_double_backward(
            grad_grad_h, grad_grad_x, grad, h, table, x, a, b
        )
    )


def shifted_softplus(x: torch.Tensor):
    """``softplus(x) - ln 2`` of a plain float32 CPU tensor in one vectorized pass (error
    below 1.5e-7 of max(1, |result|), as PyTorch's float32), or None where this kernel does
    not apply (other dtypes or devices, torch.func wrappers, no compiler, fused kernels
    off)."""
    module = _loaded(x) if x.dtype == torch.float32 else None
    return None if module is None else module.shifted_softplus(x)


def shifted_softplus_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * sigmoid(x)`` (the derivative of :func:`shifted_softplus`) in one pass."""
    return _module().shifted_softplus_backward(grad, x)


def filter_hidden(a: torch.Tensor, b1: torch.Tensor, blocks: int) -> torch.Tensor:
    """SchNet's filter networks' hidden layer on the table grid, all ``blocks`` at once:
    ``a`` ``(2m, T F)`` first-layer products of values and r-derivatives, ``b1`` ``(T F)``
    -> ``(T, 2m, F)``: ``ssp(a + b1)`` and ``sigmoid(a + b1) da``
    (:mod:`atomlens.nn.filter_tables`). The module must be built (:func:`available`)."""
    return _module().filter_hidden(a, b1, int(blocks))


def filter_hidden_backward(grad: list[torch.Tensor], a: torch.Tensor, b1: torch.Tensor):
    """The gradient w.r.t. ``a`` of :func:`filter_hidden`, ``(2m, T F)``, given its output's
    as one ``(2m, F)`` tensor per block."""
    return _module().filter_hidden_backward(grad, a, b1)


def filter_table_coefficients(w, b2, fc, dfc, spacing: float) -> list[torch.Tensor]:
    """The T blocks' Hermite tables ``(m - 1, 4, F)`` from the second-layer products ``w`` (one ``(2m,
    F)`` tensor per block: values and r-derivatives, no bias), ``b2`` ``(T, F)`` and the
    cutoff's values and derivatives ``fc``, ``dfc`` ``(m,)`` on nodes ``spacing`` apart."""
    return _module().filter_table_coefficients(w, b2, fc, dfc, float(spacing))


def filter_table_coefficients_backward(grad, fc, dfc, spacing: float) -> torch.Tensor:
    """The gradient w.r.t. ``w`` of :func:`filter_table_coefficients`, ``(T, 2m, F)``, given
    the tables' (a list)."""
    return _module().filter_table_coefficients_backward(grad, fc, dfc, float(spacing))


def transpose(x: torch.Tensor):
    """``x.T`` as a new row-major array, for a float32 CPU matrix ``x`` (in 16 x 16 register
    tiles with AVX-512: on one thread about 4x faster than PyTorch's copy); or None where
    this kernel does not apply. No autograd: for backward passes' products. A transposed
    view (``x.T`` row-major) is copied as it is."""
    module = _loaded(x) if x.dtype == torch.float32 and x.dim() == 2 else None
    if module is None:
        return None
    if not x.is_contiguous() and x.t().is_contiguous():
        return x.t().clone()
    return module.transpose(x, False)[0]


def transpose_and_sums(x: torch.Tensor):
    """``(x.T, x.sum(0))`` for a row-major float32 CPU matrix ``x``: :func:`transpose` that
    also adds up the columns it reads (a weight gradient's ``grad.T`` and its layer's bias
    gradient in one pass); or None where this kernel does not apply."""
    module = _loaded(x) if x.dtype == torch.float32 and x.dim() == 2 else None
    if module is None or not x.is_contiguous():
        return None
    return tuple(module.transpose(x, True))


# ---------------------------------------------------------------------------------------
# the same kernels as operators for torch.compile (MD's compiled energy-and-forces step):
# Inductor calls them between its own fused kernels; first derivatives only


def compiled_ops_ready(*floats: torch.Tensor) -> bool:
    """Whether a function being compiled may call the operators on ``floats``: the kernels
    apply (:func:`_applies`) and the module is already built (:func:`prepare`; a build never
    starts while tracing)."""
    return _state["module"] is not None and _applies(floats, tracing=True)


def prepare(device: torch.device | str) -> None:
    """Build the module (if it can be) before compiling a function for ``device``."""
    if torch.device(device).type == "cpu" and kernels.fused_enabled():
        _module()


# The operators' schemas are defined here, their CPU kernels in C++ (registered when the
# module loads, :func:`prepare`): Inductor's C++ wrapper then calls them through the
# dispatcher directly. A Python operator (``torch.library.custom_op``) cost 13-20 us more
# per call (the interpreter and its checks): twelve calls per MD step, a seventh of a
# 21-atom aspirin's compiled energy-and-forces step.
torch.library.define(
    "atomlens::tabulated_cfconv", "(Tensor h, Tensor table, Tensor x, Tensor a, Tensor b) -> Tensor"
)
torch.library.define(
    "atomlens::tabulated_cfconv_backward",
    "(Tensor grad, Tensor h, Tensor table, Tensor x, Tensor a, Tensor b, bool need_h, "
    "bool need_table, bool need_x) -> (Tensor, Tensor, Tensor)",
)
torch.library.define("atomlens::linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
torch.library.define("atomlens::shifted_softplus", "(Tensor x) -> Tensor")
torch.library.define("atomlens::shifted_softplus_backward", "(Tensor grad, Tensor x) -> Tensor")


@torch.library.register_fake("atomlens::shifted_softplus")
def _(x):
    return x.new_empty(x.shape)  # contiguous, as the kernel's result


@torch.library.register_fake("atomlens::shifted_softplus_backward")
def _(grad, x):
    return x.new_empty(x.shape)


@torch.library.register_fake("atomlens::linear")
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("atomlens::tabulated_cfconv")
def _(h, table, x, a, b):
    return h.new_empty(h.shape)  # contiguous, as the kernel's result


@torch.library.register_fake("atomlens::tabulated_cfconv_backward")
def _(grad, h, table, x, a, b, need_h, need_table, need_x):
    return (
        h.new_empty(h.shape) if need_h else h.new_empty(0),
        h.new_empty(table.shape) if need_table else h.new_empty(0),
        h.new_empty(x.shape) if need_x else h.new_empty(0),
    )


def _no_second_derivative(ctx, *grads):
    raise RuntimeError(
        "atomlens::tabulated_cfconv_backward has no derivative of its own: a second derivative "
        "through the compiled convolution (a loss on forces under torch.compile) is not "
        "available; train on forces without compile (atomlens's eager path has it)"
    )


# without an autograd kernel a second derivative through the operator came out as zero with
# a warning; now it is an error
torch.library.register_autograd(
    "atomlens::tabulated_cfconv_backward",
    _no_second_derivative,
    setup_context=lambda ctx, inputs, output: None,
)


class TabulatedCFConvOp(torch.autograd.Function):
    """The operators with their first derivatives, under ``torch.func`` transforms too (MD's
    compiled step differentiates with ``torch.func.grad``)."""

    @staticmethod
    def forward(h, table, x, a, b):
        return torch.ops.atomlens.tabulated_cfconv(h, table, x, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        h, table, x, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grads = torch.ops.atomlens.tabulated_cfconv_backward(grad, h, table, x, a, b, *need)
        return (*(g if n else None for g, n in zip(grads, need)), None, None)


class ShiftedSoftplusOp(torch.autograd.Function):
    """The shifted softplus operator with its derivative, under ``torch.func`` transforms
    too; a backward pass that builds a graph uses PyTorch's differentiable
    ``softplus_backward``."""

    @staticmethod
    def forward(x):
        return torch.ops.atomlens.shifted_softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return torch.ops.aten.softplus_backward(grad, x, 1.0, 20.0)
        return torch.ops.atomlens.shifted_softplus_backward(grad, x)
