"""Training orchestration: data -> split -> fitted statistics -> model -> Lightning -> saved model.

The output folder ``config.out`` holds

* ``split.npz``           the split (written first, reused on ``resume``)
* ``train_config.yaml``   the full training configuration
* ``checkpoints/``        Lightning checkpoints (``last.ckpt`` for resuming a killed run)
* ``logs/``               CSV metrics; ``tb/`` TensorBoard event files (with ``atomlens[tensorboard]``)
* ``model/``              the final model (config.json + model.safetensors + split.npz)
* ``metrics.json``        test metrics of the final model
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
    WeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..data.dataset import DataError, PackedDataset, make_loader
from ..data.splits import load_split, random_split, save_split
from ..data.statistics import fit_atomrefs, force_rms, residual_stats
from ..fileio import atomic_file
from ..models.io import load_model, save_model
from ..models.potential import AtomisticModel, build_model
from ..nn import cpu_kernels
from ..runtime import (
    end_with_parent,
    flush_subnormals,
    ignore_dependency_warnings,
    quiet_dependencies,
    quiet_loggers,
)
from . import run_folder, shared_memory
from .budget import MARGIN_S, SPAWN_MARGIN_S, BudgetStop, CosineToEnd
from .config import TrainConfig, save_config
from .evaluate import bounded_subset, evaluate, predict_until
from .module import AtomisticTask

shared_memory.register()  # the strategy names ddp_spawn_shm and ddp_shm

#: the test structures evaluated at the end of a run, with predicted and reference targets
PREDICTIONS = "test_predictions.npz"


#: what a run's config records as its data when train() was given a data set, not a name
GIVEN_DATA = "the data given to train()"


def load_dataset(
    config: TrainConfig,
    fixed_target: bool = False,
    opened: PackedDataset | None = None,
    source: str | None = None,
) -> PackedDataset:
    """The data set named by ``config.data`` (any spec of :func:`open_dataset`), checked
    for the target and the derivatives the config trains on. ``fixed_target``: the target
    is a saved model's (evaluate), not the user's choice, and the error says so.
    ``opened``: that data set already opened, checked here instead of read again;
    ``source``: what the messages call it (default ``config.data``). The data set returned
    is marked as read from ``config.data`` (its ``opened_from``) when it was, so that
    :func:`train` given it records that name as the run's data."""
    from ..data.sources.open import open_dataset

    name = config.data if source is None else source
    if opened is None and config.data == GIVEN_DATA:
        raise DataError(
            f"this run was trained on {GIVEN_DATA} in Python, which no file names: "
            f"give that data again (train(data=...)), or name its file with --data"
        )
    data = (
        opened
        if opened is not None
        else open_dataset(config.data, config.energy_unit, config.length_unit)
    )
    if config.target not in data.targets:
        others = data.model_targets
        if not others:
            raise DataError(
                f"{name}: the file holds no reference values to learn or score "
                f"(no {config.target!r}, no energies); predict needs none"
            )
        if fixed_target:
            raise DataError(
                f"{name}: the model predicts {config.target!r}, which this data "
                f"set does not hold (it has {', '.join(others)})"
            )
        raise DataError(
            f"{name}: unknown target {config.target!r}; this data set has "
            f"{sorted(data.targets)}: choose one with --target ({', '.join(others)})"
        )
    if config.forces and "forces" not in data.targets:
        raise DataError(f"{name}: forces requested but the data set has no forces")
    if config.stress and "stress" not in data.targets:
        raise DataError(f"{name}: stress requested but the data set has no stress")
    named = opened is None or opened.opened_from == config.data
    if config.max_structures is not None and config.max_structures < len(data):
        data = data.subset(np.arange(config.max_structures))
    if named:
        data.opened_from = config.data
    return data


