"""SchNetPack 2.1.1 trained with its own training loop for a wall-clock budget: the peer side
of ``benchmarks/qm9.py --peers`` and ``benchmarks/md17.py --peers`` (time to accuracy).

Runs in SchNetPack's own venv (``benchmarks/peers/spk_env.py``) and never imports atomlens.
Input: an npz written by the atomlens side with ``numbers``, ``positions`` (Angstrom),
``offsets``, ``energy`` (eV), optionally ``forces`` (eV/Angstrom), the split ``train_idx``,
``val_idx``, ``test_idx`` and ``atomref`` (eV per element, Z = 0..99; zeros for none). The
recipe is SchNetPack's own: an ``ASEAtomsData`` db with the atom references in its metadata,
``AtomsDataModule`` with the given split, ``ASENeighborList`` + ``RemoveOffsets`` (atom
references and the per-atom mean) + ``CastTo32``, SchNet with an ``Atomwise`` head (and
``Forces`` for energy+force training), ``AtomisticTask`` with MSE losses (energy weight
``rho``), Adam with ``ReduceLROnPlateau`` on the validation loss, and a
Lightning ``Trainer`` with ``max_time`` = the budget. The best checkpoint is then evaluated
on the test split. Prints one JSON line: test MAEs in eV (and eV/Angstrom).
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


def build_db(spk, arrays, db: Path, forces: bool) -> None:
    from ase import Atoms

    offsets = arrays["offsets"]
    atoms_list, property_list = [], []
    for m in range(len(offsets) - 1):
        a, b = offsets[m], offsets[m + 1]
        atoms_list.append(Atoms(numbers=arrays["numbers"][a:b], positions=arrays["positions"][a:b]))
        properties = {"energy": np.array([arrays["energy"][m]], dtype=np.float64)}
        if forces:
            properties["forces"] = np.asarray(arrays["forces"][a:b], dtype=np.float64)
        property_list.append(properties)
    units = {"energy": "eV", **({"forces": "eV/Ang"} if forces else {})}
    data = spk.data.ASEAtomsData.create(
        str(db),
        distance_unit="Ang",
        property_unit_dict=units,
        atomrefs={"energy": [float(v) for v in arrays["atomref"][:100]]},
    )
    data.add_systems(property_list, atoms_list)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="npz written by atomlens")
    parser.add_argument("--minutes", type=float, required=True, help="training budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-patience", type=int, default=25)
    parser.add_argument("--rho", type=float, default=0.01, help="energy weight with forces")
    parser.add_argument("--forces", action="store_true")
    parser.add_argument(
        "--hyperparameters",
        default='{"n_atom_basis": 128, "n_interactions": 6, '
        '"n_filters": 128, "n_rbf": 20, "cutoff": 5.0}',
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spk = import_schnetpack()
    import pytorch_lightning as pl
    import torchmetrics

    trn = spk.transform
    hp = json.loads(args.hyperparameters)
    arrays = dict(np.load(args.data))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="spk-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    db, split = workdir / "data.db", workdir / "split.npz"
    db.unlink(missing_ok=True)
    build_db(spk, arrays, db, args.forces)
    np.savez(
        split, train_idx=arrays["train_idx"], val_idx=arrays["val_idx"], test_idx=arrays["test_idx"]
    )
    pl.seed_everything(args.seed, workers=True)
    cutoff = hp["cutoff"]
    datamodule = spk.data.AtomsDataModule(
        str(db),
        batch_size=args.batch_size,
        num_train=len(arrays["train_idx"]),
        num_val=len(arrays["val_idx"]),
        num_test=len(arrays["test_idx"]),
        split_file=str(split),
        transforms=[
            trn.ASENeighborList(cutoff=cutoff),
            trn.RemoveOffsets("energy", remove_mean=True, remove_atomrefs=True),
            trn.CastTo32(),
        ],
        num_workers=0,
        pin_memory=False,
        load_properties=["energy", "forces"] if args.forces else ["energy"],
    )
    datamodule.prepare_data()
    datamodule.setup()
    representation = spk.representation.SchNet(
        n_atom_basis=hp["n_atom_basis"],
        n_interactions=hp["n_interactions"],
        n_filters=hp["n_filters"],
        radial_basis=spk.nn.GaussianRBF(n_rbf=hp["n_rbf"], cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff),
    )
    heads = [spk.atomistic.Atomwise(n_in=hp["n_atom_basis"], output_key="energy")]
    if args.forces:
        heads.append(spk.atomistic.Forces(energy_key="energy", force_key="forces"))
    model = spk.model.NeuralNetworkPotential(
        representation=representation,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=heads,
        postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True, add_atomrefs=True)],
    )
    mae = {"MAE": torchmetrics.MeanAbsoluteError()}
    energy_weight = args.rho if args.forces else 1.0
    outputs = [
        spk.task.ModelOutput(
            name="energy", loss_fn=torch.nn.MSELoss(), loss_weight=energy_weight, metrics=dict(mae)
        )
    ]
    if args.forces:
        outputs.append(
            spk.task.ModelOutput(
                name="forces",
                loss_fn=torch.nn.MSELoss(),
                loss_weight=1.0 - args.rho,
                metrics={"MAE": torchmetrics.MeanAbsoluteError()},
            )
        )
    task = spk.task.AtomisticTask(
        model=model,
        outputs=outputs,
        optimizer_cls=torch.optim.Adam,
        # SchNetPack's ReduceLROnPlateau wrapper passes `verbose`, which torch 2.13's no
        # longer takes: the torch class it wraps, with the same arguments
        optimizer_args={"lr": args.lr},
        scheduler_cls=torch.optim.lr_scheduler.ReduceLROnPlateau,
        scheduler_args={"factor": 0.5, "patience": args.lr_patience, "min_lr": 1e-6},
        scheduler_monitor="val_loss",
    )
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=workdir / "checkpoints", monitor="val_loss", save_top_k=1
    )
    remaining = max(0.1, args.minutes * 60.0 - (time.perf_counter() - started))
    trainer = pl.Trainer(
        max_time={"seconds": remaining},
        max_epochs=100000,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
        accelerator="cpu",
        devices=1,
        inference_mode=False,
    )  # forces are gradients, also in test
    trainer.fit(task, datamodule=datamodule)
    trained_s = time.perf_counter() - started
    # the checkpoint (written by this run) pickles SchNetPack's model as a hyperparameter
    results = trainer.test(
        task, datamodule=datamodule, ckpt_path="best", verbose=False, weights_only=False
    )[0]
    record = {
        "library": "schnetpack",
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "train_wall_s": round(trained_s, 1),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "n_train": len(arrays["train_idx"]),
        "n_val": len(arrays["val_idx"]),
        "n_test": len(arrays["test_idx"]),
        "threads": args.threads,
        "energy_mae_eV": float(results["test_energy_MAE"]),
    }
    if args.forces:
        record["forces_mae_eV_A"] = float(results["test_forces_MAE"])
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
