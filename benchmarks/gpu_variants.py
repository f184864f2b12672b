"""Which of atomlens's SchNet code paths is fastest on a GPU: an A/B of the model step alone.

The CPU paths were chosen on a CPU: Hermite filter tables, Inductor-fused pair kernels and
padded training batches. On a GPU a QM9 batch of 100 molecules is small, so the number of
kernel launches and the Python work around them may matter more than the arithmetic. This
script times each variant on fixed QM9 batches already on the device, with no data pipeline.
It times training steps (forward, MSE, backward, Adam) and inference:

    tables/fused    filters from tables (schnet.TABLES_ON includes the device), fused pair
                    kernels from the CPU's threshold (kernels.MIN_FUSED_SIZE) up
    tables/plain    tables, fused kernels off (atomlens.nn.kernels.set_fused(False))
    direct/fused    the filter network on every pair, as SchNetPack does, fused kernels
    direct/plain    both off
    default         what the library does on that device (session 22: per-pair filters
                    and plain kernels below kernels.MIN_FUSED_SIZE_GPU on a GPU)

It prints one JSON line per (variant, mode, batch size). It then prints a profile of one
training step of tables/fused and of direct/plain: the kernel launches and the top operators.
Session 22 ran it on an H200 with `edc452d`. That code had the CPU's defaults everywhere, so
its first four variants did then what they do here (docs/benchmarks.md, "Session 22").

    python benchmarks/gpu_variants.py --data .gpu/qm9-20k --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from qm9 import AtomlensBench  # the script's folder is on sys.path

from atomlens.data.dataset import PackedDataset
from atomlens.models import schnet
from atomlens.nn import kernels

#: qm9.py's SchNet 128/6 (its default filter tables of 0.02 Angstrom where they are used)
SETTING = "128/6"
#: name -> (filters from tables, fused kernels); None: the library's defaults
VARIANTS = {
    "tables/fused": (True, True),
    "tables/plain": (True, False),
    "direct/fused": (False, True),
    "direct/plain": (False, False),
    "default": None,
}
DEFAULTS = (schnet.TABLES_ON, kernels.MIN_FUSED_SIZE_GPU)


def use_variant(name: str, device: str) -> None:
    """Set the process-wide switches for variant ``name`` on ``device``."""
    schnet.TABLES_ON, kernels.MIN_FUSED_SIZE_GPU = DEFAULTS
    kernels.set_fused(True)
    if VARIANTS[name] is None:
        return
    tables, fused = VARIANTS[name]
    kind = torch.device(device).type
    schnet.TABLES_ON = tuple({*DEFAULTS[0], kind}) if tables else ()
    kernels.MIN_FUSED_SIZE_GPU = kernels.MIN_FUSED_SIZE  # the CPU's threshold everywhere
    kernels.set_fused(fused)


def profile(bench: AtomlensBench, label: str) -> None:
    """Kernel launches and the top operators of 3 training steps on one fixed batch."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    state = bench._setup(SETTING)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench._run(state, "train", "model", 3)  # (each step synchronised on a GPU)
    events = prof.key_averages()
    kernels_ = sum(e.count for e in events if e.device_type.name == "CUDA") / 3
    syncs = sum(e.count for e in events if "Synchronize" in e.key or "item" in e.key) / 3
    print(f"== {label}: {kernels_:.0f} CUDA kernels per step, {syncs:.1f} sync-like calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    print(events.table(sort_by="self_cuda_time_total", row_limit=10))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="packed QM9 folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--n-molecules", type=int, default=10000)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(8)
    data = PackedDataset.load(args.data)
    indices = np.sort(np.random.default_rng(0).choice(len(data), args.n_molecules, replace=False))
    kept = {}
    for name in VARIANTS:
        use_variant(name, args.device)
        for batch_size in args.batch_sizes:
            # QM9's throughput bench: fixed batches on the device, each step synchronised
            bench = AtomlensBench(data, indices, batch_size, warmup=3, device=args.device)
            for mode in ("train", "infer"):
                result = bench.measure(SETTING, mode, "model", args.seconds, min_batches=10)
                line = {"variant": name, "mode": mode, "batch_size": batch_size}
                print(json.dumps({**line, "mol_per_s": round(result["mol_per_s"], 1)}), flush=True)
            if batch_size == args.batch_sizes[0]:
                kept[name] = bench
    if not args.no_profile:
        for name in ("tables/fused", "direct/plain"):
            use_variant(name, args.device)
            profile(kept[name], name)
    use_variant("default", args.device)
    print(json.dumps({"pad_training_batches": schnet.PAD_TRAINING_BATCHES}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
