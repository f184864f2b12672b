"""Test MAE of SchNet for each of the 12 QM9 targets, a fixed number of epochs each.

    python benchmarks/qm9_targets.py --epochs 30 --n-train 10000 --threads 2
    python benchmarks/qm9_targets.py --targets gap mu --epochs 1 --n-train 200 --n-test 200

Each target is trained with the ``qm9-u0-schnet`` preset (the target switched; pooling,
references and the dipole output follow the data's declaration, see
``atomlens.training.adapt_to_data``), 1,000 molecules for validation (``--n-val``) and the
rest of QM9 (or ``--n-test``) for testing, of which a random 10,000 are evaluated (the
training default ``test_subset``). One JSON line per target on stdout: test MAE and
RMSE in the target's unit (eV targets also in meV and kcal/mol), the pooling and output used,
epochs, wall time and the machine's load. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from atomlens import units
from atomlens.data.sources.qm9 import QM9_TARGETS, load_qm9
from atomlens.models import load_model
from atomlens.training.config import preset
from atomlens.training.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets", nargs="+", default=list(QM9_TARGETS), choices=list(QM9_TARGETS)
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--n-test", type=int, help="default: the rest of QM9")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/qm9-targets")
    args = parser.parse_args()
    data = load_qm9()
    for target in args.targets:
        out = Path(args.out) / target
        config = preset("qm9-u0-schnet").updated(
            target=target,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            max_epochs=args.epochs,
            seed=args.seed,
            threads=args.threads,
            progress=False,
            device="cpu",
            out=str(out),
        )
        print(f"training {target} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        metrics = train(config, data=data)
        model = load_model(out / "model")
        record = {
            "benchmark": "qm9_targets",
            "target": target,
            "unit": metrics["unit"],
            "test_mae": metrics[f"{target}_mae"],
            "test_rmse": metrics[f"{target}_rmse"],
            "pooling": model.config.aggregation,
            "output": model.config.output,
            "epochs": metrics["epochs"],
            "n_train": metrics["n_train"],
            "n_test": metrics["n_test"],
            "n_test_evaluated": metrics["n_test_evaluated"],  # a bounded random subset
            "wall_s": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),
            "load_1min": round(os.getloadavg()[0], 2),
        }
        if metrics["unit"] == "eV":
            record.update(
                test_mae_meV=record["test_mae"] * 1e3,
                test_mae_kcal_mol=record["test_mae"] / units.KCAL_MOL_EV,
            )
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
