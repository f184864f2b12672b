"""The backward products of a dense layer on a batch whose rows change, per library.

For row counts that change from call to call (QM9 batches of 100 molecules have 1,750-1,830
atoms), one thread, CPU time, repeats alternated between the cases, medians: the weight
gradient ``grad.T @ x`` and the input gradient ``grad @ W`` by MKL (``torch.mm``) and by
oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) after padding the rows to
``atomlens.nn.linear``'s bucket sizes, with ``F.pad`` or with ``_pad_rows`` (one copy, the
new rows zeroed; the "one_copy" products are ``atomlens.nn.linear``'s own backward
products), and the padding alone. Prints one JSON line per case::

    python benchmarks/linear_products.py [--width 128] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from atomlens.runtime import configure, prepare_environment

prepare_environment()

import numpy as np
import torch
import torch.nn.functional as F

from atomlens.nn import cpu_kernels
from atomlens.nn import linear as onednn


def cases(width: int) -> dict:
    product = onednn._ONEDNN
    weight = torch.randn(width, width)

    def pad_f(t):
        return F.pad(t, (0, 0, 0, onednn._bucket(len(t)) - len(t)))

    def pad_copy(t):
        return onednn._pad_rows(t, onednn._bucket(len(t)))

    found = {
        "weight_gradient_mkl": lambda g, x: g.t() @ x,
        "input_gradient_mkl": lambda g, x: g @ weight,
        "pad_rows_f_pad": lambda g, x: pad_f(g),
        "pad_rows_one_copy": lambda g, x: pad_copy(g),
        "transposed_contiguous_copy": lambda g, x: g.t().contiguous(),
    }
    if cpu_kernels.transpose(weight) is not None:  # the C++ tiled transpose (nn.linear)
        found["transposed_tiled_copy"] = lambda g, x: cpu_kernels.transpose(g)
    if product is not None:
        found |= {
            "weight_gradient_onednn_f_pad": lambda g, x: product(
                pad_f(g).t(), pad_f(x).t(), None, "none", [], ""
            ),
            # atomlens's backward products themselves (nn.linear), one at a time
            "weight_gradient_onednn_one_copy": lambda g, x: onednn._onednn_backward(
                g, x, weight, False, True
            ),
            "weight_gradient_onednn_contiguous_inputs": lambda g, x: product(
                pad_copy(g).t().contiguous(), pad_copy(x).t().contiguous(), None, "none", [], ""
            ),
            "input_gradient_onednn_f_pad": lambda g, x: product(
                pad_f(g), weight.t(), None, "none", [], ""
            )[: len(g)],
            "input_gradient_onednn_one_copy": lambda g, x: onednn._onednn_backward(
                g, x, weight, True, False
            ),
        }
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=128, help="features in and out")
    parser.add_argument("--rows", type=int, default=1750, help="the first row count")
    parser.add_argument("--row-counts", type=int, default=12, help="row counts, 7 apart")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure(threads=1)
    torch.manual_seed(args.seed)
    rows = [args.rows + 7 * k for k in range(args.row_counts)]
    data = [(torch.randn(m, args.width), torch.randn(m, args.width)) for m in rows]
    found = cases(args.width)
    times = {name: [] for name in found}
    for _ in range(args.repeats):
        for name, case in found.items():
            start = time.thread_time()
            for grad, x in data:
                case(grad, x)
            times[name].append((time.thread_time() - start) / len(data) * 1e6)
    for name, values in times.items():
        kept = values[3:] if len(values) > 6 else values  # the first repeats warm up
        print(
            json.dumps(
                {
                    "measure": "linear_backward_products",
                    "case": name,
                    "width": args.width,
                    "rows": [rows[0], rows[-1]],
                    "median_us": round(float(np.median(kept)), 1),
                    "min_us": round(float(np.min(kept)), 1),
                    "repeats": len(kept),
                    "threads": 1,
                    "clock": "thread CPU time",
                    "torch": torch.__version__,
                    "load_1min": round(os.getloadavg()[0], 2),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