def adapt_to_data(config: TrainConfig, data: PackedDataset) -> TrainConfig:
    """``config`` with the model's target, unit and pooling taken from the data.

    Pooling follows the data's declaration (:meth:`PackedDataset.is_extensive`): sum for
    extensive targets (with per-element references, see :func:`fit_statistics`), mean for
    intensive ones (no references). A target in debye (QM9 ``mu``) is the norm of a dipole
    vector and gets the ``"dipole"`` output (latent partial charges).
    """
    aggregation = "sum" if data.is_extensive(config.target) else "mean"
    unit = data.units.get(config.target, "")
    # a target in debye is a dipole moment norm: predicted from latent charges (dipole.py)
    output = "dipole" if unit == "Debye" else "scalar"
    overrides = {
        "model.target": config.target,
        "model.aggregation": aggregation,
        "model.output": output,
    }
    if unit:
        overrides["model.unit"] = unit
    return config.updated(**overrides)


def fit_statistics(
    model: AtomisticModel,
    data: PackedDataset,
    train_idx: np.ndarray,
    output_scale: str | float = "std",
    forces: bool = False,
) -> None:
    """Atom references (extensive targets) and residual shift/scale from the training split
    (none for a dipole model, whose head predicts charges in e).

    ``output_scale`` (:attr:`TrainConfig.output_scale`): ``"std"`` the residual standard
    deviation (per atom for extensive targets), ``"forces"`` the RMS force component times
    1 Angstrom (:func:`~atomlens.data.statistics.force_rms`), ``"auto"`` the latter if
    ``forces`` (training on forces) else the former, or a number (the target's unit).
    """
    target = model.target
    if model.config.output == "dipole":  # latent charges in e: no shift, scale or references
        model.set_statistics(None, shift=0.0, scale=1.0)
        return
    if model.config.aggregation == "sum":
        atomref = fit_atomrefs(data, train_idx, target, max_z=model.config.max_z)
        mean, std = residual_stats(data, train_idx, target, atomref, per_atom=True)
    else:
        atomref = None
        values = np.asarray(data.targets[target])[train_idx]
        mean, std = float(values.mean()), float(values.std())
    if output_scale == "auto":
        output_scale = "forces" if forces else "std"
    if output_scale == "std":
        scale = std if std > 0 else 1.0
    elif output_scale == "forces":
        if model.config.aggregation != "sum":
            raise ValueError("output_scale 'forces' needs an extensive (summed) energy model")
        scale = force_rms(data, train_idx)  # eV/Angstrom x 1 Angstrom
        scale = scale if scale > 0 else 1.0
    else:
        scale = float(output_scale)
    model.set_statistics(atomref, shift=mean, scale=scale)


def initial_model(config: TrainConfig, data: PackedDataset) -> AtomisticModel:
    """The saved model ``config.init_from`` to fine-tune, checked against the data.

    ``config`` is adapted to the data (:func:`adapt_to_data`). The model's architecture,
    weights and fitted statistics (atom references, shift, scale) are kept;
    ``config.refit_statistics`` refits the statistics on the new training split.

    The data's target may have another name than the model's (a QM9 ``U0`` model tuned on
    an MD17 file's ``energy``) if it is the same kind of quantity: the same unit, pooling
    (sum for extensive targets, mean for intensive ones) and output. The model then
    predicts the new name, and its statistics must be refit (``refit_statistics``): those
    of another quantity, or another level of theory, do not carry over.
    """
    model = load_model(config.init_from).float().train()
    unit = data.units.get(config.target, model.config.unit)
    if unit != model.config.unit:
        raise ValueError(
            f"{config.init_from}: the model predicts {model.config.unit}, "
            f"the data {config.target!r} is in {unit}"
        )
    if model.target != config.target:
        theirs, ours = model.config, config.model
        if (theirs.aggregation, theirs.output) != (ours.aggregation, ours.output):
            raise ValueError(
                f"{config.init_from}: the model predicts {model.target!r} "
                f"({theirs.aggregation} pooling, {theirs.output} output), the training "
                f"target {config.target!r} needs {ours.aggregation} pooling and "
                f"{ours.output} output: fine-tune a model of the same kind of quantity"
            )
        if not config.refit_statistics:
            raise ValueError(
                f"{config.init_from}: the model predicts {model.target!r}, the training "
                f"target is {config.target!r}: its atom references and scale belong to "
                f"{model.target!r}; fine-tune with --refit-statistics "
                f"(refit_statistics: true) to fit them to {config.target!r}"
            )
        model.config = dataclasses.replace(theirs, target=config.target)
    return model


