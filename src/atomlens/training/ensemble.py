"""Ensembles: K models of one configuration, trained from K seeds on one shared split.

The output folder holds ``model_0`` ... ``model_{K-1}`` (each a training output folder
as :func:`~atomlens.training.train.train` writes it, member k trained with seed
``config.seed + k``) and ``ensemble.json``, which lists the members and the committee's
test errors. The members differ in their initial weights and in the order they see the
training data; they share the split and the test structures evaluated, so their test
errors compare and their spread measures the model, not the data.

The committee predicts the members' mean, E = (1/K) sum_k E_k; its spread is the population
standard deviation sqrt((1/K) sum_k (E_k - E)^2) (:mod:`atomlens.ensemble`). Its test errors
are computed from the members' saved test predictions (``test_predictions.npz``), on the
structures that every member evaluated.

Members train ``parallel`` at a time, each in its own process with ``cores // parallel``
torch threads unless ``config.threads`` says otherwise. On a machine of a few cores that is
the better use of them: the members need no communication, while two threads of one small
model wait on each other at each of a step's ~1,000 operators (``docs/runtime.md``).
``config.max_minutes`` bounds the whole ensemble: each round of members gets an equal share
of the time left.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import signal
import time
from pathlib import Path

import numpy as np

from ..data.dataset import PackedDataset
from ..fileio import atomic_file
from .config import TrainConfig

MANIFEST = "ensemble.json"


def train_ensemble(
    config: TrainConfig,
    n_models: int,
    data: PackedDataset | None = None,
    overwrite: bool = False,
    parallel: int = 1,
    started: float | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train ``n_models`` members under ``config.out``, ``parallel`` at a time; returns their
    test metrics. The committee's are in ``OUT/ensemble.json`` (see :func:`committee_metrics`).

    ``overwrite`` replaces members' folders that hold earlier runs. ``resume`` goes on with
    an interrupted ensemble: a finished member (its ``metrics.json`` and model saved) is
    kept, a started one resumes from its last checkpoint, the others start, and the
    manifest is written at the end. ``config.max_minutes`` bounds everything from
    ``started`` (``time.monotonic()``; default: now)."""
    from ..runtime import available_cpus, end_with_parent
    from .train import (
        check_device,
        check_strategy,
        load_dataset,
        new_split,
        refuse_model_folder_as_out,
        train,
    )

    check_device(config.device)  # before any member's folder
    check_strategy(config.strategy)
    # the ensemble's folder as a whole: a member's refusal came after --overwrite had
    # removed the manifest and retrained the members before it
    refuse_model_folder_as_out(Path(config.out), config.init_from)
    if n_models < 1:
        raise ValueError(f"an ensemble needs at least one model, not {n_models}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    started = time.monotonic() if started is None else started
    deadline = started + 60.0 * config.max_minutes if config.max_minutes else None
    parallel = min(parallel, n_models)
    out = Path(config.out)
    data = data if data is not None else load_dataset(config)
    split = new_split(config, len(data))
    members = [
        config.updated(seed=config.seed + k, out=str(out / f"model_{k}")) for k in range(n_models)
    ]
    if parallel > 1:  # one process per member: no interleaved progress bars, shared cores
        threads = config.threads or max(1, available_cpus() // parallel)
        members = [m.updated(threads=threads, progress=False) for m in members]
    metrics: list[dict] = []
    if resume and overwrite:
        raise ValueError("resume and overwrite: give one")
    state = {m.out: _member_state(Path(m.out)) if resume else "new" for m in members}
    if resume:  # every kept or resumed member must be this ensemble's, before any training
        from . import run_folder
        from .train import adapt_to_data

        for m in members:
            if state[m.out] not in ("done", "started"):
                continue
            stored = run_folder.read_fingerprint(Path(m.out))
            new = run_folder.fingerprint(adapt_to_data(m, data), data, split)
            changed = ["no fingerprint"] if stored is None else run_folder.differences(stored, new)
            if changed:
                raise run_folder.RunFolderError(
                    f"{m.out}: --resume of an ensemble with other settings than its members "
                    f"were trained with: {'; '.join(changed)}. Resume with the original "
                    f"settings, or start afresh with --overwrite or another --out"
                )
    if overwrite:  # a killed overwrite must not leave the old manifest naming a mix
        (out / MANIFEST).unlink(missing_ok=True)
    finished = {
        m.out: json.loads((Path(m.out) / "metrics.json").read_text())
        for m in members
        if state[m.out] == "done"
    }
    members_left = [m for m in members if state[m.out] != "done"]
    flags = {  # a member killed before its first checkpoint has nothing to keep: start afresh
        m.out: {
            "resume": state[m.out] == "started",
            "overwrite": overwrite or state[m.out] == "empty",
        }
        for m in members_left
    }
    rounds = [members_left[i : i + parallel] for i in range(0, len(members_left), parallel)]
    for r, group in enumerate(rounds):
        now = time.monotonic()
        if deadline is not None:  # this round's share of the time left
            share = (deadline - now) / (len(rounds) - r)
            group = [m.updated(max_minutes=max(share, 1.0) / 60.0) for m in group]
        kwargs = {"data": data, "split": split, "started": now, "test_seed": config.seed}
        if parallel == 1:
            metrics.extend(train(m, **flags[m.out], **kwargs) for m in group)
            continue
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            len(group),
            mp_context=context,
            # the workers end with the command; SIGKILL: a member's last checkpoint is whole,
            # and --resume of its folder goes on from it
            initializer=end_with_parent,
            initargs=(signal.SIGKILL,),
        ) as pool:
            futures = [pool.submit(train, m, **flags[m.out], **kwargs) for m in group]
            metrics.extend(f.result() for f in futures)
    trained = dict(zip([m.out for m in members_left], metrics))
    metrics = [finished[m.out] if m.out in finished else trained[m.out] for m in members]
    names = [f"model_{k}" for k in range(n_models)]
    manifest = {
        "members": names,
        "seeds": [config.seed + k for k in range(n_models)],
        "metrics": metrics,
        "committee": committee_metrics([out / name for name in names]),
    }
    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, default=float))
    return metrics


