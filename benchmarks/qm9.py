"""QM9 benchmarks: accuracy under a wall-clock budget, throughput, and the SchNetPack comparison.

Accuracy (the QM9 protocol: ``n_train`` molecules, 1,000 for validation, the rest for test)::

    python benchmarks/qm9.py --model schnet --target U0 --n-train 10000 --minutes 30

Throughput (molecules per second, batch size 100, 2 torch threads, end to end including the
atomlens data pipeline, and for the model alone)::

    python benchmarks/qm9.py --throughput            # atomlens only
    python benchmarks/qm9.py --throughput --peers    # side by side with SchNetPack 2.1.1

Time to accuracy, side by side (atomlens, then SchNetPack with its own training loop, on the
same split, test subset, atom references, threads and budget)::

    python benchmarks/qm9.py --peers --n-train 10000 --minutes 30

Throughput beside N busy processes (loaded / idle per library in the same run)::

    python benchmarks/qm9.py --throughput --peers --background 2

Throughput on a GPU (both libraries; every step ends with a synchronisation; ``--data`` a
packed QM9 subset where qm9pack is absent, ``--peer-python`` an interpreter that imports
SchNetPack)::

    python benchmarks/qm9.py --throughput --peers --device cuda --batch-size 100

Each result is one JSON line on stdout; progress goes to stderr. ``--throughput --peers`` runs
``benchmarks/peers/schnetpack_qm9.py`` in SchNetPack's own venv (see ``peers/spk_env.py``) as a
worker process and interleaves its repeats with atomlens's, so that both see the same load on
a shared machine; the ratio atomlens / SchNetPack is taken per repeat and its median reported.

What one "training step" is, for both libraries: forward pass, mean squared error of U0,
backward pass and one Adam step, in a plain loop (no Lightning), on random batches drawn from
the same 5,000 QM9 molecules. "End to end" adds the data pipeline (reading, batching and the
neighbour list); "model" reuses batches built beforehand.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
from common import SETTINGS

from atomlens import units
from atomlens.data.dataset import PackedDataset, make_loader
from atomlens.data.sources.qm9 import load_qm9
from atomlens.models.potential import ModelConfig, build_model
from atomlens.training.config import preset
from atomlens.training.train import fit_statistics, train

HERE = Path(__file__).resolve().parent
PRESETS = {
    "schnet": "qm9-u0-schnet",
    "schnet-neurips": "qm9-u0-schnet-neurips",
    "dtnn": "qm9-u0-dtnn",
}


#: wall time, or the CPU time of the calling thread (all the work when torch has one thread)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def machine() -> dict:
    """Where and when a figure was taken: cores, threads, load (1-minute average)."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------- accuracy
