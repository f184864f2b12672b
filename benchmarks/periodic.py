"""Periodic systems, atomlens against SchNetPack 2.1.1: training speed, MD speed, accuracy.

Systems: bulk silicon (64 atoms, 2x2x2 conventional cells) and liquid water (64 molecules,
192 atoms, 0.997 g/cm^3), with GFN1-xTB reference data made by ``atomlens sample`` (MD of the
cell and of three randomly strained copies, energies, forces and stress of every frame):

    atomlens sample --xyz benchmarks/data/periodic/si64_start.extxyz --cells 4 --strain 0.02 \\
        --temperature 600 --frames 120 --every 2 --timestep 1.0 --equilibration 10 \\
        --threads 1 --out benchmarks/data/periodic/si64_gfn1.extxyz
    atomlens sample --xyz benchmarks/data/periodic/water64_start.extxyz --cells 4 \\
        --strain 0.02 --temperature 350 --frames 120 --every 2 --timestep 0.5 \\
        --equilibration 5 --threads 1 --out benchmarks/data/periodic/water64_gfn1.extxyz

(``--make-starts`` writes the two start structures; each set takes 280 GFN1-xTB calls of 6-7
CPU-seconds here, and both are committed). Measured, for both libraries with the
same SchNet hyperparameters (128 features, 6 interactions, 128 filters, 20 Gaussians, 5
Angstrom cosine cutoff, head 128 -> 64 -> 1), float32, batch size, threads and split:

(a) training throughput (structures/s): forward, forces and stress by autograd, the loss
    w_E MSE(E) + w_F MSE(F) + w_S MSE(sigma), double backward, one Adam step, each through
    its own data pipeline (atomlens: packed dataset, vesin lists cached per structure;
    SchNetPack: ASE db, matscipy lists per sample);
(b) MD (steps/s): ASE ``VelocityVerlet`` (0.5 fs) with each library's ASE calculator;
(c) accuracy after the same training budget (``--fit-seconds``, on the chosen clock):
    test MAE of the energy per atom, forces and stress, 80/20 random split; both libraries
    then refit the per-atom energy offset on the training split (forces and stress do not
    see it, and with w_E = 0.01 it converges slowly), as ``atomlens train`` does.

Prints one JSON object per measurement and one per ratio.

    python benchmarks/periodic.py --threads 1 --clock cpu --seconds 10 --md-steps 50
    python benchmarks/periodic.py --threads 1 --clock cpu --fit-seconds 600 --measure fit
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
from common import CLOCKS, HYPERPARAMETERS, build_model, endless, timed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "periodic"
SYSTEMS = {"si64": "si64_gfn1.extxyz", "water64": "water64_gfn1.extxyz"}
#: loss weights of energy, forces and stress (atomlens's rho = w_E, 1 - rho = w_F)
WEIGHTS = (0.01, 0.99, 100.0)


def make_starts(folder: Path = DATA) -> None:
    """The two start structures: diamond Si 2x2x2 and 64 randomly oriented waters on a grid."""
    from ase import Atoms
    from ase.build import bulk, molecule
    from ase.io import write

    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "si64_start.extxyz", bulk("Si", "diamond", a=5.43, cubic=True).repeat(2))
    side = (64 * 18.015 / 0.997 / 0.60221) ** (1 / 3)  # Angstrom, at 0.997 g/cm^3
    rng = np.random.default_rng(0)
    box = Atoms(cell=[side] * 3, pbc=True)
    for point in np.ndindex(4, 4, 4):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        water.translate((np.array(point) + 0.5) * side / 4 - water.get_center_of_mass())
        box += water
    write(folder / "water64_start.extxyz", box)


STARTS = {"si64": "si64_start.extxyz", "water64": "water64_start.extxyz"}


def unlabelled(system: str, n: int = 40, seed: int = 0):
    """Rattled copies of the start cell with random labels: for the speed measures only (the
    time of a training step does not depend on the values it fits), when the GFN1-xTB set
    has not been sampled yet."""
    from ase.io import read

    from atomlens.data import PackedDataset

    start = read(DATA / STARTS[system])
    rng = np.random.default_rng(seed)
    frames = [
        start.positions + rng.normal(scale=0.03, size=start.positions.shape) for _ in range(n)
    ]
    return PackedDataset.from_structures(
        [(start.numbers, r) for r in frames],
        {
            "energy": rng.normal(size=n),
            "forces": [rng.normal(size=(len(start), 3)) for _ in frames],
            "stress": rng.normal(scale=0.01, size=(n, 3, 3)),
        },
        {"energy": "eV", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"},
        per_atom=["forces"],
        cells=[start.cell.array] * n,
        pbc=[start.pbc] * n,
    )


def load(system: str, seed: int = 0, n_test: float = 0.2, labelled: bool = True):
    """(dataset, train indices, test indices, reference) of a system's GFN1-xTB frames, or of
    :func:`unlabelled` structures when the set is missing and ``labelled`` is not required."""
    from atomlens.data.sources import read_any

    path = DATA / SYSTEMS[system]
    if path.is_file():
        data, reference = (
            read_any(path, energy_unit="eV", length_unit="Angstrom"),
            "GFN1-xTB (tblite)",
        )
    elif labelled:
        raise SystemExit(f"{path} is missing: sample it first (see this script's docstring)")
    else:
        data, reference = unlabelled(system), "none (random labels: speed only)"
    order = np.random.default_rng(seed).permutation(len(data))
    cut = round(len(data) * (1 - n_test))
    return data, np.sort(order[:cut]), np.sort(order[cut:]), reference


def frames_file(data, train_idx, test_idx, path: Path) -> Path:
    """The frames as plain arrays for the peer (it must not import atomlens)."""
    n = int(data.n_atoms_per[0])
    np.savez(
        path,
        z=np.asarray(data.numbers[:n]),
        R=np.asarray(data.positions).reshape(-1, n, 3),
        cell=np.asarray(data.cell),
        E=np.asarray(data.targets["energy"]),
        F=np.asarray(data.targets["forces"]).reshape(-1, n, 3),
        S=np.asarray(data.targets["stress"]),
        train=train_idx,
        test=test_idx,
    )
    return path


def train(
    data, indices, batch_size: int, seconds: float, clock: str, lr: float = 5e-4, warmup: int = 2
):
    """Train with atomlens's model and loss until ``seconds`` of ``clock`` have passed."""
    from atomlens.data import make_loader
    from atomlens.training.train import fit_statistics

    model = build_model()
    fit_statistics(model, data, indices)
    model.train()
    loader = make_loader(data, indices, batch_size, model.cutoff, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    w_e, w_f, w_s = WEIGHTS

    stream = endless(loader)

    def step() -> int:
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        pred = model(batch, forces=True, stress=True)
        loss = (
            w_e * (pred["energy"] - batch.targets["energy"]).pow(2).mean()
            + w_f * (pred["forces"] - batch.targets["forces"]).pow(2).sum(-1).mean()
            + w_s * (pred["stress"] - batch.targets["stress"]).pow(2).sum((1, 2)).mean()
        )
        loss.backward()
        optimizer.step()
        return batch.n_structures

    structures, steps, elapsed = timed(step, seconds, clock, warmup)
    return model.eval(), steps, structures, elapsed


def test_errors(model, data, indices) -> dict:
    from atomlens.models.inference import predict_dataset

    pred = predict_dataset(model, data, indices, batch_size=4, forces=True, stress=True)
    n = data.n_atoms_per[indices]
    atoms = data.atom_index(indices)
    return {
        "energy_mae": float(np.abs((pred["energy"] - data.targets["energy"][indices]) / n).mean()),
        "forces_mae": float(np.abs(pred["forces"] - data.targets["forces"][atoms]).mean()),
        "stress_mae": float(np.abs(pred["stress"] - data.targets["stress"][indices]).mean()),
    }


def md_speed(data, steps: int, clock: str) -> dict:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    import atomlens
    from atomlens.md import draw_momenta

    atoms = data.atoms(0)
    atoms.calc = atomlens.Calculator(build_model())
    draw_momenta(atoms, 300, np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(10)  # warm-up
    now = CLOCKS[clock]
    start = now()
    dyn.run(steps)
    seconds = now() - start
    return {
        "steps_per_s": steps / seconds,
        "steps": steps,
        "seconds": seconds,
        "neighbour_list_builds": atoms.calc._neighbors.builds,
    }


def peer(frames: Path, args, measures: list[str]) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
    from spk_env import ensure_venv

    python = ensure_venv()
    command = [
        str(python),
        str(ROOT / "benchmarks" / "peers" / "schnetpack_periodic.py"),
        "--frames",
        str(frames),
        "--measure",
        *measures,
        "--threads",
        str(args.threads),
        "--clock",
        args.clock,
        "--batch-size",
        str(args.batch_size),
        "--seconds",
        str(args.seconds),
        "--fit-seconds",
        str(args.fit_seconds),
        "--md-steps",
        str(args.md_steps),
        "--weights",
        *map(str, WEIGHTS),
        "--hyperparameters",
        json.dumps(HYPERPARAMETERS),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=sorted(SYSTEMS))
    parser.add_argument(
        "--measure", nargs="+", choices=["train", "md", "fit"], default=["train", "md"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this thread's CPU time (use with --threads 1)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput window")
    parser.add_argument("--fit-seconds", type=float, default=300.0, help="training budget")
    parser.add_argument("--md-steps", type=int, default=50)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--make-starts",
        action="store_true",
        help="write the start structures for atomlens sample and exit",
    )
    args = parser.parse_args(argv)
    if args.make_starts:
        make_starts()
        return 0
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread's CPU time: use it with --threads 1")
    configure(threads=args.threads)
    for system in args.systems:
        data, train_idx, test_idx, reference = load(system, labelled="fit" in args.measure)
        common = {
            "system": system,
            "n_atoms": int(data.n_atoms_per[0]),
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "threads": args.threads,
            "clock": args.clock,
            "batch_size": args.batch_size,
            "reference": reference,
            **HYPERPARAMETERS,
        }
        ours = {}
        if "train" in args.measure:
            _, steps, structures, seconds = train(
                data, train_idx, args.batch_size, args.seconds, args.clock
            )
            ours["train"] = {"structures_per_s": structures / seconds, "steps": steps}
        if "md" in args.measure:
            ours["md"] = md_speed(data, args.md_steps, args.clock)
        if "fit" in args.measure:
            from atomlens.training.train import refit_offset

            model, steps, structures, _ = train(
                data, train_idx, args.batch_size, args.fit_seconds, args.clock
            )
            refit_offset(model, data, train_idx, args.batch_size)  # as atomlens train does
            ours["fit"] = {
                "steps": steps,
                "epochs": structures / len(train_idx),
                "budget_s": args.fit_seconds,
                **test_errors(model, data, test_idx),
            }
        for measure, result in ours.items():
            print(
                json.dumps({"measure": measure, "library": "atomlens", **common, **result}),
                flush=True,
            )
        if args.no_peer:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            theirs = peer(
                frames_file(data, train_idx, test_idx, Path(tmp) / "frames.npz"), args, list(ours)
            )
        for result in theirs:
            print(json.dumps({**result, "system": system}), flush=True)
            measure = result["measure"]
            key = {"train": "structures_per_s", "md": "steps_per_s"}.get(measure)
            if key:
                print(
                    json.dumps(
                        {
                            "measure": f"{measure}_ratio",
                            "system": system,
                            "atomlens_over_schnetpack": ours[measure][key] / result[key],
                        }
                    ),
                    flush=True,
                )
            else:
                print(
                    json.dumps(
                        {
                            "measure": "fit_ratio",
                            "system": system,
                            **{
                                f"{k}_atomlens_over_schnetpack": ours["fit"][k] / result[k]
                                for k in ("energy_mae", "forces_mae", "stress_mae")
                            },
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
