"""SchNetPack 2.1.1 energy+force training throughput and MD speed: the peer side of
``benchmarks/md_speed.py``.

Runs in SchNetPack's own venv (``benchmarks/peers/spk_env.py``) and never imports atomlens.
Training goes through SchNetPack's own data pipeline: an ``ASEAtomsData`` db of the given
frames, ``ASENeighborList`` + ``CastTo32`` per structure, ``AtomsLoader``; the model is its
SchNet (Gaussian RBF, cosine cutoff) with an ``Atomwise`` energy head and ``Forces``; one step
is forward, rho * MSE(E) + (1 - rho) * MSE(F), double backward, one Adam step. MD uses its
ASE calculator ``schnetpack.interfaces.SpkCalculator`` with ASE's ``VelocityVerlet``.

    python schnetpack_md.py --frames frames.npz --threads 2 --batch-sizes 10 32

``frames.npz`` holds ``z`` (n,), ``R`` (N, n, 3) Angstrom, ``E`` (N,) eV, ``F`` (N, n, 3)
eV/Angstrom. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from spk_env import import_schnetpack  # the script's folder is on sys.path


def build_model(spk, hp: dict):
    cutoff = hp["cutoff"]
    representation = spk.representation.SchNet(
        n_atom_basis=hp["n_atom_basis"],
        n_interactions=hp["n_interactions"],
        n_filters=hp["n_filters"],
        radial_basis=spk.nn.GaussianRBF(n_rbf=hp["n_rbf"], cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff),
    )
    return spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=hp["n_atom_basis"], output_key="energy"),
            spk.atomistic.Forces(energy_key="energy", force_key="forces"),
        ],
    )


def build_db(spk, frames: dict, path: Path):
    from ase import Atoms

    energy = frames["E"] - frames["E"].mean()  # keeps the loss sane; speed is unaffected
    atoms_list = [Atoms(numbers=frames["z"], positions=r) for r in frames["R"]]
    properties = [{"energy": np.array([e]), "forces": f} for e, f in zip(energy, frames["F"])]
    data = spk.data.ASEAtomsData.create(
        str(path), distance_unit="Ang", property_unit_dict={"energy": "eV", "forces": "eV/Ang"}
    )
    data.add_systems(properties, atoms_list)


#: wall time, or this thread's CPU time (with one torch thread: immune to a busy machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def training_throughput(
    spk,
    db: Path,
    hp: dict,
    batch_size: int,
    seconds: float,
    rho: float = 0.01,
    seed: int = 0,
    warmup: int = 3,
    clock: str = "wall",
    device: str = "cpu",
) -> dict:
    trn = spk.transform
    data = spk.data.ASEAtomsData(
        str(db),
        load_properties=["energy", "forces"],
        transforms=[trn.ASENeighborList(cutoff=hp["cutoff"]), trn.CastTo32()],
    )
    loader = spk.data.AtomsLoader(
        data,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    model = build_model(spk, hp).train().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def batches():
        while True:
            yield from loader

    stream = batches()

    def step() -> int:
        batch = {k: v.to(device) for k, v in next(stream).items()}
        optimizer.zero_grad(set_to_none=True)
        pred = model(dict(batch))
        loss = (
            rho * (pred["energy"] - batch["energy"]).pow(2).mean()
            + (1 - rho) * (pred["forces"] - batch["forces"]).pow(2).mean()
        )
        loss.backward()
        optimizer.step()
        if torch.device(device).type == "cuda":  # as atomlens's side: the step has run
            torch.cuda.synchronize(device)
        return len(batch["_n_atoms"])

    for _ in range(warmup):
        step()
    now = CLOCKS[clock]
    structures, steps, start = 0, 0, now()
    while steps < 5 or now() - start < seconds:
        structures += step()
        steps += 1
    wall = now() - start
    return {"structures_per_s": structures / wall, "steps": steps, "wall_s": wall}


def md_speed(
    spk,
    frames: dict,
    hp: dict,
    steps: int,
    workdir: Path,
    clock: str = "wall",
    runs: int = 0,
    device: str = "cpu",
) -> dict:
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from schnetpack.interfaces import SpkCalculator

    torch.manual_seed(0)
    model_file = workdir / "spk_model.pt"
    torch.save(build_model(spk, hp).eval(), model_file)
    original_load = torch.load

    def load_full(*args, **kwargs):  # SchNetPack 2.1.1 pickles whole models; torch >= 2.6
        kwargs.setdefault("weights_only", False)  # loads weights only by default
        return original_load(*args, **kwargs)

    torch.load = load_full
    try:
        calc = SpkCalculator(
            model_file=str(model_file),
            neighbor_list=spk.transform.ASENeighborList(cutoff=hp["cutoff"]),
            energy_key="energy",
            force_key="forces",
            energy_unit="eV",
            position_unit="Ang",
            device=device,
            dtype=torch.float32,
        )
    finally:
        torch.load = original_load
    atoms = Atoms(numbers=frames["z"], positions=frames["R"][0])
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(50)  # warm-up
    now = CLOCKS[clock]
    start = now()
    dyn.run(steps)
    wall = now() - start
    result = {"steps_per_s": steps / wall, "steps": steps, "wall_s": wall}
    if runs:  # what a user without batched MD does for R trajectories: one after the other
        start = now()
        for k in range(runs):
            atoms = Atoms(numbers=frames["z"], positions=frames["R"][0])
            atoms.calc = calc
            MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(k))
            VelocityVerlet(atoms, 0.5 * units.fs).run(steps)
        wall = now() - start
        result["sequential"] = {
            "runs": runs,
            "steps": steps,
            "wall_s": wall,
            "molecule_steps_per_s": runs * steps / wall,
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: count this thread's CPU time (needs --threads 1)",
    )
    parser.add_argument("--md-steps", type=int, default=200)
    parser.add_argument(
        "--hyperparameters",
        default='{"n_atom_basis": 128, "n_interactions": 6, '
        '"n_filters": 128, "n_rbf": 20, "cutoff": 5.0}',
    )
    parser.add_argument(
        "--md-runs",
        type=int,
        default=0,
        help="also time this many sequential MD runs of --md-steps each",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "md"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1")
    torch.set_num_threads(args.threads)
    spk = import_schnetpack()
    hp = json.loads(args.hyperparameters)
    frames = dict(np.load(args.frames))
    common = {
        "library": "schnetpack",
        "version": spk.__version__ if hasattr(spk, "__version__") else "2.1.1",
        "threads": args.threads,
        "clock": args.clock,
        "n_atoms": len(frames["z"]),
        "device": args.device,
        **hp,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "train" not in args.skip:
            build_db(spk, frames, tmp / "frames.db")
            for batch_size in args.batch_sizes:
                result = training_throughput(
                    spk,
                    tmp / "frames.db",
                    hp,
                    batch_size,
                    args.seconds,
                    clock=args.clock,
                    device=args.device,
                )
                print(
                    json.dumps({"measure": "train", "batch_size": batch_size, **common, **result}),
                    flush=True,
                )
        if "md" not in args.skip:
            result = md_speed(
                spk,
                frames,
                hp,
                args.md_steps,
                tmp,
                clock=args.clock,
                runs=args.md_runs,
                device=args.device,
            )
            sequential = result.pop("sequential", None)
            print(json.dumps({"measure": "md", **common, **result}), flush=True)
            if sequential:
                print(json.dumps({"measure": "md_sequential", **common, **sequential}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