def _member_state(folder: Path) -> str:
    """ "done" (metrics and model saved), "started" (a run and its last checkpoint there),
    "empty" (a run recorded, killed before its first checkpoint) or "new"."""
    from . import run_folder

    if (folder / "metrics.json").is_file() and (folder / "model").is_dir():
        try:  # (a file cut by a kill, written in place before 2026-12-05: not finished)
            json.loads((folder / "metrics.json").read_text())
            return "done"
        except (ValueError, UnicodeDecodeError):
            pass
    if (folder / "checkpoints" / "last.ckpt").is_file():
        return "started"
    return "empty" if (folder / run_folder.FINGERPRINT).is_file() else "new"


def committee_metrics(folders) -> dict:
    """Test errors of the members' mean prediction, from each member's
    ``test_predictions.npz``, on the structures that all of them evaluated: MAE and RMSE
    of the committee, the members' own MAEs on the same structures, and the mean spread;
    the same for the forces and the stress where the members saved them (force and stress
    training). Empty when a
    member has no saved predictions (no test split)."""
    from .train import PREDICTIONS

    saved = []
    for folder in map(Path, folders):
        path = folder / PREDICTIONS
        if not path.is_file():
            return {}
        with np.load(path, allow_pickle=False) as f:
            saved.append({key: f[key] for key in f.files})
    return committee_of(saved)


