"""Speed of energy+force training and of molecular dynamics, atomlens against SchNetPack 2.1.1.

(a) training throughput (structures/s): forward, forces by autograd, loss
    rho * MSE(E) + (1 - rho) * <|F - F^|^2>, double backward and one Adam step, through each
    library's own data pipeline, on aspirin (21 atoms) at batch sizes 10 and 32;
(b) MD speed (steps/s): ASE ``VelocityVerlet`` (0.5 fs) on one aspirin with each library's
    ASE calculator (``atomlens.Calculator``; ``schnetpack.interfaces.SpkCalculator``);
(c) with ``--replicas R``: R aspirin trajectories at once (``atomlens.batched_md``, one model
    call per step for all R) in molecule-steps/s, against R sequential SchNetPack ASE runs
    of the same length. Neither side logs per step (the ASE runs have no observer; the
    batched run records its observables at the first and last step).

Both use SchNetPack-style SchNet hyperparameters: 128 features, 6 interactions, 128 filters,
20 Gaussians, 5 Angstrom cosine cutoff, an atom-wise head 128 -> 64 -> 1, float32 and the same
number of torch threads; ``--setting 64/3``: the NeurIPS paper's size instead (64 features and
filters, 3 interactions, head 64 -> 32 -> 1). SchNetPack runs in its own venv (``benchmarks/peers/spk_env.py``)
through a subprocess. Prints one JSON object per measurement and one per ratio.

    python benchmarks/md_speed.py --threads 2            # atomlens and SchNetPack
    python benchmarks/md_speed.py --no-peer --profile    # atomlens only, with a profile
    python benchmarks/md_speed.py --replicas 32 --batch-sizes 10   # many trajectories at once
    python benchmarks/md_speed.py --rounds 2 ...   # both libraries twice, in alternating order
    python benchmarks/md_speed.py --replicas 32 --interleave 4 ...   # (c) alone, in 4 slices
    python benchmarks/md_speed.py --replicas 32 --interleave 4 --parts ...  # and the step's parts
    python benchmarks/md_speed.py --setting 64/3 ...   # the NeurIPS paper's SchNet, both libraries
    python benchmarks/md_speed.py --device cuda --replicas 32 1024   # on a GPU (both libraries)

On a GPU every training step ends with a synchronisation (as a loop that logs its loss does),
for both libraries; ``--peer-python`` runs SchNetPack with a given interpreter (one that can
import it) instead of its venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
from common import CLOCKS, HYPERPARAMETERS, SETTINGS, build_model, endless, synchronize, timed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def aspirin_frames(data: Path, n: int = 500) -> dict:
    """``n`` aspirin frames (eV, Angstrom) from md17-xtb, or rattled copies of an RDKit one."""
    from atomlens.units import KCAL_MOL_EV

    path = data / "md17-xtb" / "aspirin.npz"
    if path.is_file():
        d = np.load(path)
        return {
            "z": d["z"],
            "R": d["R"][:n],
            "E": d["E"][:n, 0] * KCAL_MOL_EV,
            "F": d["F"][:n] * KCAL_MOL_EV,
        }
    from atomlens.data.sampling import molecule_from_smiles  # no data: labels are random

    atoms = molecule_from_smiles(ASPIRIN)
    rng = np.random.default_rng(0)
    positions = atoms.positions + rng.normal(scale=0.05, size=(n, len(atoms), 3))
    return {
        "z": atoms.numbers,
        "R": positions,
        "E": rng.normal(size=n),
        "F": rng.normal(size=(n, len(atoms), 3)),
    }


def training_throughput(
    frames: dict,
    batch_size: int,
    seconds: float,
    rho: float = 0.01,
    warmup: int = 3,
    clock: str = "wall",
    device: str = "cpu",
    hyperparameters: dict = HYPERPARAMETERS,
) -> dict:
    from atomlens.data import PackedDataset, make_loader

    n = len(frames["R"])
    data = PackedDataset.from_structures(
        [(frames["z"], r) for r in frames["R"]],
        {"energy": frames["E"] - frames["E"].mean(), "forces": list(frames["F"])},
        {"energy": "eV", "forces": "eV/Angstrom"},
    )
    model = build_model(0, hyperparameters).train().to(device)
    loader = make_loader(data, np.arange(n), batch_size, model.cutoff, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    stream = endless(loader)

    def step() -> int:
        batch = next(stream).to(device)
        optimizer.zero_grad(set_to_none=True)
        pred = model(batch, forces=True)
        loss = (
            rho * (pred["energy"] - batch.targets["energy"]).pow(2).mean()
            + (1 - rho) * (pred["forces"] - batch.targets["forces"]).pow(2).sum(-1).mean()
        )
        loss.backward()
        optimizer.step()
        synchronize(device)
        return batch.n_structures

    structures, steps, wall = timed(step, seconds, clock, warmup)
    return {"structures_per_s": structures / wall, "steps": steps, "wall_s": wall}


def md_atoms(frames: dict):
    from ase import Atoms

    from atomlens.md import draw_momenta

    atoms = Atoms(numbers=frames["z"], positions=frames["R"][0])
    draw_momenta(atoms, 300, np.random.default_rng(0))
    return atoms


def md_speed(
    frames: dict,
    steps: int,
    clock: str = "wall",
    compile: bool | str = False,
    device: str = "cpu",
    hyperparameters: dict = HYPERPARAMETERS,
) -> dict:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import atomlens

    atoms = md_atoms(frames)
    model = build_model(0, hyperparameters).eval()
    atoms.calc = atomlens.Calculator(model, device=device, compile=compile)
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(50)  # warm-up (and, with compile, the one-off compilation)
    now = CLOCKS[clock]
    start = now()
    dyn.run(steps)
    wall = now() - start
    return {"steps_per_s": steps / wall, "steps": steps, "wall_s": wall}


def batched_aspirins(
    frames: dict,
    replicas: int,
    compile: bool | str,
    device: str,
    members: int = 1,
    hyperparameters: dict = HYPERPARAMETERS,
):
    """The benchmark's :class:`BatchedMD`: ``replicas`` aspirins, NVE at 0.5 fs from 300 K
    velocities, ``members`` differently seeded models (an ensemble beyond one)."""
    from atomlens.batched_md import BatchedMD

    models = [build_model(seed, hyperparameters).eval() for seed in range(members)]
    return BatchedMD(
        models[0] if members == 1 else models,
        [md_atoms(frames)] * replicas,
        timestep_fs=0.5,
        temperature_K=300,
        seed=0,
        compile=compile,
        device=device,
    )


def batched_md_speed(
    frames: dict,
    replicas: int,
    steps: int,
    clock: str = "wall",
    compile: bool | str = False,
    device: str = "cpu",
    members: int = 1,
    hyperparameters: dict = HYPERPARAMETERS,
) -> dict:
    """Molecule-steps/s of ``replicas`` aspirin trajectories in one :class:`BatchedMD`
    (``members`` > 1: an ensemble of that many differently seeded models)."""
    md = batched_aspirins(frames, replicas, compile, device, members, hyperparameters)
    md.run(10, progress=False)  # warm-up (and, with compile, the one-off compilation)
    now = CLOCKS[clock]
    start = now()
    # observables at the first and last step only: the SchNetPack runs attach no logger
    md.run(steps, interval=steps, progress=False)
    synchronize(device)
    wall = now() - start
    return {
        "molecule_steps_per_s": replicas * steps / wall,
        "replicas": replicas,
        "members": members,
        "steps": steps,
        "wall_s": wall,
    }


def profile(frames: dict, batch_size: int, hyperparameters: dict = HYPERPARAMETERS) -> None:
    """torch.profiler tables of 50 MD force calls and 5 training steps (to stderr)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import atomlens

    atoms = md_atoms(frames)
    atoms.calc = atomlens.Calculator(build_model(0, hyperparameters).eval())
    atoms.get_forces()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            atoms.positions[0, 0] += 1e-4
            atoms.get_forces()
    print("== MD: 50 force calls of aspirin", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        training_throughput(frames, batch_size, 0.0, warmup=0, hyperparameters=hyperparameters)
    print(f"== training: 5 steps at batch size {batch_size}", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def run_peer(
    frames: dict, args, md_runs: int | None = None, skip_training: bool = False
) -> list[dict]:
    """SchNetPack's legs in its venv; ``md_runs``: that many sequential MD runs instead of the
    smallest ``--replicas``; ``skip_training``: its MD legs only."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    from spk_env import ensure_venv

    python = args.peer_python or ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.npz"
        np.savez(path, **frames)
        command = [
            str(python),
            str(Path(__file__).resolve().parent / "peers" / "schnetpack_md.py"),
            "--frames",
            str(path),
            "--threads",
            str(args.threads),
            "--seconds",
            str(args.seconds),
            "--md-steps",
            str(args.md_steps),
            "--clock",
            args.clock,
            "--batch-sizes",
            *map(str, args.batch_sizes),
            "--hyperparameters",
            json.dumps(SETTINGS[args.setting]),
            "--md-runs",
            str(min(args.replicas, default=0) if md_runs is None else md_runs),
            "--device",
            args.device,
            *(["--skip", "train"] if skip_training else []),
        ]
        env = dict(os.environ)
        if args.peer_malloc:  # the allocator settings atomlens makes for itself
            from atomlens.runtime import allocator_environment

            env.update(allocator_environment())
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"SchNetPack worker failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder holding md17-xtb/ (default: ../shared/data)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        default="128/6",
        help="the compared SchNet: SchNetPack's QM9 default (128 features, 6 interactions) "
        "or the NeurIPS paper's (64, 3)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="per training measurement")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: count this thread's CPU time (needs --threads 1)",
    )
    parser.add_argument("--md-steps", type=int, default=500)
    parser.add_argument("--no-peer", action="store_true", help="skip SchNetPack")
    parser.add_argument(
        "--peer-malloc",
        action="store_true",
        help="run SchNetPack with atomlens's glibc malloc settings too",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also MD with atomlens.Calculator(compile=True)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[],
        help="also R trajectories at once (batched MD; several R: one line each) against "
        "R sequential SchNetPack runs (the smallest R); 32 in the issue's target",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (both libraries)")
    parser.add_argument(
        "--members",
        type=int,
        default=1,
        help="batched MD of an ensemble of this many models (atomlens; the ratio to "
        "SchNetPack's single-model runs is then not like for like)",
    )
    parser.add_argument(
        "--peer-python", default=None, help="python that imports SchNetPack (default: its venv)"
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables to stderr")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="only the batched comparison, in this many alternating slices: R trajectories "
        "for --md-steps / K steps, then R / K sequential SchNetPack runs, K times (both "
        "libraries measured under the same drift of the machine's speed)",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="with --interleave: then profile atomlens's batched step and print the time per "
        "step of its products, convolutions and softplus beside the step time that 20x "
        "SchNetPack's rate of the same run allows",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat both libraries' legs, alternating which goes first; with more than one, "
        "also the median of each ratio over the rounds",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1")
    configure(threads=args.threads)
    frames = aspirin_frames(args.data)
    common = {
        "library": "atomlens",
        "threads": args.threads,
        "clock": args.clock,
        "n_atoms": len(frames["z"]),
        "device": args.device,
        "setting": args.setting,
        **SETTINGS[args.setting],
    }
    if args.device != "cpu":
        common["device_name"] = torch.cuda.get_device_name(args.device)
    if args.interleave:
        return interleaved(frames, args, common)
    ratios: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        # alternate the order (atomlens first, then SchNetPack first, ...) so that a drift
        # of the machine's speed within a round does not favour one library
        peer_first = round_ % 2 == 1 and not args.no_peer
        peers = run_peer(frames, args) if peer_first else None
        ours = measure_atomlens(frames, args, {**common, "round": round_})
        if args.no_peer:
            continue
        if peers is None:
            peers = run_peer(frames, args)
        for peer in peers:
            peer["malloc_tuned"] = args.peer_malloc
            print(json.dumps({**peer, "round": round_}), flush=True)
        for name, ratio, target, extra in compare(ours, peers):
            # one median per batch size / replica count, not across them
            key = (name, extra.get("batch_size"), extra.get("replicas"))
            ratios.setdefault(key, []).append(ratio)
            line = {"measure": name, **extra, "threads": args.threads, "clock": args.clock}
            line["setting"] = args.setting
            line.update(round=round_, atomlens_over_schnetpack=ratio, target=target)
            print(json.dumps({**line, "met": ratio >= target}), flush=True)
    if args.rounds > 1:
        for (name, batch_size, replicas), values in ratios.items():
            median = float(np.median(values))
            summary = {"measure": f"{name}_median", "rounds": args.rounds, "ratios": values}
            if batch_size is not None:
                summary["batch_size"] = batch_size
            if replicas is not None:
                summary["replicas"] = replicas
            print(json.dumps({**summary, "atomlens_over_schnetpack": median}), flush=True)
    return 0


def measure_atomlens(frames: dict, args, common: dict) -> dict[tuple, float]:
    """atomlens's legs (one JSON line each); returns their rates by (measure, batch size)."""
    ours: dict[tuple, float] = {}
    device, hyperparameters = args.device, SETTINGS[args.setting]
    for batch_size in args.batch_sizes:
        result = training_throughput(
            frames,
            batch_size,
            args.seconds,
            clock=args.clock,
            device=device,
            hyperparameters=hyperparameters,
        )
        ours["train", batch_size] = result["structures_per_s"]
        print(
            json.dumps({"measure": "train", "batch_size": batch_size, **common, **result}),
            flush=True,
        )
    result = md_speed(
        frames, args.md_steps, args.clock, device=device, hyperparameters=hyperparameters
    )
    ours["md", None] = result["steps_per_s"]
    print(json.dumps({"measure": "md", **common, **result}), flush=True)
    # what a user gets without flags: atomlens.Calculator(model) / atomlens md (compile="auto":
    # on a GPU, a CUDA graph)
    result = md_speed(frames, args.md_steps, args.clock, "auto", device, hyperparameters)
    ours["md_default", None] = result["steps_per_s"]
    print(json.dumps({"measure": "md_default", **common, **result}), flush=True)
    if args.compile:
        result = md_speed(frames, args.md_steps, args.clock, True, device, hyperparameters)
        ours["md_compiled", None] = result["steps_per_s"]
        print(json.dumps({"measure": "md_compiled", **common, **result}), flush=True)
    for replicas in args.replicas:
        result = batched_md_speed(
            frames,
            replicas,
            args.md_steps,
            clock=args.clock,
            compile=True if args.compile else "auto",
            device=device,
            members=args.members,
            hyperparameters=hyperparameters,
        )
        ours["md_batched", replicas] = result["molecule_steps_per_s"]
        print(json.dumps({"measure": "md_batched", **common, **result}), flush=True)
    if args.profile:
        profile(frames, args.batch_sizes[0], hyperparameters)
    return ours


def interleaved(frames: dict, args, common: dict) -> int:
    """``--interleave K``: the batched comparison in K alternating slices (module doc (c));
    one JSON line per slice and library, then both libraries' totals and their ratio."""
    if len(args.replicas) != 1 or args.replicas[0] % args.interleave:
        raise SystemExit("--interleave K needs one --replicas R, a multiple of K")
    if args.md_steps % args.interleave:
        raise SystemExit("--interleave K needs --md-steps, a multiple of K")
    replicas, k = args.replicas[0], args.interleave
    totals = {"atomlens": [0.0, 0.0], "schnetpack": [0.0, 0.0]}  # molecule-steps, seconds
    for slice_ in range(k):
        ours = batched_md_speed(
            frames,
            replicas,
            args.md_steps // k,
            clock=args.clock,
            compile=True if args.compile else "auto",
            device=args.device,
            hyperparameters=SETTINGS[args.setting],
        )
        print(json.dumps({"measure": "md_batched", **common, **ours, "slice": slice_}), flush=True)
        totals["atomlens"][0] += ours["replicas"] * ours["steps"]
        totals["atomlens"][1] += ours["wall_s"]
        for peer in run_peer(frames, args, md_runs=replicas // k, skip_training=True):
            if peer["measure"] != "md_sequential":
                continue
            print(json.dumps({**peer, "slice": slice_}), flush=True)
            totals["schnetpack"][0] += peer["runs"] * peer["steps"]
            totals["schnetpack"][1] += peer["wall_s"]
    rates = {name: done / seconds for name, (done, seconds) in totals.items()}
    for name, rate in rates.items():
        print(
            json.dumps(
                {
                    "measure": "md_batched_total",
                    "library": name,
                    "slices": k,
                    "molecule_steps_per_s": rate,
                    "clock": args.clock,
                }
            ),
            flush=True,
        )
    ratio = rates["atomlens"] / rates["schnetpack"]
    line = {"measure": "md_batched_interleaved_ratio", "replicas": replicas, "slices": k}
    line["setting"] = args.setting
    line.update(threads=args.threads, clock=args.clock, atomlens_over_schnetpack=ratio)
    print(json.dumps({**line, "target": 20.0, "met": ratio >= 20.0}), flush=True)
    if args.parts:
        parts = step_parts(
            frames, replicas, args.md_steps // k, args.compile, args.device, SETTINGS[args.setting]
        )
        budget = 1e3 * replicas / (20.0 * rates["schnetpack"])  # ms per step for 20x
        floor = parts["products_ms"] + parts["convolution_ms"] + parts["softplus_ms"]
        line = {"measure": "md_batched_step_parts", "replicas": replicas, **parts}
        line["setting"] = args.setting
        line.update(step_ms=1e3 * replicas / rates["atomlens"], budget_20x_ms=budget)
        line.update(products_convolution_softplus_ms=floor, rest_of_budget_ms=budget - floor)
        print(json.dumps({**line, "threads": args.threads, "clock": args.clock}), flush=True)
    return 0


#: torch.profiler's operators of each part of the batched step (self time)
STEP_PARTS = {
    "products": ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm"),
    "convolution": ("atomlens::tabulated_cfconv", "atomlens::tabulated_cfconv_backward"),
    "softplus": ("atomlens::shifted_softplus", "atomlens::shifted_softplus_backward"),
}


def step_parts(
    frames: dict, replicas: int, steps: int, compile: bool, device: str, hyperparameters: dict
) -> dict:
    """ms per step of the batched step's parts (:data:`STEP_PARTS`, the operators' self
    time in torch.profiler, which counts wall time: an idle machine's one thread), over
    ``steps`` steps after a warm-up; ``profiled_ms``: all operators' self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    md = batched_aspirins(frames, replicas, True if compile else "auto", device, 1, hyperparameters)
    md.run(30, progress=False)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        md.run(steps, interval=steps, progress=False)
    events = prof.key_averages()
    self_us = {event.key: event.self_cpu_time_total for event in events}
    parts = {
        f"{part}_ms": sum(self_us.get(name, 0.0) for name in names) / 1e3 / steps
        for part, names in STEP_PARTS.items()
    }
    calls = sum(event.count for event in events if event.key in STEP_PARTS["products"])
    return {
        **parts,
        "product_calls": calls / steps,
        "profiled_ms": sum(self_us.values()) / 1e3 / steps,
    }


def compare(ours: dict[tuple, float], peers: list[dict]):
    """(name, atomlens / SchNetPack, target, extra fields) for every leg both libraries ran."""
    for peer in peers:
        if peer["measure"] == "md_sequential":
            for (name, replicas), rate in ours.items():  # R at once / sequential runs
                if name == "md_batched":
                    extra = {"replicas": replicas, "peer_runs": peer["runs"]}
                    yield "md_batched_ratio", rate / peer["molecule_steps_per_s"], 20.0, extra
            continue
        key = (peer["measure"], peer.get("batch_size"))
        rate = "structures_per_s" if peer["measure"] == "train" else "steps_per_s"
        target = 3.0 if peer["measure"] == "train" else 5.0
        yield f"{peer['measure']}_ratio", ours[key] / peer[rate], target, {"batch_size": key[1]}
        for name in ("md_default", "md_compiled"):
            if key == ("md", None) and (name, None) in ours:
                yield f"{name}_ratio", ours[name, None] / peer[rate], target, {}


if __name__ == "__main__":
    sys.exit(main())