def refit_offset(
    model: AtomisticModel,
    data: PackedDataset,
    train_idx: np.ndarray,
    batch_size: int = 100,
    deadline: float | None = None,
    seed: int = 0,
    progress: bool | None = False,
) -> float:
    """Least-squares per-atom offset of an extensive model on the training split.

    Forces do not see the zero of the energy, and with a small energy weight (rho = 0.01) the
    constant converges slowly; after training the shift is corrected by
    delta = sum_m err_m n_m / sum_m n_m^2 (err_m = predicted - reference), which is what
    minimises the training energy error over a per-atom constant. Returns delta (eV/atom).
    ``deadline`` (``time.monotonic()``): predict until the batch that passes it, the
    structures taken in a random order (``seed``), and fit on those.
    """
    train_idx, pred = predict_until(
        model, data, train_idx, batch_size, deadline, seed, progress, "refit offset"
    )
    err = pred[model.target] - np.asarray(data.targets[model.target])[train_idx]
    n = data.n_atoms_per[train_idx].astype(np.float64)
    delta = float((err * n).sum() / (n * n).sum())
    model.shift.sub_(delta)
    return delta


#: evaluation batches hold at most this many atoms unless the training batches are larger
EVAL_BATCH_ATOMS = 4000


class PackedDataModule(pl.LightningDataModule):
    """Loaders over one packed data set; each DDP rank takes its share of every global batch."""

    def __init__(
        self,
        data: PackedDataset,
        split: dict[str, np.ndarray],
        cutoff: float | None,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.data, self.split, self.cutoff = data, split, cutoff
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def eval_batch_size(self) -> int:
        """Validation and test batches: the training batch size, or larger (up to 100
        structures and EVAL_BATCH_ATOMS atoms), as evaluation keeps no graph across batches
        and small batches spend their time in per-call overhead."""
        counts = np.diff(self.data.offsets)
        largest = int(counts.max()) if len(counts) else 1
        return max(self.batch_size, min(100, EVAL_BATCH_ATOMS // max(largest, 1)))

    def _loader(self, name: str, shuffle: bool):
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return make_loader(
            self.data,
            self.split[name],
            self.batch_size if name == "train" else self.eval_batch_size(),
            self.cutoff,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
        )

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


def _make_split(config: TrainConfig, n: int, out: Path, resume: bool) -> dict[str, np.ndarray]:
    path = out / "split.npz"
    if resume and path.exists():
        try:
            return load_split(path, n)
        except DataError as err:  # a split of another data set: the run is another run
            raise run_folder.RunFolderError(
                f"{out}: --resume with a different run than the one there: its split does "
                f"not fit {config.data} ({n} structures; {err}). Resume with the original "
                f"data, or start afresh with --overwrite or another --out"
            ) from None
    split = new_split(config, n)
    save_split(path, split)
    return split


def new_split(config: TrainConfig, n: int) -> dict[str, np.ndarray]:
    """The random split of ``config`` for ``n`` structures; a fraction that leaves the
    training or validation split empty is refused by its option's name (it failed as
    "cannot iterate an empty split" once training had started)."""
    split = random_split(n, config.n_train, config.n_val, config.n_test, seed=config.seed)
    for name in ("train", "val"):
        if not len(split[name]):
            size = getattr(config, f"n_{name}")
            raise DataError(
                f"--n-{name} {size} (n_{name}) of {n} structures leaves the {name} split "
                f"empty; give a count of at least 1 or a larger fraction"
            )
    return split


def check_device(device: str) -> None:
    """A GPU asked for that torch does not see: a clear error before any work (Lightning's
    came as a traceback after the run folder was written, which then refused a retry)."""
    if device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here; use "
            f"--device cpu (or auto: a GPU when there is one)"
        )


def check_strategy(strategy) -> None:
    """An unknown strategy name: a clear error before any work (Lightning's came after the
    run folder was written)."""
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy not in known:
        raise ValueError(f"strategy {strategy!r}: unknown; known: {', '.join(known)}")


def train(
    config: TrainConfig,
    resume: bool = False,
    data: PackedDataset | None = None,
    overwrite: bool = False,
    split: dict[str, np.ndarray] | None = None,
    started: float | None = None,
    test_seed: int | None = None,
) -> dict:
    """Train a model as ``config`` says; returns the test metrics (internal units).

    With ``resume=True`` a run killed half-way goes on from ``checkpoints/last.ckpt``
    (only if it is the same run: see :mod:`.run_folder`); a folder holding another run is
    refused unless ``overwrite=True``. The folder is locked while the run lasts.
    ``split`` (train/val/test indices of ``data``) replaces the random split, e.g. one
    split shared by the members of an ensemble. Fine-tuning: ``config.init_from`` starts
    from a saved model's weights and statistics (see :func:`initial_model`).
    ``config.max_minutes`` bounds everything from ``started`` (``time.monotonic()``; default:
    now) to the saved model, the final evaluation included (see :mod:`.budget`).
    The test structures evaluated (``config.test_subset`` of the test split, drawn with
    ``test_seed``, default ``config.seed``; the members of an ensemble share one) and their
    predicted and reference targets are saved as ``OUT/test_predictions.npz``.
    """
    started = time.monotonic() if started is None else started
    deadline = started + 60.0 * config.max_minutes if config.max_minutes else None
    out = Path(config.out)
    check_device(config.device)  # before the folder is touched
    check_strategy(config.strategy)
    if not run_folder.is_primary_process():  # the primary process guards the folder
        with quiet_dependencies(), kept_random_state():
            return _train(config, resume, data, split, deadline, test_seed)
    refuse_model_folder_as_out(out, config.init_from)
    with run_folder.locked(out), quiet_dependencies(), kept_random_state():
        run_folder.prepare(out, resume, overwrite)
        return _train(config, resume, data, split, deadline, test_seed)


def refuse_model_folder_as_out(out: Path, init_from: str | None = None) -> None:
    """Refuse a run folder ``out`` that is, or lies inside, a saved model folder (its run
    would shadow the model: ``predict RUN`` then found the new run's model inside it), or
    that holds the model fine-tuned from (``--overwrite`` would delete what it reads)."""
    from ..models.io import CONFIG, WEIGHTS, model_folder

    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
            where = "is" if folder == resolved else f"lies inside {folder}, which is"
            raise ValueError(
                f"out {out}: {where} a saved model folder; a training run writes a run "
                f"folder of its own (its model goes to OUT/model): name a new folder"
            )
    if init_from is not None:
        source = model_folder(init_from).resolve()
        if source.is_relative_to(resolved):
            raise ValueError(
                f"out {out}: holds the model --init-from {init_from} starts from, which the "
                f"run would replace; name a new folder for the fine-tuned run"
            )


#: the environment variables of Lightning's seed_everything
LIGHTNING_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextlib.contextmanager
def kept_random_state():
    """Inside, anything may seed the global generators; afterwards the caller's Python,
    NumPy and torch (CPU, and CUDA devices in use) random states and Lightning's seed
    variables are as they were. Training seeds them all from ``config.seed``: a script
    that drew numbers after ``train(...)`` had its stream reset to the training seed."""
    import random

    python_state, numpy_state = random.getstate(), np.random.get_state()
    variables = {name: os.environ.get(name) for name in LIGHTNING_SEED_VARIABLES}
    # every CUDA generator where there are GPUs (seed_everything seeds them all, lazily when
    # CUDA is not initialised yet: restoring only the initialised ones had missed them)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            for name, value in variables.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _train(
    config: TrainConfig,
    resume: bool,
    data: PackedDataset | None,
    split: dict[str, np.ndarray] | None,
    deadline: float | None,
    test_seed: int | None = None,
) -> dict:
    out = Path(config.out)
    test_seed = config.seed if test_seed is None else test_seed
    if config.threads:
        torch.set_num_threads(config.threads)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    # data given from Python gets the checks and the max_structures cut of a file's, and
    # the run's config says so (not config.data's default, which it was not trained on)
    if data is not None:
        named = data.opened_from == config.data  # read from config.data
        data = load_dataset(config, opened=data, source=None if named else GIVEN_DATA)
        if not named:
            config = config.updated(data=GIVEN_DATA)
    else:
        data = load_dataset(config)
    config = adapt_to_data(config, data)
    unit = data.units.get(config.target, "")
    if config.init_from:
        model = initial_model(config, data)
        config = config.updated(model=model.config.to_dict())
    if split is None:
        split = _make_split(config, len(data), out, resume)
    else:
        save_split(out / "split.npz", split)
    fingerprint = run_folder.fingerprint(config, data, split)
    if run_folder.is_primary_process():
        if resume:
            run_folder.check_resume(out, fingerprint, config.max_epochs)
        else:
            run_folder.record(out, fingerprint)
        save_config(config, out / "train_config.yaml")

    if not config.init_from:
        model = build_model(config.model)
    if not config.init_from or config.refit_statistics:
        fit_statistics(model, data, split["train"], config.output_scale, config.forces)
    if config.freeze_representation:
        # fine-tuning the head only: the representation's weights get no gradient
        model.representation.requires_grad_(False)
    if config.compile:
        if config.forces:
            raise ValueError(
                "compile: torch.compile does not support the double backward of "
                "force training; train with compile: false"
            )
        cpu_kernels.prepare("cpu")  # the C++ pair operators, built before tracing starts
        model.representation.compile(dynamic=True)  # in place: state-dict keys unchanged
    task = AtomisticTask(
        model,
        forces=config.forces,
        rho=config.rho,
        lr=config.lr,
        lr_factor=config.lr_factor,
        lr_patience=config.lr_patience,
        lr_min=config.lr_min,
        stress=config.stress,
        stress_weight=config.stress_weight,
        lr_schedule=config.lr_schedule,
        loss=config.loss,
        weight_decay=config.weight_decay,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="best",
        monitor="val_loss",
        save_top_k=1,
        enable_version_counter=False,
    )
    # the latest state after every epoch, whether or not it is the best: what a resume needs
    latest = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    strategy = resolved_strategy(config)
    callbacks = [
        checkpoint,
        latest,
        _EarlyStopping("val_loss", patience=config.early_stopping_patience),
        LearningRateMonitor("epoch"),
        run_folder.FingerprintCallback(run_folder.digest(fingerprint)),
        _ProcessSettings(config.threads, spawned=_multiprocessing_ranks(strategy)),
    ]
    if config.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if config.ema_decay:
        callbacks.append(WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)))
    test = (
        split["test"]
        if config.full_test
        else bounded_subset(split["test"], config.test_subset, test_seed)
    )
    refit = bool(config.forces and model.config.aggregation == "sum")
    refit_idx = bounded_subset(split["train"], config.test_subset, config.seed) if refit else None
    budget = None
    if deadline is not None:
        n_after = len(split["val"]) + len(test) + (len(refit_idx) if refit else 0)
        spawned = "spawn" in str(strategy)
        budget = BudgetStop(deadline, n_after, margin_s=MARGIN_S + spawned * SPAWN_MARGIN_S)
        callbacks.append(budget)
    if config.lr_schedule == "cosine":
        callbacks.append(CosineToEnd(config.lr, task.lr_min, budget))  # (clamped to lr there)
    trainer = pl.Trainer(
        accelerator=config.device,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        precision=config.precision,
        max_epochs=config.max_epochs,
        callbacks=callbacks,
        logger=_loggers(out),
        inference_mode=False,
        use_distributed_sampler=False,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        check_val_every_n_epoch=config.check_val_every,
        log_every_n_steps=10,
        default_root_dir=out,
        deterministic=False,
        plugins=[_AtomicCheckpointIO()],
    )
    last = out / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.exists() else None
    datamodule = PackedDataModule(
        data, split, model.cutoff, config.batch_size, config.seed, config.num_workers
    )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning's sys.exit(1) after a Ctrl-C: the caller says
            raise KeyboardInterrupt from None  # what the user can do next (--resume)
        raise

    if trainer.global_rank != 0:
        return {}
    best = checkpoint.best_model_path
    if best and Path(best).exists():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    model = task.model.cpu().float().eval()
    if refit:  # within the budget: its share of the time left, beside the test set's
        refit_deadline = None
        if deadline is not None:
            now = time.monotonic()
            share = len(refit_idx) / (len(refit_idx) + len(test))
            refit_deadline = now + max(0.0, deadline - now) * share
        refit_offset(
            model,
            data,
            refit_idx,
            datamodule.eval_batch_size(),
            refit_deadline,
            config.seed,
            config.progress,
        )
    metrics, predictions = {}, None
    if len(test):
        metrics, predictions = evaluate(
            model,
            data,
            test,
            batch_size=datamodule.eval_batch_size(),
            forces=config.forces,
            progress=config.progress,
            deadline=deadline,
            seed=test_seed,
            stress=config.stress,
            return_predictions=True,
        )
    metrics.update(
        # spawned processes (ddp_spawn) do not hand their epoch count back: the last
        # checkpoint, saved at the end of every epoch, has it
        epochs=trainer.current_epoch or _checkpoint_epochs(out / "checkpoints" / "last.ckpt"),
        n_train=len(split["train"]),
        n_val=len(split["val"]),
        n_test=len(split["test"]),
        n_test_evaluated=metrics.pop("n_evaluated", 0),
        unit=unit,
        stopped_by_budget=bool(budget and budget.stopped),
    )
    save_model(
        model,
        out / "model",
        extra_files={
            "split.npz": lambda p: save_split(p, split),
            "train_config.yaml": lambda p: save_config(config, p),
        },
        metadata={
            "units": dict(data.units),
            "metrics": _plain(metrics),
            "data": config.data,
            "elements": np.unique(
                np.asarray(data.numbers)[data.atom_index(split["train"])]
            ).tolist(),
            # whether the training data had periodic cells (export refuses such a model,
            # whose program has no cell input, unless told it is for isolated structures)
            "periodic": bool(len(data.periodic_structures())),
        },
    )
    if predictions is not None:
        with atomic_file(out / PREDICTIONS) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **predictions, target=config.target, unit=unit)
    # whole or absent (an ensemble counts a member with metrics as finished)
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_plain(metrics), indent=1))
    return metrics