def accuracy(args) -> dict:
    """Train with the model's QM9 preset for ``args.minutes`` and evaluate on the test split."""
    config = preset(PRESETS[args.model]).updated(
        target=args.target,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        max_minutes=args.minutes,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        batch_size=args.train_batch_size,
        ema_decay=args.ema_decay,
        loss=args.loss,
        weight_decay=args.weight_decay,
        devices=args.processes,
        strategy=("ddp_spawn_shm" if args.reduce == "shm" else "ddp_spawn")
        if args.processes > 1
        else None,
        seed=args.seed,
        threads=args.threads,
        progress=False,
        test_subset=args.test_subset,
        device="cpu" if args.device == "cpu" else "gpu",
        out=args.out or f"runs/bench-qm9-{args.model}-{args.target}-{args.n_train}",
    )
    if args.representation:  # e.g. cutoff=6.0: the preset's representation with these changed
        kwargs = dict(config.model.representation_kwargs)
        for item in args.representation:
            key, _, value = item.partition("=")
            kwargs[key] = type(kwargs[key])(value) if key in kwargs else float(value)
        config = config.updated(**{"model.representation_kwargs": kwargs})
    data = PackedDataset.load(args.data) if args.data else load_qm9()
    start = time.perf_counter()
    members = []
    if args.ensemble:  # K members on one split, P at a time; the committee's errors
        from atomlens.training.ensemble import MANIFEST, train_ensemble

        members = train_ensemble(
            config, args.ensemble, data=data, overwrite=True, parallel=args.parallel
        )
        committee = json.loads((Path(config.out) / MANIFEST).read_text())["committee"]
        metrics = {**members[0], **committee}
        metrics["n_test_evaluated"] = committee["n_evaluated"]
    else:
        metrics = train(config, data=data, overwrite=True)  # a benchmark re-runs
    wall = time.perf_counter() - start
    mae, rmse = metrics[f"{args.target}_mae"], metrics[f"{args.target}_rmse"]
    record = {
        "benchmark": "qm9",
        "model": args.model,
        "preset": PRESETS[args.model],
        "target": args.target,
        "n_train": metrics["n_train"],
        "n_val": metrics["n_val"],
        "n_test": metrics["n_test"],
        "epochs": metrics["epochs"],
        "optimizer_steps": _optimizer_steps(Path(config.out)),
        "budget_minutes": args.minutes,
        "wall_s": round(wall, 1),
        "lr": config.lr,
        "lr_schedule": config.lr_schedule,
        "batch_size": config.batch_size,
        "ema_decay": config.ema_decay,
        "loss": config.loss,
        "weight_decay": config.weight_decay,
        "processes": args.processes,
        "reduce": args.reduce if args.processes > 1 else None,
        "device": args.device,
    }
    if args.data:  # a subset's test molecules are not QM9's: said beside the figure
        record["data"] = str(args.data)
    if args.representation:
        record["representation_kwargs"] = config.model.representation_kwargs
    if members:
        outs = [Path(config.out) / f"model_{k}" for k in range(len(members))]
        record.update(
            ensemble=len(members),
            parallel=args.parallel,
            epochs=[m["epochs"] for m in members],
            optimizer_steps=[_optimizer_steps(o) for o in outs],
            member_test_mae_meV=[round(v * 1e3, 2) for v in metrics[f"member_{args.target}_mae"]],
            committee_spread_mean_meV=round(metrics[f"{args.target}_spread_mean"] * 1e3, 2),
        )
    if metrics.get("unit") == "eV":
        record.update(
            test_mae_meV=round(mae * 1e3, 2),
            test_rmse_meV=round(rmse * 1e3, 2),
            test_mae_kcal_mol=round(mae / units.KCAL_MOL_EV, 4),
        )
    else:
        record.update(test_mae=mae, test_rmse=rmse, unit=metrics.get("unit"))
    record.update(out=str(config.out), n_test_evaluated=metrics["n_test_evaluated"], **machine())
    if args.peers:  # SchNetPack on the same molecules, split, threads and budget
        from time_to_accuracy import schnetpack_run

        peer_config = config.updated(lr=args.peer_lr)  # None: the same learning rate
        peer = schnetpack_run(Path(config.out), data, args.minutes, args.threads, peer_config)
        record["schnetpack"] = peer
        if metrics.get("unit") == "eV":
            record["schnetpack_test_mae_meV"] = round(peer["energy_mae_eV"] * 1e3, 2)
        record["mae_ratio_atomlens_schnetpack"] = round(mae / peer["energy_mae_eV"], 3)
    emit(record)
    return record


def _optimizer_steps(out: Path) -> int | None:
    """Training steps done, from the run's CSV log (``epochs`` counts epochs begun)."""
    logs = sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda f: f.stat().st_mtime)
    if not logs:
        return None
    with logs[-1].open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("step")]
    return max(steps) + 1 if steps else None


