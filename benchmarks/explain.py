"""Explanation benchmarks on the digits CNN (``atomlens.explain.digits``).

    python benchmarks/explain.py [--epochs 10] [--repeats 3] [--threads 2]

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
* ``signal_quality``: mean rho(S) per layer for the estimators x, w, a, a+-.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    configure(threads=args.threads)
    emit("setup", args.threads, "threads", torch=torch.__version__, load=os.getloadavg()[0])

    data = load_digits_data()
    model = train_digits_cnn(data, epochs=args.epochs)
    emit("accuracy", accuracy(model, data.x_test, data.y_test), "fraction", model="digits_cnn")

    loader = torch.utils.data.DataLoader(data.x_train, batch_size=256)
    seconds = timed(lambda: fit_patterns(model, loader), args.repeats)
    emit("pattern_fit", seconds, "s", images=len(data.x_train))
    emit("pattern_fit", len(data.x_train) / seconds, "images/s")
    patterns = fit_patterns(model, loader)

    batch = data.x_test[:256]
    for name in METHODS:
        seconds = timed(lambda n=name: explain(model, batch, n, patterns=patterns), args.repeats)
        emit("throughput", len(batch) / seconds, "images/s", method=name)

    inputs = data.x_test
    orderings = {"random": torch.rand(inputs.shape, generator=torch.Generator().manual_seed(0))}
    for name, method in METHODS.items():
        relevance = explain(model, inputs, name, patterns=patterns)
        orderings[name] = relevance if method.kind == "attribution" else relevance.abs()
    for name, relevance in orderings.items():
        result = perturbation_curve(model, inputs, relevance, patch=2, replacement="mean")
        emit("perturbation_auc", result.auc, "logit", method=name)

    for row in quality_table(model, data.x_train, patterns):
        for estimator in ESTIMATORS:
            emit("signal_quality", row[estimator], "rho", layer=row["layer"], estimator=estimator)


if __name__ == "__main__":
    main()
