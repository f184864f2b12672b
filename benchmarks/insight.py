"""Speed of the local chemical potential map: probe points per second, one JSON line per setting.

    python benchmarks/insight.py [--model runs/dtnn-qm9] [--threads 2] [--points 20000]

Without ``--model`` an untrained model with the ``qm9-u0-dtnn`` preset's hyperparameters is used
(speed does not depend on the weights). The molecule is benzene (ASE, 12 atoms), the probes
random points in a cube of 8 Angstrom around it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from atomlens.runtime import configure, prepare_environment

prepare_environment()  # before torch loads: libgomp reads its wait policy once

import numpy as np
import torch
from ase.build import molecule

from atomlens.insight.potential_map import probe_energies
from atomlens.models import build_model
from atomlens.training.config import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: untrained qm9-u0-dtnn preset)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--points", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure(threads=args.threads)
    if args.model:
        from atomlens.models.io import load_model

        base = load_model(args.model)
    else:
        base = build_model(preset("qm9-u0-dtnn").model).eval()
    atoms = molecule("C6H6")
    rng = np.random.default_rng(0)
    points = atoms.positions.mean(0) + rng.uniform(-4, 4, size=(args.points, 3))
    for dtype in (torch.float32, torch.float64):
        model = base.to(dtype)
        for chunk in (512, 2048, 8192):
            probe_energies(model, atoms, points[:chunk], "C", chunk_size=chunk)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                probe_energies(model, atoms, points, "C", chunk_size=chunk)
                times.append(time.perf_counter() - start)
            best = min(times)
            print(
                json.dumps(
                    {
                        "benchmark": "potential_map",
                        "representation": model.config.representation,
                        "cutoff": model.cutoff,
                        "molecule": atoms.get_chemical_formula(),
                        "n_points": args.points,
                        "chunk_size": chunk,
                        "dtype": str(dtype).replace("torch.", ""),
                        "threads": args.threads,
                        "best_s": round(best, 3),
                        "points_per_s": round(args.points / best),
                        "cpu": platform.processor() or platform.machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
