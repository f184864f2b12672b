"""SchNetPack 2.1.1 throughput on QM9 molecules: the peer side of ``benchmarks/qm9.py --peers``.

Runs in SchNetPack's own venv (``benchmarks/peers/spk_env.py``), never imports atomlens, and
uses SchNetPack's own data pipeline end to end: an ``ASEAtomsData`` SQLite db of the same
molecules, the neighbour-list transform (matscipy, SchNetPack's default, or ASE) and
``CastTo32`` per molecule, collated by ``AtomsLoader``. The model is SchNetPack's SchNet
(Gaussian RBF, cosine cutoff) with an ``Atomwise`` head (n -> n/2 -> 1), as in its QM9 recipe.

One training step = forward, mean squared error of U0, backward, one Adam step. The worker
speaks one JSON object per line: with ``--serve`` it reads commands
``{"setting", "hyperparameters", "mode": "train"|"infer", "pipeline": "e2e"|"model",
"seconds"}`` on stdin and answers ``{"mol_per_s", "wall_s", "n_batches"}``; without it, it
measures the settings given by ``--settings`` once and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from spk_env import import_schnetpack  # the script's folder is on sys.path

#: the settings of benchmarks/common.py (this venv does not import it), for standalone runs
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
PROPERTY = "energy_U0"
#: wall time, or the CPU time of the calling thread (all the work when torch has one thread)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def build_db(molecules: Path, db: Path) -> None:
    """Write the molecules of an npz (numbers, positions, offsets, U0 in eV) to an ASE db."""
    from ase import Atoms

    ASEAtomsData = import_schnetpack().data.ASEAtomsData

    arrays = np.load(molecules)
    offsets, energy = arrays["offsets"], arrays["U0"]
    counts = np.diff(offsets)
    # residual energies (per-atom mean removed) keep the loss in a sane range; speed is unaffected
    energy = energy - counts * (energy.sum() / counts.sum())
    atoms_list, property_list = [], []
    for m in range(len(counts)):
        a, b = offsets[m], offsets[m + 1]
        atoms_list.append(Atoms(numbers=arrays["numbers"][a:b], positions=arrays["positions"][a:b]))
        property_list.append({PROPERTY: np.array([energy[m]], dtype=np.float64)})
    tmp = db.with_suffix(".partial.db")
    tmp.unlink(missing_ok=True)
    data = ASEAtomsData.create(str(tmp), distance_unit="Ang", property_unit_dict={PROPERTY: "eV"})
    data.add_systems(property_list, atoms_list)
    tmp.replace(db)


class SchNetPackBench:
    library = "schnetpack"

    def __init__(
        self,
        db: Path,
        batch_size: int,
        seed: int,
        neighbor_list: str,
        warmup: int = 2,
        device: str = "cpu",
    ):
        self.device = torch.device(device)
        self.db, self.batch_size, self.seed, self.neighbor_list = (
            db,
            batch_size,
            seed,
            neighbor_list,
        )
        self.warmup = warmup
        self.setups: dict[str, dict] = {}

    def _setup(self, setting: str, hp: dict) -> dict:
        if setting in self.setups:
            return self.setups[setting]
        spk = import_schnetpack()
        trn = spk.transform

        cutoff = hp["cutoff"]
        nl = {"matscipy": trn.MatScipyNeighborList, "ase": trn.ASENeighborList}[self.neighbor_list]
        data = spk.data.ASEAtomsData(
            str(self.db), load_properties=[PROPERTY], transforms=[nl(cutoff=cutoff), trn.CastTo32()]
        )
        generator = torch.Generator().manual_seed(self.seed)
        loader = spk.data.AtomsLoader(
            data, batch_size=self.batch_size, shuffle=True, num_workers=0, generator=generator
        )
        torch.manual_seed(self.seed)
        representation = spk.representation.SchNet(
            n_atom_basis=hp["n_atom_basis"],
            n_interactions=hp["n_interactions"],
            n_filters=hp["n_filters"],
            radial_basis=spk.nn.GaussianRBF(n_rbf=hp["n_rbf"], cutoff=cutoff),
            cutoff_fn=spk.nn.CosineCutoff(cutoff),
        )
        model = spk.model.NeuralNetworkPotential(
            representation=representation,
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=hp["n_atom_basis"], output_key=PROPERTY)],
        )
        model.to(self.device)
        state = {
            "model": model,
            "loader": loader,
            "iterator": iter(loader),
            "optimizer": torch.optim.Adam(model.parameters(), lr=5e-4),
        }
        state["fixed"] = [self._on_device(self._next(state)) for _ in range(10)]
        self.setups[setting] = state
        for mode in ("train", "infer"):  # warm-up
            for pipeline in ("e2e", "model"):
                self._run(state, mode, pipeline, self.warmup)
        return state

    def _on_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    @staticmethod
    def _next(state: dict) -> dict:
        try:
            return next(state["iterator"])
        except StopIteration:
            state["iterator"] = iter(state["loader"])
            return next(state["iterator"])

    def _run(self, state: dict, mode: str, pipeline: str, n_batches: int) -> int:
        model, optimizer, fixed = state["model"], state["optimizer"], state["fixed"]
        molecules = 0
        for k in range(n_batches):
            batch = self._next(state) if pipeline == "e2e" else fixed[k % len(fixed)]
            batch = self._on_device(batch)  # (a new dict: the model writes into its inputs,
            inputs = dict(batch)  # and the fixed batches stay clean)
            if mode == "train":
                model.train()
                optimizer.zero_grad(set_to_none=True)
                loss = (model(inputs)[PROPERTY] - batch[PROPERTY]).pow(2).mean()
                loss.backward()
                optimizer.step()
            else:
                model.eval()
                with torch.inference_mode():
                    model(inputs)
            if self.device.type == "cuda":  # as atomlens's side: the step has run
                torch.cuda.synchronize(self.device)
            molecules += len(batch["_n_atoms"])
        return molecules

    def measure(
        self,
        setting: str,
        hp: dict,
        mode: str,
        pipeline: str,
        seconds: float,
        min_batches: int = 3,
        clock: str = "wall",
    ) -> dict:
        state = self._setup(setting, hp)
        now = CLOCKS[clock]
        molecules, batches, start = 0, 0, now()
        while batches < min_batches or now() - start < seconds:
            molecules += self._run(state, mode, pipeline, 1)
            batches += 1
        wall = now() - start
        return {"mol_per_s": molecules / wall, "wall_s": wall, "n_batches": batches}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", type=Path, required=True, help="npz written by qm9.py")
    parser.add_argument("--db", type=Path, required=True, help="ASE db (built if missing)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neighbor-list", choices=["matscipy", "ase"], default="matscipy")
    parser.add_argument("--serve", action="store_true", help="take commands on stdin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="128/6,64/3")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--min-batches", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.db.exists():
        build_db(args.molecules, args.db)
    schnetpack = import_schnetpack()
    bench = SchNetPackBench(
        args.db, args.batch_size, args.seed, args.neighbor_list, args.warmup, args.device
    )
    info = {
        "library": "schnetpack",
        "version": schnetpack.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "neighbor_list": args.neighbor_list,
        "device": args.device,
    }
    if args.serve:
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            result = bench.measure(
                command["setting"],
                command["hyperparameters"],
                command["mode"],
                command["pipeline"],
                command["seconds"],
                command.get("min_batches", 3),
                command.get("clock", "wall"),
            )
            print(json.dumps(result), flush=True)
        return 0
    for setting in args.settings.split(","):
        for mode in ("train", "infer"):
            for pipeline in ("e2e", "model"):
                result = bench.measure(
                    setting,
                    SETTINGS[setting],
                    mode,
                    pipeline,
                    args.seconds,
                    args.min_batches,
                    args.clock,
                )
                print(
                    json.dumps(
                        {
                            "benchmark": "qm9-throughput",
                            "setting": setting,
                            "mode": mode,
                            "pipeline": pipeline,
                            "batch_size": args.batch_size,
                            **info,
                            **result,
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
