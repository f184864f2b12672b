"""Pieces the atomlens-side speed benchmarks share: clocks, the timed step loop, the model.

(The SchNetPack peers run in their own venv and never import atomlens or this file.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

#: wall time, or this thread's CPU time (with one torch thread: immune to a busy machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
#: the compared SchNets, name -> hyperparameters (both libraries use them): SchNetPack's QM9
#: default, and the NeurIPS paper's size (F = 64, 3 interactions). The atom-wise head halves
#: the width (128 -> 64 -> 1; 64 -> 32 -> 1, the paper's atomwise(32)), as SchNetPack's does.
SETTINGS = {
    "128/6": {
        "n_atom_basis": 128,
        "n_interactions": 6,
        "n_filters": 128,
        "n_rbf": 20,
        "cutoff": 5.0,
    },
    "64/3": {"n_atom_basis": 64, "n_interactions": 3, "n_filters": 64, "n_rbf": 20, "cutoff": 5.0},
}
#: the default comparison: SchNetPack's QM9 SchNet
HYPERPARAMETERS = SETTINGS["128/6"]


def synchronize(device) -> None:
    """Wait for the GPU's queued work (timings end when the work has run); no-op on a CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def timed(
    step: Callable[[], int], seconds: float, clock: str, warmup: int
) -> tuple[int, int, float]:
    """Run ``step`` (returns structures done) ``warmup`` times, then for at least 5 steps and
    ``seconds`` of ``clock``; returns (structures, steps, seconds) of the timed part."""
    for _ in range(warmup):
        step()
    now = CLOCKS[clock]
    structures, steps, start = 0, 0, now()
    while steps < 5 or now() - start < seconds:
        structures += step()
        steps += 1
    return structures, steps, now() - start


def build_model(seed: int = 0, hyperparameters: dict = HYPERPARAMETERS):
    """The compared SchNet (default 128/6, head 128 -> 64 -> 1), seeded."""
    import torch

    from atomlens.models import build_model as build

    torch.manual_seed(seed)
    return build(
        {
            "representation": "schnet",
            "representation_kwargs": hyperparameters,
            "head_hidden": hyperparameters["n_atom_basis"] // 2,
            "target": "energy",
        }
    )
