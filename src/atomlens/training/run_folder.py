"""Guarding a training output folder: one run at a time, no silent mixing of runs.

* a lock file (``fcntl.flock``, released by the kernel when the process ends, however it
  ends) keeps a second run out of a folder in use;
* a new run refuses a folder that holds files, unless told to ``resume`` or to
  ``overwrite``, or the files are a run's that ended before its first checkpoint
  (:func:`failed_before_checkpoint`); ``resume`` needs a checkpoint to go on from;
* a *fingerprint* of the run (its configuration minus the fields a resume may change,
  the identity of the data, the split) is written to ``fingerprint.json`` when a run
  starts and into every checkpoint; a resume recomputes it and refuses a mismatch, so a
  checkpoint is never adopted by a run with other data, another split or another model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from ..fileio import atomic_file

LOCK = ".atomlens-train.lock"
FINGERPRINT = "fingerprint.json"
#: what a new run (``overwrite``) replaces; the old run's model stays until the new run
#: saves its own (replaced atomically at the end)
RUN_FILES = (
    "checkpoints",
    "split.npz",
    FINGERPRINT,
    "train_config.yaml",
    "metrics.json",
    "test_predictions.npz",
)
#: the loggers' folders: their ``version_*`` folders go too (the loggers number them, so the
#: old run's curves would otherwise sit beside the new run's), anything else in them stays
LOG_FOLDERS = ("logs", "tb")
#: configuration fields a resumed run may change: budgets, display, hardware, paths
RESUMABLE = frozenset(
    {
        "data",
        "out",
        "max_epochs",
        "max_minutes",
        "early_stopping_patience",
        "check_val_every",
        "progress",
        "threads",
        "device",
        "devices",
        "num_nodes",
        "strategy",
        "num_workers",
        "compile",
    }
)
CHECKPOINT_KEY = "atomlens_fingerprint"


class RunFolderError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def is_primary_process() -> bool:
    """False in the extra processes a distributed launcher (Lightning, torchrun, SLURM)
    starts; only the primary process guards and prepares the folder."""
    return all(
        os.environ.get(name, "0") in ("", "0")
        for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on run folder ``out`` (created if needed) for the block."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: is a file; the output of a run is a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK, "a")  # noqa: SIM115 (closed below, after the unlock)
    failed = False
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"{out}: another atomlens train is running in this folder; "
                f"wait for it to end or choose another --out"
            ) from None
        yield
    except BaseException:
        failed = True
        raise
    finally:
        # a run refused before it wrote anything (bad split sizes, ...) leaves no empty
        # folder behind it: only one this run created, holding nothing but the lock
        if failed and created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            out.rmdir()
        handle.close()  # closing releases the lock


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Check that ``out`` may be used as asked; with ``overwrite`` clear the old run's files."""
    if resume and overwrite:
        raise RunFolderError("--resume continues a run and --overwrite replaces it: give one")
    last = out / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise RunFolderError(
                f"{out}: nothing to resume ({last} does not exist); start a "
                f"new run without --resume (add --overwrite if the folder "
                f"holds files)"
            )
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if not entries:
        return
    if not overwrite and not failed_before_checkpoint(out):
        raise RunFolderError(
            f"{out}: the folder is not empty ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); pass --resume to go on "
            f"with the run there, --overwrite to replace it, or choose "
            f"another --out"
        )
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for name in LOG_FOLDERS:
        folder = out / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        for version in folder.glob("version_*"):
            if version.is_dir() and not version.is_symlink():
                shutil.rmtree(version)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing else is in it


def failed_before_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a run that ended (failed, or was killed) before it saved its
    first checkpoint: its fingerprint recorded, but no checkpoint, model or metrics.

    Such a run has nothing to resume or keep, so a new run takes its folder over with the
    ``overwrite`` clean-up (the run's files only; a user's other files stay). Removing a
    failed run's files when it fails would not cover a killed run, and would need a list
    of what each step wrote; this covers both, and the lock keeps a run still in its
    first epoch from being taken over. (Ensemble members do the same: ``"empty"``.)"""
    return (
        (out / FINGERPRINT).is_file()
        and not any((out / "checkpoints").glob("*.ckpt"))
        and not (out / "model").exists()
        and not (out / "metrics.json").exists()
    )


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _plain(value):
    """Whole floats as ints (``n_train: 20`` in YAML and ``--n-train 20.0`` are one run)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def fingerprint(config, data, split: dict[str, np.ndarray]) -> dict:
    """What identifies a run: config (minus :data:`RESUMABLE`), data content, split."""
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE}
    return {
        "config": _plain(json.loads(json.dumps(settings, default=str))),
        "data": data_identity(data),
        "split": {name: _digest(np.asarray(split[name], dtype=np.int64)) for name in sorted(split)},
    }


