"""MACE (mace-torch) trained with its own training loop for a wall-clock budget: the MACE
side of ``benchmarks/md17.py --mace`` (time to accuracy).

Runs in MACE's own venv (``benchmarks/peers/mace_env.py``) and never imports atomlens.
Input: the npz that ``time_to_accuracy.write_peer_data`` writes: ``numbers``, ``positions``
(Angstrom), ``offsets``, ``energy`` (eV per structure), ``forces`` (eV/Angstrom), the split
``train_idx``, ``val_idx``, ``test_idx`` and ``atomref`` (eV per element, Z = 0..99).

Everything is MACE's own, built as ``mace_run_train`` builds it: the arguments are MACE's
argument parser with the flags below (so every setting not named keeps MACE's default),
``Configuration`` -> ``AtomicData.from_config`` (MACE's neighbour list) -> MACE's
``DataLoader``; ``configure_model`` (``--model MACE``, i.e. ``ScaleShiftMACE`` with the
RMS-force scale and the average neighbour count computed on the training split),
``get_loss_fn`` (``WeightedEnergyForcesLoss``: energy weight times the MSE of the energy per
atom, plus force weight times the force MSE), ``get_params_options`` / ``get_optimizer``
(Adam, AMSGrad, weight decay on the interaction and product weights), ``LRScheduler``
(``ReduceLROnPlateau`` on the validation loss), ``torch_ema`` EMA, MACE's
``CheckpointHandler`` (best validation loss, EMA weights) and ``mace.tools.train`` itself.

``mace.tools.train`` has no wall-clock limit, so the budget is put on its training loader:
batches are served until ``minutes`` minus the time of one validation pass (measured by
the validation ``train`` runs before the first epoch) have passed since the start, so the
last, partial epoch's validation and checkpoint still fit the budget; the epoch after that
stops ``train`` (``BudgetSpent``). The best checkpoint is then evaluated on the test split
with ``mace.tools.evaluate`` (stage two's best checkpoint if it has one, as
``mace_run_train`` does). Stage two (``--swa``, which MACE's README uses: energy weight 1000,
force weight 100, learning rate 1e-3 for about the last 20% of the epochs, "usually helps
lower the energy errors") starts at a fixed epoch in MACE; here it starts at the first epoch
boundary from which the next epoch would reach into the last ``--stage-two`` fraction (0.2)
of the training time.

Defaults (the "small" model and the MD17 recipe; see docs/benchmarks.md):
``--num_channels 64 --max_L 1`` (hidden irreps ``64x0e + 64x1o``: the README's recommended
``128x0e + 128x1o`` at half the channels), correlation 3, 2 interactions, r_max 5 Angstrom,
8 Bessel functions, 5 polynomial-cutoff terms, spherical harmonics to l = 3 (MACE's
defaults); energy weight 1 and force weight 1000, batch 5 (the MACE paper's rMD17 settings,
Batatia et al. 2022, appendix A.5.1), learning rate 0.01 (MACE's default); EMA decay 0.99,
AMSGrad (its README's example); float32 (its README: about 2x faster to train than the
float64 default).

Prints one JSON line: test energy MAE (eV per structure), force MAE (eV/Angstrom per
component), epochs, optimizer steps, parameters and hyperparameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class BudgetSpent(Exception):
    """Raised by the training loader when the wall-clock budget is used up."""


class BudgetedLoader:
    """MACE's training DataLoader, cut off at a wall-clock deadline.

    ``end`` is the end of the budget (``time.perf_counter()`` seconds). ``reserve`` (s) is
    kept free for the validation pass and checkpoint after the last, partial epoch; it is
    measured as the time from ``train_started`` (set just before ``mace.tools.train``) to
    the first epoch, which ``mace.tools.train`` spends validating the untrained model.

    ``stage_two(epoch)``, if given, is called once, after the first epoch at whose end the
    next epoch would reach into the last ``stage_two_fraction`` of the training time; it
    makes MACE's stage two start at that epoch (MACE starts it at a fixed epoch, about the
    last 20% of the epochs, which a wall-clock budget does not know in advance).
    """

    def __init__(self, loader, end: float, stage_two=None, stage_two_fraction: float = 0.2):
        self.loader, self.end = loader, end
        self.stage_two, self.stage_two_fraction = stage_two, stage_two_fraction
        self.train_started: float | None = None
        self.reserve: float | None = None
        self.stage_two_epoch: int | None = None
        self.steps = 0
        self.epochs = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        now = time.perf_counter()
        if self.reserve is None:
            self.reserve = now - (self.train_started or now)
            self.first_epoch_started = now
        deadline = self.end - self.reserve
        if now >= deadline:
            raise BudgetSpent
        self.epochs += 1
        for batch in self.loader:
            if time.perf_counter() >= deadline:
                return
            self.steps += 1
            yield batch
        self._maybe_stage_two(now, time.perf_counter(), deadline)

    def _maybe_stage_two(self, epoch_started: float, now: float, deadline: float) -> None:
        if self.stage_two is None or self.stage_two_epoch is not None:
            return
        switch = deadline - self.stage_two_fraction * (deadline - self.first_epoch_started)
        if now + (now - epoch_started) >= switch:  # the next epoch ends past the switch
            self.stage_two_epoch = self.epochs  # the index of the next epoch (from 0)
            self.stage_two(self.stage_two_epoch)


def configurations(data_module, arrays: dict, indices: np.ndarray) -> list:
    """MACE ``Configuration`` objects (no cell, no periodicity) for the given molecules."""
    offsets = arrays["offsets"]
    configs = []
    for m in indices:
        a, b = offsets[m], offsets[m + 1]
        configs.append(
            data_module.Configuration(
                atomic_numbers=np.asarray(arrays["numbers"][a:b], dtype=int),
                positions=np.asarray(arrays["positions"][a:b], dtype=np.float64),
                properties={
                    "energy": float(arrays["energy"][m]),
                    "forces": np.asarray(arrays["forces"][a:b], dtype=np.float64),
                },
                property_weights={"energy": 1.0, "forces": 1.0},
                cell=np.zeros((3, 3)),
                pbc=(False, False, False),
            )
        )
    return configs


def mace_arguments(args) -> argparse.Namespace:
    """MACE's own argument namespace, as ``mace_run_train`` would parse these flags."""
    from mace import tools

    flags = {
        "name": "mace",
        "model": "MACE",
        "num_channels": args.num_channels,
        "max_L": args.max_L,
        "correlation": args.correlation,
        "num_interactions": args.num_interactions,
        "r_max": args.r_max,
        "num_radial_basis": args.num_radial_basis,
        "batch_size": args.batch_size,
        "valid_batch_size": args.valid_batch_size,
        "lr": args.lr,
        "energy_weight": args.energy_weight,
        "forces_weight": args.forces_weight,
        "ema_decay": args.ema_decay,
        "default_dtype": args.dtype,
        "eval_interval": args.eval_interval,
        "seed": args.seed,
        "device": "cpu",
        "loss": "weighted",
    }
    argv = [f"--{k}={v}" for k, v in flags.items()] + ["--ema", "--amsgrad"]
    mace_args = tools.build_default_arg_parser().parse_args(argv)
    # as mace_run_train does (run_train_utils / arg_parser_tools): hidden irreps from
    # num_channels and max_L, and what an energy+force model computes
    mace_args.hidden_irreps = " + ".join(
        f"{args.num_channels}x{ell}{'e' if ell % 2 == 0 else 'o'}" for ell in range(args.max_L + 1)
    )
    mace_args.max_num_epochs = 10**9  # the wall-clock budget ends training
    mace_args.compute_energy, mace_args.compute_forces = True, True
    mace_args.compute_dipole, mace_args.compute_polarizability = False, False
    return mace_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="npz written by atomlens")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-channels", dest="num_channels", type=int, default=64)
    parser.add_argument("--max-L", dest="max_L", type=int, default=1)
    parser.add_argument("--correlation", type=int, default=3)
    parser.add_argument("--num-interactions", dest="num_interactions", type=int, default=2)
    parser.add_argument("--r-max", dest="r_max", type=float, default=5.0, help="Angstrom")
    parser.add_argument("--num-radial-basis", dest="num_radial_basis", type=int, default=8)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=5)
    parser.add_argument("--valid-batch-size", dest="valid_batch_size", type=int, default=50)
    parser.add_argument(
        "--eval-interval",
        dest="eval_interval",
        type=int,
        default=1,
        help="validate every N epochs (MACE's default: 1)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--energy-weight", dest="energy_weight", type=float, default=1.0)
    parser.add_argument("--forces-weight", dest="forces_weight", type=float, default=1000.0)
    parser.add_argument("--ema-decay", dest="ema_decay", type=float, default=0.99)
    parser.add_argument(
        "--stage-two",
        dest="stage_two",
        type=float,
        default=0.2,
        help="fraction of the training time at its end in MACE's stage two (--swa: energy "
        "weight 1000, force weight 100, lr 1e-3); 0: off",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from importlib.metadata import version

    from mace import data, modules, tools
    from mace.tools import torch_geometric
    from mace.tools.model_script_utils import configure_model
    from mace.tools.scripts_utils import (
        LRScheduler,
        get_loss_fn,
        get_optimizer,
        get_params_options,
        get_swa,
    )
    from torch_ema import ExponentialMovingAverage

    logging.basicConfig(level=logging.WARNING)  # MACE logs every epoch at INFO
    arrays = dict(np.load(args.data))
    if "forces" not in arrays:
        raise SystemExit(f"{args.data}: no 'forces' array; MACE is trained on energy+forces")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mace-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mace_args = mace_arguments(args)
    tools.set_seeds(args.seed)
    tools.set_default_dtype(args.dtype)
    device = torch.device("cpu")

    z_table = tools.AtomicNumberTable(sorted({int(z) for z in arrays["numbers"]}))
    heads = ["Default"]

    def dataset(key: str) -> list:
        return [
            data.AtomicData.from_config(c, z_table=z_table, cutoff=args.r_max, heads=heads)
            for c in configurations(data, arrays, arrays[key])
        ]

    train_set, valid_set = dataset("train_idx"), dataset("val_idx")
    loader = torch_geometric.dataloader.DataLoader
    train_loader = loader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    valid_loader = loader(valid_set, batch_size=args.valid_batch_size, shuffle=False)

    # E0s: atomlens's atom references (fitted on the same training split), as MACE's
    # --E0s would take them; MACE's own least-squares average where they are all zero
    atomref = np.asarray(arrays["atomref"], dtype=np.float64)
    if np.any(atomref[z_table.zs] != 0.0):
        e0s = {z: float(atomref[z]) for z in z_table.zs}
    else:
        train_configs = configurations(data, arrays, arrays["train_idx"])
        e0s = data.compute_average_E0s(train_configs, z_table)
    atomic_energies = np.array([e0s[z] for z in z_table.zs])

    loss_fn = get_loss_fn(mace_args, dipole_only=False, compute_dipole=False)
    mace_args.avg_num_neighbors = modules.compute_avg_num_neighbors(train_loader)
    model, output_args = configure_model(
        mace_args, train_loader, atomic_energies, heads=heads, z_table=z_table
    )
    model.to(device)
    optimizer = get_optimizer(mace_args, get_params_options(mace_args, model))
    lr_scheduler = LRScheduler(optimizer, mace_args)
    ema = ExponentialMovingAverage(model.parameters(), decay=mace_args.ema_decay)
    checkpoints = tools.CheckpointHandler(directory=str(workdir / "checkpoints"), tag="mace")
    logger = tools.MetricsLogger(directory=str(workdir / "results"), tag="mace_train")

    swa = None
    if args.stage_two > 0:  # MACE's --swa, its start epoch set when the time comes
        mace_args.start_swa = mace_args.max_num_epochs - 1
        swa, _ = get_swa(mace_args, model, optimizer, [False])

    def stage_two(epoch: int) -> None:
        swa.start = epoch
        checkpoints.io.swa_start = epoch  # stage-two checkpoints are named apart

    budgeted = BudgetedLoader(
        train_loader,
        end=started + args.minutes * 60.0,
        stage_two=stage_two if swa is not None else None,
        stage_two_fraction=args.stage_two,
    )
    budgeted.train_started = time.perf_counter()
    try:
        tools.train(
            model=model,
            loss_fn=loss_fn,
            train_loader=budgeted,
            valid_loaders={"Default": valid_loader},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            start_epoch=0,
            max_num_epochs=mace_args.max_num_epochs,
            patience=mace_args.patience,
            checkpoint_handler=checkpoints,
            logger=logger,
            eval_interval=mace_args.eval_interval,
            output_args=output_args,
            device=device,
            log_errors=mace_args.error_table,
            swa=swa,
            ema=ema,
            max_grad_norm=mace_args.clip_grad,
        )
    except BudgetSpent:
        pass
    trained_s = time.perf_counter() - started
    best_epoch, stage_two_used = None, False
    if budgeted.steps:
        # the best checkpoint of stage two if it has one, else of stage one, as
        # mace_run_train evaluates (mace itself sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
        state = tools.CheckpointState(model, optimizer, lr_scheduler)
        if budgeted.stage_two_epoch is not None:
            try:
                best_epoch = checkpoints.load_latest(state=state, swa=True, device=device)
                stage_two_used = True
            except (UnboundLocalError, ValueError):  # mace's error when there is none
                best_epoch = None
        if best_epoch is None:
            best_epoch = checkpoints.load_latest(state=state, swa=False, device=device)
    else:  # the budget ended during setup or the first validation: the untrained model
        best_epoch = None
    # the test set is built after the budget, as it is not part of training
    test_set = dataset("test_idx")
    test_loader = loader(test_set, batch_size=args.valid_batch_size, shuffle=False)
    _, metrics = tools.evaluate(
        model=model,
        loss_fn=loss_fn,
        data_loader=test_loader,
        output_args=output_args,
        device=device,
    )
    record = {
        "library": "mace",
        "version": version("mace-torch"),
        "torch": torch.__version__,
        "epochs": budgeted.epochs,
        "optimizer_steps": budgeted.steps,
        "best_epoch": best_epoch,
        "stage_two_from_epoch": budgeted.stage_two_epoch,
        "evaluated_stage_two": stage_two_used,
        "train_wall_s": round(trained_s, 1),
        "first_validation_s": round(budgeted.reserve or 0.0, 1),
        "total_wall_s": round(time.perf_counter() - started, 1),
        "n_train": len(train_set),
        "n_val": len(valid_set),
        "n_test": len(test_set),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "hyperparameters": {
            "model": "MACE (ScaleShiftMACE, mace_run_train --model MACE)",
            "hidden_irreps": mace_args.hidden_irreps,
            "correlation": args.correlation,
            "num_interactions": args.num_interactions,
            "max_ell": mace_args.max_ell,
            "r_max_A": args.r_max,
            "num_radial_basis": args.num_radial_basis,
            "num_cutoff_basis": mace_args.num_cutoff_basis,
            "MLP_irreps": mace_args.MLP_irreps,
            "radial_MLP": mace_args.radial_MLP,
            "loss": "WeightedEnergyForcesLoss (energy per atom)",
            "energy_weight": args.energy_weight,
            "forces_weight": args.forces_weight,
            "batch_size": args.batch_size,
            "valid_batch_size": args.valid_batch_size,
            "eval_interval": args.eval_interval,
            "lr": args.lr,
            "amsgrad": True,
            "weight_decay": mace_args.weight_decay,
            "scheduler": f"ReduceLROnPlateau(factor={mace_args.lr_factor}, "
            f"patience={mace_args.scheduler_patience})",
            "ema_decay": args.ema_decay,
            "stage_two": {
                "fraction_of_training_time": args.stage_two,
                "energy_weight": mace_args.swa_energy_weight,
                "forces_weight": mace_args.swa_forces_weight,
                "lr": mace_args.swa_lr,
            },
            "clip_grad": mace_args.clip_grad,
            "dtype": args.dtype,
            "E0s": {str(z): e for z, e in e0s.items()},
        },
        "energy_mae_eV": float(metrics["mae_e"]),
        "forces_mae_eV_A": float(metrics["mae_f"]),
    }
    if not budgeted.steps:
        record["note"] = (
            "budget spent before the first training step (setup and the first validation); "
            "the test MAEs are the untrained model's"
        )
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
