"""Where two-process data parallelism loses time on the CPU: plain torch.distributed.

Trains SchNet 128/6 on fixed QM9 batches of 100 molecules (absolute-error U0 loss, fused
Adam), without Lightning: with ``--processes P`` each process takes its contiguous share of
every batch, all-reduces the flattened gradient (``--reduce gloo``: gloo's sockets;
``--reduce shm``: atomlens's shared-memory block, :mod:`atomlens.training.shared_memory`)
and steps; ``--share S`` (one process)
trains on the first of S shares alone, the work of one rank without its partner. Prints one
JSON line per process: wall and thread-CPU milliseconds per step, the wall time inside the
all-reduce (its own cost plus the wait for the other rank), and the global batch's molecules
per second. Compare with the same steps through Lightning, ``atomlens train --devices 2``
(``qm9.py --processes 2 [--reduce gloo]``)::

    python benchmarks/data_parallel.py --processes 1                 # one process, batch 100
    python benchmarks/data_parallel.py --processes 1 --share 2       # one process, 50 of them
    python benchmarks/data_parallel.py --processes 2 --reduce gloo   # two processes, 50 each
    python benchmarks/data_parallel.py --processes 2 --reduce shm
"""

from __future__ import annotations

import argparse
import json
import os
import time

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
import torch.distributed as dist

BATCH = 100
N_BATCHES = 20


def _setup(seed: int):
    from atomlens.data.sources.qm9 import load_qm9
    from atomlens.models.potential import build_model
    from atomlens.training.config import preset
    from atomlens.training.train import fit_statistics

    data = load_qm9()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_model(preset("qm9-u0-schnet").model)  # the recipe's SchNet 128/6 and head
    indices = np.sort(rng.choice(len(data), size=BATCH * N_BATCHES, replace=False))
    fit_statistics(model, data, indices)
    return model, data, indices


def _run(rank: int, world: int, share: int, steps: int, seed: int, port: int, reduce: str) -> None:
    configure(threads=1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model, data, indices = _setup(seed)
    model.train()
    params = list(model.parameters())
    reducer = None
    if world > 1 and reduce == "shm":
        from atomlens.training.shared_memory import connect

        reducer = connect(sum(p.numel() for p in params))
    optimizer = torch.optim.Adam(params, lr=1e-4, fused=True)
    batches = [
        data.batch(np.array_split(indices[b * BATCH : (b + 1) * BATCH], share)[rank], model.cutoff)
        for b in range(N_BATCHES)
    ]
    warmup = 5
    for n in range(warmup + steps):
        if n == warmup:
            wall, cpu, exchange = time.perf_counter(), time.thread_time(), 0.0
        batch = batches[n % N_BATCHES]
        optimizer.zero_grad(set_to_none=True)
        loss = (model(batch)["U0"] - batch.targets["U0"]).abs().sum() / BATCH
        loss.backward()
        if world > 1:
            start = time.perf_counter()
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            if reducer is not None:
                reducer.all_reduce_(flat)
            else:
                dist.all_reduce(flat)
            for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
            if n >= warmup:
                exchange += time.perf_counter() - start
        optimizer.step()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    print(
        json.dumps(
            {
                "benchmark": "data_parallel",
                "processes": world,
                "rank": rank,
                "share": f"1/{share}",
                "molecules_per_step": round(sum(b.n_structures for b in batches) / N_BATCHES, 1),
                "wall_ms_per_step": round(1e3 * wall / steps, 1),
                "thread_cpu_ms_per_step": round(1e3 * cpu / steps, 1),
                "reduce": reduce if world > 1 else None,
                "allreduce_wall_ms_per_step": round(1e3 * exchange / steps, 2),
                "global_molecules_per_s": round(BATCH * steps / wall, 1)
                if share == world
                else None,
                "threads": 1,
                "cpu_count": os.cpu_count(),
                "load_1min": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
        ),
        flush=True,
    )
    if world > 1:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--share", type=int, help="one process: train on 1/SHARE of each batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument(
        "--reduce",
        choices=("gloo", "shm"),
        default="gloo",
        help="gradient all-reduce: gloo's sockets or atomlens's shared-memory block",
    )
    args = parser.parse_args(argv)
    share = args.share or args.processes
    if args.processes > 1 and share != args.processes:
        parser.error("--share is for one process; P processes take 1/P each")
    if args.processes == 1:
        _run(0, 1, share, args.steps, args.seed, args.port, args.reduce)
    else:
        torch.multiprocessing.spawn(
            _run,
            args=(args.processes, share, args.steps, args.seed, args.port, args.reduce),
            nprocs=args.processes,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