def data_identity(data) -> dict:
    """The data part of a fingerprint: the number of structures and a hash of the content
    (elements, positions, structure boundaries, every target), in the order read."""
    targets = [np.asarray(data.targets[k]) for k in sorted(data.targets)]
    return {
        "n_structures": len(data),
        "content": _digest(
            np.asarray(data.numbers),
            np.asarray(data.positions),
            np.asarray(data.offsets),
            *targets,
        ),
    }


def read_fingerprint(out: Path) -> dict | None:
    """The fingerprint recorded in run folder ``out``; None without one (older runs)."""
    stored_file = out / FINGERPRINT
    if not stored_file.is_file():
        return None
    try:
        return json.loads(stored_file.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{stored_file}: damaged ({err})") from err


def run_of(folder: Path) -> Path:
    """The run folder (the fingerprint's) of a model folder ``RUN/model``, or ``folder``."""
    return folder.parent if folder.name == "model" else folder


def same_data(out: Path, data) -> bool | None:
    """Whether ``data`` is the data the run in ``out`` was trained on (its recorded
    fingerprint's), so that the run's split indices pick the structures they picked then;
    None when the run recorded no fingerprint (made by an older atomlens)."""
    stored = read_fingerprint(out)
    if stored is None:
        return None
    return stored.get("data") == data_identity(data)


def digest(print_: dict) -> str:
    """A short hash of a fingerprint, stored in the checkpoints."""
    return hashlib.blake2b(json.dumps(print_, sort_keys=True).encode(), digest_size=16).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old["config"]) | set(new["config"])):
        a, b = old["config"].get(key), new["config"].get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"model.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    if old["data"] != new["data"]:
        out.append("the data set (its content differs)")
    if old["split"] != new["split"]:
        out.append("the split")
    return out


def record(out: Path, print_: dict) -> None:
    """Write ``fingerprint.json`` of a new run."""
    with atomic_file(out / FINGERPRINT) as tmp:
        tmp.write_text(json.dumps(print_, indent=1))


def check_resume(out: Path, print_: dict, max_epochs: int | None = None) -> None:
    """Refuse to resume when the run in ``out`` (fingerprint file and last checkpoint) is not
    the run described by ``print_``, or has trained more epochs than ``max_epochs``; a
    checkpoint that is not plain tensors is refused too."""
    stored = read_fingerprint(out)
    if stored is None:
        raise RunFolderError(
            f"{out}: the run there has no {FINGERPRINT} (made by an older "
            f"atomlens or not by atomlens), so resuming cannot be checked; "
            f"start afresh with --overwrite"
        )
    changed = differences(stored, print_)
    if changed:
        raise RunFolderError(
            f"{out}: --resume with a different run than the one there: "
            f"{'; '.join(changed)}. Resume with the original settings "
            f"(only budgets such as max_epochs may change), or start afresh "
            f"with --overwrite or another --out"
        )
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    if checkpoint.get(CHECKPOINT_KEY) != digest(print_):
        raise RunFolderError(
            f"{last}: this checkpoint was not written by the run in {out} "
            f"(its fingerprint differs); refusing to resume from it"
        )
    done = epochs_done(checkpoint)
    if max_epochs is not None and done is not None and done > max_epochs:
        raise RunFolderError(
            f"{out}: the run there has trained {done} epochs, more than --epochs "
            f"{max_epochs}; resume with --epochs {done} or more to go on (its model so far is "
            f"in checkpoints/last.ckpt), or start afresh with --overwrite"
        )


def epochs_done(checkpoint: dict) -> int | None:
    """The epochs a Lightning checkpoint has finished (where its loop state says), or None."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epoch = checkpoint.get("epoch")
        return int(epoch) + 1 if isinstance(epoch, int) else None


def load_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint read without running code (tensors and plain values only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (UnpicklingError for objects, others if damaged)
        raise RunFolderError(
            f"{path}: not a checkpoint atomlens can read safely: it is "
            f"damaged, or holds objects other than tensors and plain values "
            f"(which would run code when loaded); refusing it "
            f"({type(err).__name__})"
        ) from None


class FingerprintCallback(Callback):
    """Stores the run's fingerprint digest in every checkpoint."""

    def __init__(self, value: str):
        self.value = value

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.value