# -------------------------------------------------------------------------------- throughput
class AtomlensBench:
    """Times atomlens training steps and inference on random batches of fixed molecules."""

    library = "atomlens"

    def __init__(
        self,
        data: PackedDataset,
        indices: np.ndarray,
        batch_size: int,
        seed: int = 0,
        warmup: int = 2,
        device: str = "cpu",
    ):
        self.data, self.indices, self.batch_size, self.seed = data, indices, batch_size, seed
        self.warmup, self.device = warmup, torch.device(device)
        self.setups: dict[str, dict] = {}

    def _setup(self, setting: str) -> dict:
        if setting in self.setups:
            return self.setups[setting]
        kwargs = SETTINGS[setting]
        torch.manual_seed(self.seed)
        model = build_model(
            ModelConfig(
                representation="schnet",
                representation_kwargs=kwargs,
                head_hidden=kwargs["n_atom_basis"] // 2,
                target="U0",
            )
        )
        fit_statistics(model, self.data, self.indices)
        model.to(self.device)
        loader = make_loader(
            self.data, self.indices, self.batch_size, model.cutoff, shuffle=True, seed=self.seed
        )
        state = {
            "model": model,
            "loader": loader,
            "iterator": iter(loader),
            "optimizer": torch.optim.Adam(model.parameters(), lr=5e-4),
        }
        state["fixed"] = [self._next(state).to(self.device) for _ in range(10)]
        self.setups[setting] = state
        for mode in ("train", "infer"):  # warm-up: allocator, first-call overheads
            for pipeline in ("e2e", "model"):
                self._run(state, mode, pipeline, self.warmup)
        return state

    @staticmethod
    def _next(state: dict):
        try:
            return next(state["iterator"])
        except StopIteration:  # next epoch, reshuffled
            state["iterator"] = iter(state["loader"])
            return next(state["iterator"])

    def _run(self, state: dict, mode: str, pipeline: str, n_batches: int) -> int:
        model, optimizer, fixed = state["model"], state["optimizer"], state["fixed"]
        molecules = 0
        for k in range(n_batches):
            batch = self._next(state) if pipeline == "e2e" else fixed[k % len(fixed)]
            batch = batch.to(self.device)  # (e2e: from the loader's CPU tensors)
            if mode == "train":
                model.train()
                optimizer.zero_grad(set_to_none=True)
                loss = (model(batch)["U0"] - batch.targets["U0"]).pow(2).mean()
                loss.backward()
                optimizer.step()
            else:
                model.eval()
                with torch.inference_mode():
                    model(batch)
            if self.device.type == "cuda":  # the step has run, not only been queued
                torch.cuda.synchronize(self.device)
            molecules += batch.n_structures
        return molecules

    def measure(
        self,
        setting: str,
        mode: str,
        pipeline: str,
        seconds: float,
        min_batches: int = 3,
        clock: str = "wall",
    ) -> dict:
        """Run batches for at least ``seconds`` and ``min_batches``; molecules per second.

        ``clock="cpu"`` counts this thread's CPU time instead of wall time (with one torch
        thread, all the work): a figure that other jobs on a shared machine do not change.
        """
        state = self._setup(setting)
        now = CLOCKS[clock]
        molecules, batches, start = 0, 0, now()
        while batches < min_batches or now() - start < seconds:
            molecules += self._run(state, mode, pipeline, 1)
            batches += 1
        wall = now() - start
        return {"mol_per_s": molecules / wall, "wall_s": wall, "n_batches": batches}


