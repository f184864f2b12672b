"""SchNetPack 2.1.1 on periodic cells: the peer side of ``benchmarks/periodic.py``.

Runs in SchNetPack's own venv (``benchmarks/peers/spk_env.py``) and never imports atomlens.
Its own pipeline throughout: an ``ASEAtomsData`` db of the frames (cells and pbc), the
``MatScipyNeighborList`` transform (SchNetPack's default for periodic data) + ``CastTo32``,
``AtomsLoader``; SchNet (Gaussian RBF, cosine cutoff) with ``Strain`` and
``PairwiseDistances`` input modules, an ``Atomwise`` energy head and ``Forces(calc_stress=
True)``. A training step is forward, w_E MSE(E) + w_F MSE(F) + w_S MSE(sigma), double
backward, one Adam step. MD is ASE's ``VelocityVerlet`` with ``SpkCalculator``.

    python schnetpack_periodic.py --frames si.npz --measure train md fit --threads 1

``frames.npz``: ``z`` (n,), ``R`` (N, n, 3), ``cell`` (N, 3, 3) Angstrom, ``E`` (N,) eV,
``F`` (N, n, 3) eV/Angstrom, ``S`` (N, 3, 3) eV/Angstrom^3, ``train`` and ``test`` indices.
Prints one JSON object per measurement.
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

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


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
        input_modules=[spk.atomistic.Strain(), spk.atomistic.PairwiseDistances()],
        output_modules=[
            spk.atomistic.Atomwise(n_in=hp["n_atom_basis"], output_key="energy"),
            spk.atomistic.Forces(
                energy_key="energy", force_key="forces", calc_stress=True, stress_key="stress"
            ),
        ],
    )


def build_db(spk, frames: dict, path: Path, shift: float) -> None:
    from ase import Atoms

    atoms_list = [
        Atoms(numbers=frames["z"], positions=r, cell=c, pbc=True)
        for r, c in zip(frames["R"], frames["cell"])
    ]
    properties = [
        {"energy": np.array([e - shift]), "forces": f, "stress": s[None]}
        for e, f, s in zip(frames["E"], frames["F"], frames["S"])
    ]
    data = spk.data.ASEAtomsData.create(
        str(path),
        distance_unit="Ang",
        property_unit_dict={"energy": "eV", "forces": "eV/Ang", "stress": "eV/Ang/Ang/Ang"},
    )
    data.add_systems(properties, atoms_list)


def loader(spk, db: Path, hp: dict, indices, batch_size: int, shuffle: bool, seed: int = 0):
    trn = spk.transform
    data = spk.data.ASEAtomsData(
        str(db),
        load_properties=["energy", "forces", "stress"],
        transforms=[trn.MatScipyNeighborList(cutoff=hp["cutoff"]), trn.CastTo32()],
    )
    subset = torch.utils.data.Subset(data, [int(k) for k in indices])
    return spk.data.AtomsLoader(
        subset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )


def loss_of(pred, batch, weights) -> torch.Tensor:
    w_e, w_f, w_s = weights
    return (
        w_e * (pred["energy"] - batch["energy"]).pow(2).mean()
        + w_f * (pred["forces"] - batch["forces"]).pow(2).sum(-1).mean()
        + w_s * (pred["stress"] - batch["stress"]).pow(2).sum((1, 2)).mean()
    )


def train(
    spk,
    db: Path,
    hp: dict,
    indices,
    batch_size: int,
    seconds: float,
    weights,
    lr: float,
    clock: str,
    seed: int = 0,
    warmup: int = 2,
):
    """Train until ``seconds`` of the clock have passed; returns (model, steps, structures)."""
    torch.manual_seed(seed)
    model = build_model(spk, hp).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = loader(spk, db, hp, indices, batch_size, True, seed)

    def batches():
        while True:
            yield from data

    stream = batches()

    def step() -> int:
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss_of(model(dict(batch)), batch, weights).backward()
        optimizer.step()
        return len(batch["_n_atoms"])

    for _ in range(warmup):
        step()
    now = CLOCKS[clock]
    structures, steps, start = 0, 0, now()
    while steps < 5 or now() - start < seconds:
        structures += step()
        steps += 1
    return model, steps, structures, now() - start


def errors_of(spk, model, db: Path, hp: dict, indices, n_atoms: int) -> dict:
    """Signed errors over ``indices``: energy per atom (eV/atom), force and stress components."""
    errors = {"energy": [], "forces": [], "stress": []}
    model.eval()
    for batch in loader(spk, db, hp, indices, 4, False):
        pred = model(dict(batch))
        errors["energy"].append(((pred["energy"] - batch["energy"]) / n_atoms).detach())
        errors["forces"].append((pred["forces"] - batch["forces"]).detach().flatten())
        errors["stress"].append((pred["stress"] - batch["stress"]).detach().flatten())
    return {key: torch.cat(values) for key, values in errors.items()}


def training_offset(spk, model, db: Path, hp: dict, indices, n_atoms: int) -> float:
    """The per-atom energy offset that minimises the training error (eV/atom), as atomlens
    refits it after training (``atomlens.training.train.refit_offset``; every structure of a
    system has the same number of atoms, so it is the mean per-atom training error)."""
    return float(errors_of(spk, model, db, hp, indices, n_atoms)["energy"].mean())


def test_errors(spk, model, db: Path, hp: dict, indices, n_atoms: int, offset: float) -> dict:
    """Test MAEs, the energy per atom after subtracting the refitted ``offset``."""
    errors = errors_of(spk, model, db, hp, indices, n_atoms)
    errors["energy"] = errors["energy"] - offset
    return {f"{key}_mae": float(values.abs().mean()) for key, values in errors.items()}


def md_speed(spk, frames: dict, hp: dict, steps: int, workdir: Path, clock: str) -> dict:
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from schnetpack.interfaces import SpkCalculator

    torch.manual_seed(0)
    model_file = workdir / "spk_model.pt"
    torch.save(build_model(spk, hp).eval(), model_file)
    original_load = torch.load

    def load_full(*args, **kwargs):  # SchNetPack 2.1.1 pickles whole models
        kwargs.setdefault("weights_only", False)
        return original_load(*args, **kwargs)

    torch.load = load_full
    try:
        calc = SpkCalculator(
            model_file=str(model_file),
            neighbor_list=spk.transform.MatScipyNeighborList(cutoff=hp["cutoff"]),
            energy_key="energy",
            force_key="forces",
            energy_unit="eV",
            position_unit="Ang",
            device="cpu",
            dtype=torch.float32,
        )
    finally:
        torch.load = original_load
    atoms = Atoms(numbers=frames["z"], positions=frames["R"][0], cell=frames["cell"][0], pbc=True)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(10)  # warm-up
    now = CLOCKS[clock]
    start = now()
    dyn.run(steps)
    wall = now() - start
    return {"steps_per_s": steps / wall, "steps": steps, "seconds": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=Path, required=True)
    parser.add_argument(
        "--measure", nargs="+", default=["train", "md"], choices=["train", "md", "fit"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    parser.add_argument("--fit-seconds", type=float, default=300.0, help="training budget")
    parser.add_argument("--md-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--weights",
        type=float,
        nargs=3,
        default=[0.01, 0.99, 100.0],
        help="loss weights of energy, forces, stress",
    )
    parser.add_argument("--hyperparameters", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spk = import_schnetpack()
    hp = json.loads(args.hyperparameters)
    frames = dict(np.load(args.frames))
    n_atoms = len(frames["z"])
    common = {
        "library": "schnetpack",
        "version": "2.1.1",
        "threads": args.threads,
        "clock": args.clock,
        "n_atoms": n_atoms,
        "batch_size": args.batch_size,
        **hp,
    }
    shift = float(frames["E"][frames["train"]].mean())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_db(spk, frames, tmp / "frames.db", shift)
        if "train" in args.measure:
            _, steps, structures, seconds = train(
                spk,
                tmp / "frames.db",
                hp,
                frames["train"],
                args.batch_size,
                args.seconds,
                args.weights,
                args.lr,
                args.clock,
            )
            print(
                json.dumps(
                    {
                        "measure": "train",
                        **common,
                        "steps": steps,
                        "structures_per_s": structures / seconds,
                    }
                ),
                flush=True,
            )
        if "md" in args.measure:
            print(
                json.dumps(
                    {
                        "measure": "md",
                        **common,
                        **md_speed(spk, frames, hp, args.md_steps, tmp, args.clock),
                    }
                ),
                flush=True,
            )
        if "fit" in args.measure:
            model, steps, structures, seconds = train(
                spk,
                tmp / "frames.db",
                hp,
                frames["train"],
                args.batch_size,
                args.fit_seconds,
                args.weights,
                args.lr,
                args.clock,
            )
            db = tmp / "frames.db"
            offset = training_offset(spk, model, db, hp, frames["train"], n_atoms)
            errors = test_errors(spk, model, db, hp, frames["test"], n_atoms, offset)
            print(
                json.dumps(
                    {
                        "measure": "fit",
                        **common,
                        "steps": steps,
                        "epochs": structures / len(frames["train"]),
                        "budget_s": args.fit_seconds,
                        "refit_offset_eV_per_atom": offset,
                        **errors,
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
