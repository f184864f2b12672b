"""MD17 protocol on the GFN2-xTB MD17-style sets: energy + force training, test MAEs.

Protocol (as in the SchNet papers): per molecule 1,000 training and 1,000 validation frames
drawn at random (seed), all other frames are the test set; SchNet with the ``md17-schnet``
preset (128 features, 6 interactions, 5 Angstrom cosine cutoff, rho = 0.01, batch 10), trained
within a wall-clock budget. Prints one JSON object per molecule: energy MAE (kcal/mol, meV)
and force MAE (kcal/mol/Angstrom, meV/Angstrom).

    python benchmarks/md17.py --molecules ethanol aspirin --minutes 8
    python benchmarks/md17.py --molecules aspirin --minutes 30 --peers   # and SchNetPack
    python benchmarks/md17.py --molecules aspirin --minutes 30 --peers --mace   # and MACE

The data are GFN2-xTB, not the PBE+vdW-TS of the original MD17: figures are not comparable
with published MD17 errors, only in kind.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from atomlens.cli.train import output_scale_from_text
from atomlens.registry import representation_names

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MOLECULES = ["ethanol", "malonaldehyde", "uracil", "aspirin"]


def offset_refit_mae(model_dir: Path, data, test_subset: int | None = None, seed: int = 0) -> float:
    """Test energy MAE (eV) after re-fitting the constant energy offset on the training split.

    With rho = 0.01 and a short budget the energy error is mostly one constant offset
    (MAE close to RMSE); the mean training-set error removes it, using training data only.
    """
    import numpy as np

    from atomlens.data.splits import load_split
    from atomlens.models import load_model
    from atomlens.models.inference import predict_dataset
    from atomlens.training.evaluate import bounded_subset

    model = load_model(model_dir)
    split = load_split(model_dir / "split.npz")
    energy = np.asarray(data.targets["energy"])
    offset = (
        predict_dataset(model, data, split["train"])["energy"] - energy[split["train"]]
    ).mean()
    test_idx = bounded_subset(split["test"], test_subset, seed)  # the frames train() evaluated
    test = predict_dataset(model, data, test_idx)["energy"] - offset
    return float(np.abs(test - energy[test_idx]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder holding md17-xtb/ (default: ../shared/data)"
    )
    parser.add_argument("--molecules", nargs="+", default=MOLECULES, choices=MOLECULES)
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per molecule")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--model", choices=representation_names(), default="schnet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lr-patience",
        type=int,
        default=5,
        help="epochs without improvement before halving the learning rate",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=["plateau", "cosine"],
        default=None,
        help="learning-rate schedule (default: the preset's); cosine decays over the budget",
    )
    parser.add_argument("--lr", type=float, default=None, help="default: the preset's")
    parser.add_argument(
        "--output-scale",
        type=output_scale_from_text,
        default=None,
        help="auto (the preset's: the RMS force), std (the energy's spread per atom) or a number",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--check-val-every", type=int, default=None, help="validate every n epochs (default 1)"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="exponential moving average of the weights (e.g. 0.99; default: the preset's, none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--test-subset",
        type=int,
        default=10000,
        help="test frames evaluated (a random subset of the test split)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also train SchNetPack (its own loop, its venv) on the same split, "
        "threads and budget; report both test MAEs",
    )
    parser.add_argument(
        "--peer-lr",
        type=float,
        default=None,
        help="SchNetPack's learning rate (default: atomlens's, same hyperparameters); e.g. "
        "5e-4, its own default, to compare with atomlens's recipe",
    )
    parser.add_argument(
        "--mace",
        action="store_true",
        help="also train a small MACE model (its own loop, its venv) on the same frames, "
        "split, threads and budget; report both test MAEs",
    )
    parser.add_argument(
        "--mace-args",
        default="",
        help="extra options for peers/mace_train.py, e.g. --mace-args='--num-channels 32' "
        "(default: its small-model defaults)",
    )
    parser.add_argument("--out", type=Path, help="keep the trained models here")
    args = parser.parse_args(argv)
    from atomlens.runtime import configure

    configure(threads=args.threads)  # before torch loads: threads, wait policy, allocator

    from atomlens.training.config import preset
    from atomlens.training.train import load_dataset, train
    from atomlens.units import KCAL_MOL_EV

    out_root = args.out or Path(tempfile.mkdtemp(prefix="md17-"))
    for name in args.molecules:
        path = args.data / "md17-xtb" / f"{name}.npz"
        if not path.is_file():
            print(f"{path}: not found; pass --data", file=sys.stderr)
            return 2
        config = preset(f"md17-{args.model}").updated(
            data=str(path),
            n_train=args.n_train,
            n_val=args.n_val,
            max_minutes=args.minutes,
            max_epochs=100000,
            lr_patience=args.lr_patience,
            lr_schedule=args.lr_schedule,
            lr=args.lr,
            output_scale=args.output_scale,
            batch_size=args.batch_size,
            check_val_every=args.check_val_every,
            ema_decay=args.ema_decay,
            threads=args.threads,
            seed=args.seed,
            out=str(out_root / name),
            progress=False,
            test_subset=args.test_subset,
        )
        data = load_dataset(config)
        start = time.perf_counter()
        metrics = train(config, data=data, overwrite=True)  # a benchmark re-runs
        seconds = time.perf_counter() - start
        energy, forces = metrics["energy_mae"], metrics["forces_mae"]
        refit = offset_refit_mae(Path(config.out) / "model", data, args.test_subset, args.seed)
        record = {
            "benchmark": "md17",
            "protocol": "MD17 random split (train/val/rest test)",
            "reference": "GFN2-xTB (shared/data/md17-xtb)",
            "molecule": name,
            "model": args.model,
            "preset": f"md17-{args.model}",
            "n_atoms": int(data.n_atoms_per[0]),
            "n_train": metrics["n_train"],
            "n_val": metrics["n_val"],
            "n_test": metrics["n_test"],
            "epochs": metrics["epochs"],
            "budget_minutes": args.minutes,
            "train_seconds": round(seconds, 1),
            "threads": args.threads,
            "seed": args.seed,
            "lr": config.lr,
            "output_scale": config.output_scale,
            "lr_schedule": config.lr_schedule,
            "batch_size": config.batch_size,
            "check_val_every": config.check_val_every,
            "ema_decay": config.ema_decay,
            "energy_mae_kcal_mol": energy / KCAL_MOL_EV,
            "energy_mae_meV": energy * 1000,
            "forces_mae_kcal_mol_A": forces / KCAL_MOL_EV,
            "forces_mae_meV_A": forces * 1000,
            "energy_mae_offset_refit_kcal_mol": refit / KCAL_MOL_EV,
            "n_test_evaluated": metrics["n_test_evaluated"],
        }
        if args.peers:  # SchNetPack on the same frames, split, threads and budget
            from time_to_accuracy import schnetpack_run

            peer_config = config.updated(lr=args.peer_lr)  # None: the same learning rate
            peer = schnetpack_run(Path(config.out), data, args.minutes, args.threads, peer_config)
            record.update(
                schnetpack=peer,
                energy_mae_ratio_atomlens_schnetpack=energy / peer["energy_mae_eV"],
                forces_mae_ratio_atomlens_schnetpack=forces / peer["forces_mae_eV_A"],
            )
        if args.mace:  # a small MACE on the same frames, split, threads and budget
            from time_to_accuracy import mace_run

            peer = mace_run(
                Path(config.out),
                data,
                args.minutes,
                args.threads,
                config,
                extra=shlex.split(args.mace_args),
            )
            record.update(
                mace=peer,
                energy_mae_ratio_atomlens_mace=energy / peer["energy_mae_eV"],
                forces_mae_ratio_atomlens_mace=forces / peer["forces_mae_eV_A"],
            )
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