class _EarlyStopping(EarlyStopping):
    """Lightning's early stopping with the patience of this run's settings, which a resume
    may change (``RESUMABLE``): the checkpoint's state restored its old patience too."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "patience": self.patience})


def _checkpoint_epochs(path: Path) -> int:
    """Epochs trained when the Lightning checkpoint ``path`` was saved (0 without one)."""
    if not path.exists():
        return 0
    return run_folder.epochs_done(run_folder.load_checkpoint(path)) or 0


def resolved_strategy(config: TrainConfig):
    """``config.strategy``, except that ``"auto"`` with several CPU processes (``devices``
    > 1 on ``device="cpu"``, or ``"auto"`` without a GPU) on Linux x86-64 is
    ``"ddp_spawn_shm"``: DDP whose gradients and per-step numbers go through shared memory
    instead of gloo's sockets (:mod:`.shared_memory`; 1.08-1.23x gloo's optimizer steps per
    second on the 2 cores)."""
    several = isinstance(config.devices, int) and config.devices > 1 and config.num_nodes == 1
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.strategy == "auto" and several and on_cpu and shared_memory.SUPPORTED:
        return "ddp_spawn_shm"
    return config.strategy


def _multiprocessing_ranks(strategy) -> bool:
    """Whether the strategy starts its training processes with :mod:`multiprocessing`
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, or a strategy object with such a start
    method): those are the processes :func:`atomlens.runtime.end_with_parent` can tie to the
    command. ``ddp`` starts each rank as a new command, and schedulers (``srun``, ``torchrun``)
    own the processes they start."""
    if isinstance(strategy, str):
        return any(word in strategy for word in ("spawn", "fork", "notebook"))
    return getattr(strategy, "_start_method", None) in ("spawn", "fork")


class _AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside their name and renamed over it.

    Lightning's own save writes through fsspec into ``$TMPDIR`` and moves the file: where
    that is another file system than the run folder (a node-local ``/tmp``, a shared run
    folder) the move is a copy into ``last.ckpt`` in place, and a kill during the copy leaves
    a truncated checkpoint that ``--resume`` must refuse. A rename in the same folder is
    atomic: the old checkpoint stays whole until the new one is complete.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


class _ProcessSettings(pl.Callback):
    """Settings for every training process, also those that ``ddp_spawn`` starts:
    ``threads`` torch threads if given (Lightning gives spawned processes cores // processes
    unless told), dependencies' chatter kept quiet in spawned processes too
    (:func:`atomlens.runtime.quiet_dependencies` covers the first), subnormal floats flushed
    to zero
    (:func:`atomlens.runtime.flush_subnormals`: 10-15% of a QM9 training step otherwise), and
    with ``spawned`` (a strategy whose ranks :mod:`multiprocessing` starts, see
    :func:`_multiprocessing_ranks`) each process is killed when the one that started it ends
    (:func:`atomlens.runtime.end_with_parent`), so that killing ``atomlens train`` leaves no
    orphaned training processes on the cores."""

    def __init__(self, threads: int | None, spawned: bool = False):
        self.threads = threads
        self.spawned = spawned

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        flush_subnormals()
        if self.spawned:
            # a fresh interpreter: the parent's filters and logger levels are not inherited
            ignore_dependency_warnings()
            quiet_loggers()
            # SIGKILL, not SIGTERM: Lightning answers SIGTERM in these processes with a
            # collective, graceful stop (a broadcast inside the signal handler) that hung when
            # both ranks got it mid-step; the last epoch's checkpoint (saved atomically) is
            # what --resume needs, and nobody is left to report to
            end_with_parent(signal.SIGKILL)


def _loggers(out: Path) -> list:
    """The CSV log always; TensorBoard event files too when tensorboard is installed."""
    from .._optional import available

    loggers = [CSVLogger(out, name="logs")]
    if available("tensorboard"):
        loggers.append(TensorBoardLogger(out, name="tb"))
    return loggers


def _plain(d: dict) -> dict:
    return {
        k: (float(v) if isinstance(v, (np.floating, float)) and math.isfinite(v) else v)
        for k, v in d.items()
    }


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`train`.

    ``atomlens.training`` exports the function ``train`` under the module's own name, so
    ``atomlens.training.train`` must be both: ``from atomlens.training import train;
    train(config)`` runs a training, and ``import atomlens.training.train`` (or
    ``atomlens.training.train.load_dataset``) reaches this module's helpers.
    """

    def __call__(self, *args, **kwargs) -> dict:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