class PeerWorker:
    """A peer benchmark in its own process, driven by one JSON command per line."""

    def __init__(self, library: str, cmd: list[str], env: dict):
        self.library = library
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()  # the worker announces itself when ready

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.library} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def measure(
        self,
        setting: str,
        mode: str,
        pipeline: str,
        seconds: float,
        min_batches: int = 3,
        clock: str = "wall",
    ) -> dict:
        command = {
            "setting": setting,
            "hyperparameters": SETTINGS[setting],
            "mode": mode,
            "pipeline": pipeline,
            "seconds": seconds,
            "min_batches": min_batches,
            "clock": clock,
        }
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def start_schnetpack(data: PackedDataset, indices: np.ndarray, args) -> PeerWorker:
    """Write the benchmark molecules for SchNetPack and start its worker in its venv."""
    sys.path.insert(0, str(HERE / "peers"))
    from spk_env import ensure_venv

    python = args.peer_python or ensure_venv()
    workdir = Path(args.peer_dir or tempfile.mkdtemp(prefix="atomlens-qm9-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    molecules = data.subset(indices)
    npz = workdir / f"qm9-{len(indices)}-seed{args.seed}.npz"
    np.savez(
        npz,
        numbers=np.asarray(molecules.numbers),
        positions=np.asarray(molecules.positions),
        offsets=molecules.offsets,
        U0=np.asarray(molecules.targets["U0"]),
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.peer_wait_policy == "default":  # as SchNetPack's users run it (libgomp spins)
        env.pop("OMP_WAIT_POLICY", None)
    else:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.peer_malloc:  # the allocator settings atomlens makes for itself (atomlens.runtime)
        from atomlens.runtime import allocator_environment

        env.update(allocator_environment())
    cmd = [
        str(python),
        str(HERE / "peers" / "schnetpack_qm9.py"),
        "--molecules",
        str(npz),
        "--db",
        str(npz.with_suffix(".db")),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--neighbor-list",
        args.neighbor_list,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--serve",
    ]
    log(f"starting SchNetPack worker: {' '.join(cmd)}")
    return PeerWorker("schnetpack", cmd, env)


def throughput(args) -> list[dict]:
    """Interleaved repeats of every (setting, mode, pipeline) for atomlens and the peers.

    With ``--background N`` every repeat runs twice, alone and beside N busy processes
    (:mod:`busy`), and each record gives the loaded / idle fraction per library.
    """
    from busy import background_load

    data = PackedDataset.load(args.data) if args.data else load_qm9()
    rng = np.random.default_rng(args.seed)
    indices = np.sort(rng.choice(len(data), size=args.n_molecules, replace=False))
    benches = [AtomlensBench(data, indices, args.batch_size, args.seed, args.warmup, args.device)]
    if args.peers:
        benches.append(start_schnetpack(data, indices, args))
    settings = args.settings.split(",")
    cases = [(s, m, p) for s in settings for m in ("train", "infer") for p in ("e2e", "model")]
    backgrounds = [0, args.background] if args.background else [0]
    times = {(c, n): {b.library: [] for b in benches} for c in cases for n in backgrounds}
    loads: list[float] = []
    try:
        for r in range(args.repeats):
            for n_busy in backgrounds:
                with background_load(n_busy, args.background_seconds):
                    for case in cases:
                        # alternate who goes first, so a drift in load favours neither
                        for bench in benches if r % 2 == 0 else benches[::-1]:
                            result = bench.measure(
                                *case,
                                seconds=args.seconds,
                                min_batches=args.min_batches,
                                clock=args.clock,
                            )
                            times[case, n_busy][bench.library].append(result["mol_per_s"])
                            log(
                                f"repeat {r} busy {n_busy} {bench.library:10s} "
                                f"{' '.join(case):20s} {result['mol_per_s']:8.1f} mol/s  "
                                f"load {os.getloadavg()[0]:.2f}"
                            )
                        loads.append(os.getloadavg()[0])
    finally:
        for bench in benches:
            if isinstance(bench, PeerWorker):
                bench.close()
    env = machine()
    env["load_1min"] = {"min": round(min(loads), 2), "max": round(max(loads), 2)}
    env["uptime"] = subprocess.run(
        ["uptime"], capture_output=True, text=True, check=False
    ).stdout.strip()
    env["wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    env["device"] = args.device
    if args.device != "cpu":
        env["device_name"] = torch.cuda.get_device_name(args.device)
    records = []
    for ((setting, mode, pipeline), n_busy), per_library in times.items():
        record = {
            "benchmark": "qm9-throughput",
            "setting": setting,
            "hyperparameters": SETTINGS[setting],
            "mode": mode,
            "pipeline": pipeline,
            "batch_size": args.batch_size,
            "n_molecules": args.n_molecules,
            "clock": args.clock,
            "repeats": args.repeats,
            "min_batches": args.min_batches,
            "min_seconds": args.seconds,
            "background_processes": n_busy,
        }
        for library, values in per_library.items():
            record[f"{library}_mol_per_s"] = round(statistics.median(values), 1)
            record[f"{library}_range"] = [round(min(values), 1), round(max(values), 1)]
            if n_busy:  # per repeat: loaded / idle of the same repeat, then the median
                idle = times[(setting, mode, pipeline), 0][library]
                fractions = [b / a for a, b in zip(idle, values)]
                record[f"{library}_fraction_of_idle"] = round(statistics.median(fractions), 3)
        record["fair_share"] = (
            round(args.threads / max(args.threads + n_busy, 1), 3) if n_busy else 1.0
        )
        if args.peers:
            ours, theirs = per_library["atomlens"], per_library["schnetpack"]
            ratios = [a / b for a, b in zip(ours, theirs)]
            record["ratio_atomlens_schnetpack"] = round(statistics.median(ratios), 2)
            record["ratio_range"] = [round(min(ratios), 2), round(max(ratios), 2)]
        record.update(env)
        if args.peers:
            record["schnetpack"] = benches[1].info
            record["peer_malloc_tuned"] = args.peer_malloc
            record["peer_wait_policy"] = args.peer_wait_policy
        emit(record)
        records.append(record)
    return records


# --------------------------------------------------------------------------------- profiling
def profile(args) -> None:
    """Where a training step's time goes, at the first of ``--settings``.

    ``--clock wall``: torch.profiler's table. ``--clock cpu`` (use with ``--threads 1``): every
    aten op timed by the CPU time of the thread, grouped by op and by whether its inputs have
    a pair dimension; unlike wall time this does not change when other jobs share the cores.
    """
    data = load_qm9()
    indices = np.sort(
        np.random.default_rng(args.seed).choice(len(data), args.n_molecules, replace=False)
    )
    bench = AtomlensBench(data, indices, args.batch_size, args.seed, args.warmup)
    setting = args.settings.split(",")[0]
    state = bench._setup(setting)
    if args.clock == "wall":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            bench._run(state, "train", args.profile_pipeline, args.profile_steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    n_atoms = state["fixed"][0].n_atoms
    spent: dict[tuple[str, str], int] = collections.defaultdict(int)

    class OpCPUTime(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.thread_time_ns()
            out = func(*args, **(kwargs or {}))
            pairs = any(
                isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 2 * n_atoms for a in args
            )
            spent[(func.__name__.split(".")[0], "pairs" if pairs else "atoms")] += (
                time.thread_time_ns() - start
            )
            return out

    start = time.thread_time_ns()
    with OpCPUTime():
        bench._run(state, "train", args.profile_pipeline, args.profile_steps)
    total = time.thread_time_ns() - start
    print(
        f"{args.profile_steps} training steps ({setting}, {args.profile_pipeline}): "
        f"{total / 1e9:.2f} CPU-s; outside aten ops {1 - sum(spent.values()) / total:.1%}"
    )
    for (op, kind), ns in sorted(spent.items(), key=lambda kv: -kv[1])[: args.profile_rows]:
        print(f"{op:28s} {kind:6s} {ns / total:6.1%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="schnet")
    parser.add_argument("--target", default="U0")
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument(
        "--n-test", type=int, default=None, help="test molecules (default: all the rest)"
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget (wall clock)")
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's")
    parser.add_argument(
        "--lr-schedule",
        choices=["plateau", "cosine"],
        default=None,
        help="default: the preset's (plateau); cosine decays to the end of the budget",
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=None, help="accuracy: default the preset's"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="accuracy: exponential moving average of the weights (e.g. 0.999; default none)",
    )
    parser.add_argument(
        "--loss", choices=["mse", "mae"], default=None, help="accuracy: default the preset's (mse)"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="accuracy: decoupled weight decay (AdamW; default the preset's, none)",
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=None,
        metavar="K",
        help="accuracy: train K members (seeds seed..seed+K-1) on one split within the budget "
        "and report the committee's test error (the mean of the members) and each member's",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="accuracy, with --ensemble: members trained at a time, one process each",
    )
    parser.add_argument(
        "--representation",
        action="append",
        metavar="KEY=VALUE",
        help="accuracy: change one of the preset's representation settings (e.g. cutoff=6.0)",
    )
    parser.add_argument("--out", default=None, help="run folder (default runs/bench-qm9-...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="accuracy: data-parallel training processes on the CPU (DDP; each takes its "
        "share of every batch with --threads threads); SchNetPack keeps one process",
    )
    parser.add_argument(
        "--reduce",
        choices=("shm", "gloo"),
        default="shm",
        help="with --processes: reductions through shared memory (strategy ddp_spawn_shm) "
        "or gloo's sockets (ddp_spawn)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, ... (throughput: both libraries; accuracy: atomlens only)",
    )
    parser.add_argument(
        "--data", default=None, help="a packed QM9 folder instead of qm9pack's (a subset)"
    )
    parser.add_argument(
        "--peer-python", default=None, help="python that imports SchNetPack (default: its venv)"
    )
    parser.add_argument("--throughput", action="store_true", help="measure molecules per second")
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also SchNetPack: interleaved (--throughput), else trained side by "
        "side on the same split and budget (time to accuracy)",
    )
    parser.add_argument(
        "--peer-lr",
        type=float,
        default=None,
        help="accuracy: SchNetPack's learning rate (default: atomlens's, same "
        "hyperparameters); e.g. 5e-4, its own QM9 default",
    )
    parser.add_argument(
        "--test-subset",
        type=int,
        default=10000,
        help="accuracy: test molecules evaluated (a random subset)",
    )
    parser.add_argument("--settings", default="128/6,64/3", help=f"of {sorted(SETTINGS)}")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--n-molecules",
        type=int,
        default=5000,
        help="throughput: random QM9 molecules the batches are drawn from",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="per timed measurement")
    parser.add_argument("--min-batches", type=int, default=3, help="per timed measurement")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: CPU time of the main thread (needs --threads 1); "
        "immune to other jobs on a shared machine",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per case")
    parser.add_argument(
        "--neighbor-list",
        choices=["matscipy", "ase"],
        default="matscipy",
        help="SchNetPack's neighbour-list transform",
    )
    parser.add_argument(
        "--peer-malloc",
        action="store_true",
        help="run SchNetPack with atomlens's glibc malloc settings too",
    )
    parser.add_argument(
        "--peer-wait-policy",
        choices=["default", "passive"],
        default="default",
        help="SchNetPack's OpenMP wait policy (default: libgomp's own, as its users run it)",
    )
    parser.add_argument(
        "--background",
        type=int,
        default=0,
        metavar="N",
        help="throughput: also measure beside N busy processes (pure-Python "
        "spin loops), and report loaded / idle per library",
    )
    parser.add_argument(
        "--background-seconds",
        type=float,
        default=3600.0,
        help="the busy processes stop after this long at most",
    )
    parser.add_argument("--peer-dir", default=None, help="where the SchNetPack db is written")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler table of training steps at the first setting",
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--profile-pipeline", choices=["e2e", "model"], default="e2e")
    parser.add_argument("--profile-rows", type=int, default=30)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1 and not args.profile:
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1")
    if args.peers and args.device != "cpu" and not args.throughput:
        parser.error(
            "--peers trains SchNetPack on the CPU: time to accuracy on a GPU is "
            "atomlens's alone (no --peers)"
        )
    configure(threads=args.threads)
    if args.profile:
        profile(args)
    elif args.throughput:
        throughput(args)
    else:
        accuracy(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
