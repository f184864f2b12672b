"""ISO17 protocol on the GFN2-xTB ISO17-style sets: train on ``reference.db``, test on
``test_within.db`` (known isomers, unseen conformations) and ``test_other.db`` (unseen isomers).

SchNet with the ``md17-schnet`` hyperparameters (128 features, 6 interactions, 5 Angstrom
cutoff, rho = 0.01), trained on energies and forces within a wall-clock budget; a random
``--n-val`` frames of the reference set are held out for validation (early stopping, learning
rate schedule). Prints one JSON object per test set: energy MAE (kcal/mol, meV) and force MAE
(kcal/mol/Angstrom, meV/Angstrom).

    python benchmarks/iso17.py --minutes 8

The data are GFN2-xTB and much smaller than the original ISO17 (18 + 6 isomers, not 129):
figures are not comparable with published ISO17 errors, only in kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from atomlens.registry import representation_names

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="folder holding iso17-xtb/ (default: ../shared/data)",
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget")
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", choices=representation_names(), default="schnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr-patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep the trained model here")
    args = parser.parse_args(argv)
    from atomlens.runtime import configure

    configure(threads=args.threads)  # before torch loads: threads, wait policy, allocator

    from atomlens.data.sources import read_iso17
    from atomlens.models import load_model
    from atomlens.training.config import preset
    from atomlens.training.evaluate import evaluate
    from atomlens.training.train import train
    from atomlens.units import KCAL_MOL_EV

    folder = args.data / "iso17-xtb"
    files = {name: folder / f"{name}.db" for name in ("reference", "test_within", "test_other")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        print(f"not found: {missing}; pass --data", file=sys.stderr)
        return 2
    reference = read_iso17(files["reference"])
    out = args.out or Path(tempfile.mkdtemp(prefix="iso17-"))
    # ISO17 databases state their units (eV): the MD17 preset's kcal/mol default must go
    config = dataclasses.replace(preset(f"md17-{args.model}"), energy_unit=None, length_unit=None)
    config = config.updated(
        data=str(files["reference"]),
        n_train=len(reference) - args.n_val,
        n_val=args.n_val,
        n_test=0,
        batch_size=args.batch_size,
        max_minutes=args.minutes,
        max_epochs=100000,
        lr_patience=args.lr_patience,
        threads=args.threads,
        seed=args.seed,
        out=str(out),
        progress=False,
    )
    start = time.perf_counter()
    metrics = train(config, data=reference, overwrite=True)  # a benchmark re-runs
    seconds = time.perf_counter() - start
    model = load_model(out / "model")
    for name in ("test_within", "test_other"):
        test = read_iso17(files[name])
        result = evaluate(model, test, np.arange(len(test)), batch_size=100, forces=True)
        energy, forces = result["energy_mae"], result["forces_mae"]
        print(
            json.dumps(
                {
                    "benchmark": "iso17",
                    "test_set": name,
                    "reference": "GFN2-xTB (shared/data/iso17-xtb)",
                    "model": args.model,
                    "n_train": metrics["n_train"],
                    "n_val": metrics["n_val"],
                    "n_test": len(test),
                    "epochs": metrics["epochs"],
                    "budget_minutes": args.minutes,
                    "train_seconds": round(seconds, 1),
                    "threads": args.threads,
                    "seed": args.seed,
                    "energy_mae_kcal_mol": energy / KCAL_MOL_EV,
                    "energy_mae_meV": energy * 1000,
                    "forces_mae_kcal_mol_A": forces / KCAL_MOL_EV,
                    "forces_mae_meV_A": forces * 1000,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
