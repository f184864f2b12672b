"""How close a SchNet training step comes to this CPU's single-core fp32 matmul peak.

1. Peak: the best GFLOP/s of a square fp32 product (2 n^3 FLOP) over a few sizes and two
   libraries (MKL's ``torch.mm``, oneDNN's inner product), on one thread, timed by the
   thread's CPU time (other jobs on a shared machine do not change it).
2. The step's FLOP: one training step (forward, U0 loss, backward, Adam) of SchNet 128/6
   (or 64/3) on a batch of QM9 molecules, counted by ``torch.utils.flop_counter``'s
   formulas (matrix products, the work a matmul peak measures; element-wise operations are
   not counted, so the fraction is of the step's matmul work). As training runs it: ``--batches`` different
   random batches in turn (each with its own number of atoms and pairs; 1 repeats one batch,
   which favours every per-shape cache) and Adam's fused kernel (``atomlens.training``'s).
3. Achieved: the batches' FLOP / CPU seconds on one thread; fraction = achieved / peak. The
   timed steps are split into ``--rounds`` rounds, each after a short run of the peak's
   product (the library and size that gave the peak): the quoted fraction is the median of
   the rounds' fractions, each measured at one time (the machine's speed drifts; the
   fraction against the first peak alone is printed too).
4. Where the rest goes: torch.profiler's top operators by self CPU time.

Prints one JSON line for the peak, one for the step and one for the profile::

    python benchmarks/matmul_peak.py                       # 128/6, 10 batches of 100
    python benchmarks/matmul_peak.py --setting 64/3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
from common import SETTINGS


def products() -> dict:
    """The square products timed for the peak: ``torch.mm`` (MKL's sgemm on x86) and oneDNN's
    inner product (``torch.ops.mkldnn._linear_pointwise``, which atomlens's layers use for
    large inputs: :mod:`atomlens.nn.linear`)."""
    found = {"mkl_mm": torch.mm}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if onednn is not None and torch.backends.mkldnn.is_available():
        found["onednn"] = lambda a, b: onednn(a, b, None, "none", [], "")  # a @ b.T
    return found


def product_gflops(product, a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """GFLOP/s of ``product`` on the square ``a``, ``b`` over ``seconds`` of this thread's CPU
    time (at least 3 repeats)."""
    repeats, start = 0, time.thread_time()
    while repeats < 3 or time.thread_time() - start < seconds:
        product(a, b)
        repeats += 1
    return 2.0 * a.shape[0] ** 3 * repeats / (time.thread_time() - start) / 1e9


def matmul_peak(sizes=(256, 512, 1024, 2048), seconds: float = 1.0) -> dict:
    """Best fp32 GFLOP/s of a square product on this thread (CPU time), per size and library
    (:func:`products`). The peak is the best of them."""
    by_library = {}
    for name, product in products().items():
        per_size = {}
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            product(a, b)  # warm-up
            per_size[n] = product_gflops(product, a, b, seconds)
        by_library[name] = per_size
    best = max(
        ((name, n) for name, per_size in by_library.items() for n in per_size),
        key=lambda key: by_library[key[0]][key[1]],
    )
    return {
        "peak_gflops": by_library[best[0]][best[1]],
        "best": best,
        "gflops_by_size": {
            name: {str(n): round(v, 2) for n, v in per_size.items()}
            for name, per_size in by_library.items()
        },
    }


def training_setup(setting: str, batch_size: int, seed: int = 0, n_batches: int = 1):
    """A SchNet U0 model, its Adam optimiser (fused, as training's) and ``n_batches`` QM9
    batches (or random molecules)."""
    from atomlens.models.potential import ModelConfig, build_model
    from atomlens.training.train import fit_statistics

    try:
        from atomlens.data.sources.qm9 import load_qm9

        data = load_qm9()
    except Exception as error:  # noqa: BLE001 (no QM9 here: the FLOP count needs molecules only)
        print(f"QM9 unavailable ({error}); using random QM9-sized molecules", file=sys.stderr)
        data = random_molecules(batch_size * n_batches, seed)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(data))[: batch_size * n_batches].reshape(n_batches, batch_size)
    torch.manual_seed(seed)
    kwargs = SETTINGS[setting]
    model = build_model(
        ModelConfig(
            representation="schnet",
            representation_kwargs=kwargs,
            head_hidden=kwargs["n_atom_basis"] // 2,
            target=next(iter(data.targets)),
        )
    )
    fit_statistics(model, data, np.sort(chosen.ravel()))
    batches = [data.batch(np.sort(indices), model.cutoff) for indices in chosen]
    return model, torch.optim.Adam(model.parameters(), lr=5e-4, fused=True), batches


def random_molecules(n: int, seed: int):
    from atomlens.data import PackedDataset

    rng = np.random.default_rng(seed)
    structures = []
    for _ in range(n):
        atoms = 18  # QM9's mean
        structures.append(
            (
                rng.choice([1, 1, 6, 7, 8], atoms),
                rng.uniform(0, 4.5, (atoms, 3)) + np.arange(atoms)[:, None] * 0.3,
            )
        )
    return PackedDataset.from_structures(structures, {"U0": rng.normal(size=n)}, {"U0": "eV"})


def step(model, optimizer, batch) -> None:
    target = model.target
    optimizer.zero_grad(set_to_none=True)
    loss = (model(batch)[target] - batch.targets[target]).pow(2).mean()
    loss.backward()
    optimizer.step()


def count_flops(model, optimizer, batch) -> int:
    """Matmul-class FLOP of one training step (fused kernels off: same products, countable).

    Counted by torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``) in a
    dispatch mode of its own: ``FlopCounterMode`` also tracks modules through global module
    hooks, and a hook changes the step it counts (SchNet's first block takes its product of
    the embedding table only where no hooks watch it: ``SchNet.embedded_in2f``)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from atomlens.nn import kernels

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    enabled = kernels.fused_enabled()
    kernels.set_fused(False)
    try:
        with Counter() as counter:
            step(model, optimizer, batch)
    finally:
        kernels.set_fused(enabled)
    return int(counter.total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="128/6")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    parser.add_argument(
        "--warmup", type=int, default=4, help="untimed passes over the batches before timing"
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=10,
        help="different random QM9 batches, stepped in turn (1: one batch, repeated)",
    )
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="per matmul size")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternations of the peak's product and the timed steps (median fraction)",
    )
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure(threads=1)  # single core: the peak and the step on the same one thread
    common = {
        "threads": 1,
        "clock": "thread CPU time",
        "torch": torch.__version__,
        "load_1min": round(os.getloadavg()[0], 2),
    }

    peak = matmul_peak(seconds=args.peak_seconds)
    print(json.dumps({"measure": "matmul_peak", "dtype": "float32", **peak, **common}), flush=True)

    model, optimizer, batches = training_setup(
        args.setting, args.batch_size, args.seed, args.batches
    )
    model.train()
    flops = [count_flops(model, optimizer, batch) for batch in batches]
    # warm-up: compiled kernels, oneDNN's kernel per bucket size, the allocator's pool. A
    # training run is past this after its first few dozen steps; one pass over the batches
    # had left the timed steps 10-25% slower than later ones (69, 62, 59, 53, 53 ms per
    # step in the first five passes, 2026-12-03)
    for _ in range(args.warmup):
        for batch in batches:
            step(model, optimizer, batch)
    # rounds of (the peak's product, then steps): this machine's speed drifts by 5-15%
    # within minutes, and it moves the memory-bound half of a step more than a product; each
    # round's fraction compares the two at one time, and the median round is quoted
    library, size = peak["best"]
    product = products()[library]
    a, b = torch.randn(size, size), torch.randn(size, size)
    order = [k % len(batches) for k in range(args.steps)]
    rounds = [order[r :: args.rounds] for r in range(args.rounds)]
    fractions, seconds = [], 0.0
    for ks in rounds:
        round_peak = product_gflops(product, a, b, args.peak_seconds / 2)
        start = time.thread_time()
        for k in ks:
            step(model, optimizer, batches[k])
        elapsed = time.thread_time() - start
        seconds += elapsed
        fractions.append(sum(flops[k] for k in ks) / elapsed / 1e9 / round_peak)
    step_flops = sum(flops[k] for k in order)
    molecules = sum(batches[k].n_structures for k in order)
    achieved = step_flops / seconds / 1e9
    print(
        json.dumps(
            {
                "measure": "training_step",
                "setting": args.setting,
                "batch_size": args.batch_size,
                "batches": len(batches),
                "warmup_passes": args.warmup,
                "optimizer": "Adam (fused)",
                "n_atoms_mean": round(float(np.mean([b.n_atoms for b in batches])), 1),
                "n_pairs_mean": round(float(np.mean([b.pair_i.shape[0] for b in batches])), 1),
                "step_mflop": round(step_flops / len(order) / 1e6, 1),
                "mflop_per_molecule": round(step_flops / molecules / 1e6, 2),
                "cpu_s_per_step": round(seconds / len(order), 4),
                "molecules_per_cpu_s": round(molecules / seconds, 1),
                "achieved_gflops": round(achieved, 2),
                "fraction_of_peak": round(float(np.median(fractions)), 3),
                "fraction_of_peak_rounds": [round(f, 3) for f in fractions],
                "fraction_of_first_peak": round(achieved / peak["peak_gflops"], 3),
                **common,
            }
        ),
        flush=True,
    )

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in order[: max(1, args.steps // 2)]:
            step(model, optimizer, batches[k])
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.profile_rows]
    print(
        json.dumps(
            {
                "measure": "training_step_profile",
                "setting": args.setting,
                "top_operators": [
                    {
                        "op": e.key,
                        "calls": e.count,
                        "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                        "fraction": round(e.self_cpu_time_total / total, 3),
                    }
                    for e in top
                ],
                **common,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
