"""Explanation benchmarks on the digits CNN (``atomlens.explain.digits``).

    python benchmarks/explain.py [--epochs 10] [--repeats 3] [--threads 2]
                                 [--skip-throughput] [--degradation-grid]

Prints one JSON object per result line:

* ``accuracy``: test accuracy of the trained CNN;
* ``pattern_fit``: seconds for one streaming pass over the 1,438 training images
  (batches of 256) that fits the patterns of every layer, and images per second;
* ``throughput``: explained images per second for every method (batch of 256 test
  images, median of ``--repeats``; Integrated Gradients with 50 steps, SmoothGrad with 16
  samples);
* ``perturbation_auc``: area under the image-degradation curve (mean target logit
  against the fraction of 2x2 regions replaced by the mean image, most relevant first;
  all 359 test images; lower is better), with a random ordering as the baseline;
* ``degradation``: with ``--degradation-grid``, the same area for every combination of
  patch size (1, 2, 4 pixels), replacement (mean image, zero, uniform noise as in Samek
  et al. 2017) and ordering (signed relevance, absolute value), and the AOPC
  ``mean_k (f(x) - f(x_k))`` (higher is better);
* ``signal_quality``: mean rho(S) per layer for the estimators x, w, a, a+-, on the
  training images the patterns were fitted on (``data=train``) and on the held-out test
  images (``data=test``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import torch

from atomlens.explain import METHODS, explain, fit_patterns, perturbation_curve
from atomlens.explain.digits import accuracy, load_digits_data, train_digits_cnn
from atomlens.explain.quality import ESTIMATORS, quality_table


def emit(benchmark: str, value: float, unit: str, **extra) -> None:
    print(json.dumps({"benchmark": benchmark, **extra, "value": value, "unit": unit}), flush=True)


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true", help="no timings")
    parser.add_argument("--degradation-grid", action="store_true")
    args = parser.parse_args()
    configure(threads=args.threads)
    emit("setup", args.threads, "threads", torch=torch.__version__, load=os.getloadavg()[0])

    data = load_digits_data()
    model = train_digits_cnn(data, epochs=args.epochs)
    emit("accuracy", accuracy(model, data.x_test, data.y_test), "fraction", model="digits_cnn")

    loader = torch.utils.data.DataLoader(data.x_train, batch_size=256)
    if not args.skip_throughput:
        seconds = timed(lambda: fit_patterns(model, loader), args.repeats)
        emit("pattern_fit", seconds, "s", images=len(data.x_train))
        emit("pattern_fit", len(data.x_train) / seconds, "images/s")
    patterns = fit_patterns(model, loader)

    batch = data.x_test[:256]
    for name in [] if args.skip_throughput else METHODS:
        seconds = timed(lambda n=name: explain(model, batch, n, patterns=patterns), args.repeats)
        emit("throughput", len(batch) / seconds, "images/s", method=name)

    inputs = data.x_test
    random = torch.rand(inputs.shape, generator=torch.Generator().manual_seed(0))
    relevances = {"random": random}
    relevances.update({name: explain(model, inputs, name, patterns=patterns) for name in METHODS})
    for name, relevance in relevances.items():
        attribution = name == "random" or METHODS[name].kind == "attribution"
        ordering = relevance if attribution else relevance.abs()
        result = perturbation_curve(model, inputs, ordering, patch=2, replacement="mean")
        emit("perturbation_auc", result.auc, "logit", method=name)
    if args.degradation_grid:
        for patch, replacement, sign in itertools.product(
            (1, 2, 4), ("mean", "zero", "noise"), ("signed", "absolute")
        ):
            for name, relevance in relevances.items():
                ordering = relevance if sign == "signed" else relevance.abs()
                result = perturbation_curve(model, inputs, ordering, None, patch, replacement)
                aopc = float((result.curve[0] - result.curve[1:]).mean())
                options = {"method": name, "patch": patch, "replacement": replacement}
                emit("degradation", result.auc, "logit", **options, ordering=sign, aopc=aopc)

    for split, images in (("train", data.x_train), ("test", data.x_test)):
        for row in quality_table(model, images, patterns):
            for estimator in ESTIMATORS:
                emit(
                    "signal_quality",
                    row[estimator],
                    "rho",
                    layer=row["layer"],
                    estimator=estimator,
                    data=split,
                )


if __name__ == "__main__":
    main()