def committee_of(saved: list[dict]) -> dict:
    """:func:`committee_metrics` from the members' predictions in memory: one dict per
    member with ``target``, ``unit``, ``indices``, ``predicted`` and ``reference`` (for
    forces also ``n_atoms``, ``forces_predicted``, ``forces_reference``; for the stress
    ``stress_predicted``, ``stress_reference``), as
    :func:`~atomlens.training.evaluate.evaluate` returns them with ``return_predictions``."""
    common = saved[0]["indices"]
    for s in saved[1:]:
        common = np.intersect1d(common, s["indices"])
    common = np.sort(common)
    predicted, reference = [], None
    for s in saved:
        rows = _rows_of(s["indices"], common)
        predicted.append(np.asarray(s["predicted"], dtype=np.float64)[rows])
        if reference is None:  # the same data set's targets in every member
            reference = np.asarray(s["reference"], dtype=np.float64)[rows]
    predicted = np.stack(predicted)  # (K, n)
    mean = predicted.mean(axis=0)
    spread = np.sqrt(((predicted - mean) ** 2).mean(axis=0))
    err = mean - reference
    target = str(saved[0]["target"])
    metrics = {
        "target": target,
        "unit": str(saved[0]["unit"]),
        "n_members": len(saved),
        "n_evaluated": len(common),
        f"{target}_mae": float(np.abs(err).mean()) if len(common) else math.nan,
        f"{target}_rmse": float(np.sqrt((err**2).mean())) if len(common) else math.nan,
        f"member_{target}_mae": [float(np.abs(p - reference).mean()) for p in predicted],
        f"{target}_spread_mean": float(spread.mean()) if len(common) else math.nan,
    }
    if len(common) and all("forces_predicted" in s for s in saved):
        metrics.update(_committee_forces(saved, common))
    if len(common) and all("stress_predicted" in s for s in saved):
        metrics.update(_committee_per_structure(saved, common, "stress"))
    return metrics


def _committee_per_structure(saved: list[dict], common: np.ndarray, key: str) -> dict:
    """The committee's errors of a per-structure array (the stress) on the structures
    ``common``: MAE and RMSE of the mean over all components, the members' own MAEs and the
    mean spread (per component, averaged)."""
    predicted, reference = [], None
    for s in saved:
        rows = _rows_of(s["indices"], common)
        predicted.append(np.asarray(s[f"{key}_predicted"], dtype=np.float64)[rows])
        if reference is None:
            reference = np.asarray(s[f"{key}_reference"], dtype=np.float64)[rows]
    predicted = np.stack(predicted)  # (K, n, ...)
    mean = predicted.mean(axis=0)
    err = mean - reference
    return {
        f"{key}_mae": float(np.abs(err).mean()),
        f"{key}_rmse": float(np.sqrt((err**2).mean())),
        f"member_{key}_mae": [float(np.abs(p - reference).mean()) for p in predicted],
        f"{key}_spread_mean": float(predicted.std(axis=0).mean()),
    }


def _committee_forces(saved: list[dict], common: np.ndarray) -> dict:
    """The committee's force errors on the structures ``common`` (sorted indices), from the
    members' packed per-atom forces: the mean force's MAE and RMSE over all components,
    the members' own MAEs, and the mean over atoms of the spread's norm
    |sigma_a| = sqrt(sum_c sigma_ac^2), the per-atom figure :class:`atomlens.ensemble.
    EnsembleCalculator` bounds with ``max_force_std``."""
    predicted, reference = [], None
    for s in saved:
        counts = np.asarray(s["n_atoms"], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rows = _rows_of(s["indices"], common)
        atoms = _ranges(starts[rows], counts[rows])
        predicted.append(np.asarray(s["forces_predicted"], dtype=np.float64)[atoms])
        if reference is None:
            reference = np.asarray(s["forces_reference"], dtype=np.float64)[atoms]
    predicted = np.stack(predicted)  # (K, atoms, 3)
    mean = predicted.mean(axis=0)
    spread = np.sqrt(((predicted - mean) ** 2).mean(axis=0))
    err = mean - reference
    return {
        "forces_mae": float(np.abs(err).mean()),
        "forces_rmse": float(np.sqrt((err**2).mean())),
        "member_forces_mae": [float(np.abs(p - reference).mean()) for p in predicted],
        "forces_spread_mean": float(np.sqrt((spread**2).sum(axis=1)).mean()),
    }


def _rows_of(indices: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Where each of ``common`` (a subset of ``indices``) sits in ``indices``."""
    order = np.argsort(indices)
    return order[np.searchsorted(indices, common, sorter=order)]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges starts[m] .. starts[m] + counts[m] - 1."""
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(int(counts.sum())) + shift
