"""Saving and loading models: a folder with ``config.json`` + ``model.safetensors``.

Nothing is pickled: the architecture is rebuilt from the JSON config and the weights (and
fitted statistics, which are buffers) are read with safetensors. The folder may also hold
``split.npz`` (the data split used for training) and ``training.json`` (the training config
and final metrics), both written by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..fileio import atomic_folder, recover_folder
from .potential import AtomisticModel, build_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
#: the layout of a model folder; a folder of a later layout (a newer atomlens) is refused
FORMAT = 1
#: the precisions a model runs in, by name (numpy's names and the aliases float, double)
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(dtype) -> torch.dtype | None:
    """``dtype`` as ``torch.float32`` or ``torch.float64``; ``None`` (the model's own) stays.

    Accepts those torch dtypes, the names of :data:`DTYPES` and numpy dtypes; refuses any
    other (ValueError): half precisions round a molecule's energy by eV.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        parsed = DTYPES.get(dtype)
    elif isinstance(dtype, torch.dtype):
        parsed = dtype if dtype in DTYPES.values() else None
    else:
        try:
            parsed = DTYPES.get(np.dtype(dtype).name)
        except (TypeError, ValueError):  # not a dtype at all
            parsed = None
    if parsed is None:
        raise ValueError(
            f"dtype must be float32 or float64 (a torch or numpy dtype, or one of the names "
            f"{', '.join(map(repr, DTYPES))}), or None for the model's own, not {dtype!r}"
        )
    return parsed


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a CUDA device that torch does not see is a clear
    error (torch's own was "AssertionError: Torch not compiled with CUDA enabled" at the
    first transfer), as is a name torch does not know."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device {device!r}: {err} (atomlens runs on 'cpu' or 'cuda[:N]')"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: atomlens runs on 'cpu' or 'cuda[:N]'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here; use device='cpu'"
        )
    if parsed.type == "cuda" and parsed.index is not None:
        count = torch.cuda.device_count()
        if parsed.index >= count:
            raise ValueError(
                f"device {device!r}: torch sees {count} CUDA GPU(s) here, cuda:0 to "
                f"cuda:{count - 1}"
            )
    return parsed


def save_model(
    model: AtomisticModel,
    path: str | os.PathLike,
    extra_files: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` to folder ``path`` atomically (no half-written model ever appears).

    ``extra_files`` maps file names to callables ``write(path)`` run inside the new folder.
    ``config.json`` records the layout (:data:`FORMAT`) and the weights' SHA-256, which
    :func:`load_model` checks: weights damaged on disk or copied in from another save are
    refused, not run.
    """
    path = Path(path)
    with atomic_folder(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"atomlens_version": __version__})
        doc = {
            "atomlens_version": __version__,
            "format": FORMAT,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "model": model.config.to_dict(),
            "metadata": metadata or {},
        }
        (tmp / CONFIG).write_text(json.dumps(doc, indent=1))
        for name, write in (extra_files or {}).items():
            write(tmp / name)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_saved_pair(path: Path, doc: dict) -> None:
    """Refuse a folder of a later layout than :data:`FORMAT`, and weights whose SHA-256
    differs from the one ``config.json`` recorded at the save (folders saved before the
    checksum carry none and are read as they are)."""
    layout = doc.get("format", 1)
    if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
        raise ValueError(f"{path / CONFIG}: format must be a positive integer, not {layout!r}")
    if layout > FORMAT:
        raise ValueError(
            f"{path}: a model folder of format {layout}, saved by atomlens "
            f"{doc.get('atomlens_version', '?')}; this atomlens ({__version__}) reads format "
            f"{FORMAT}: upgrade atomlens to load it"
        )
    expected = doc.get("weights_sha256")
    if expected is None or not (path / WEIGHTS).is_file():
        return  # (missing weights: load_file names them)
    actual = _sha256(path / WEIGHTS)
    if actual != expected:
        raise ValueError(
            f"{path / WEIGHTS}: damaged or replaced since the save: its SHA-256 "
            f"{actual[:16]}... differs from the {expected[:16]}... recorded in {CONFIG} "
            f"(weights of another save copied in? save the model with save_model to pair "
            f"its config and weights)"
        )


def model_folder(path: str | os.PathLike) -> Path:
    """Accept a training output folder (holding ``model/``) or the model folder itself.

    A save killed between its two renames is repaired first (see :func:`recover_folder`).
    """
    path = Path(path)
    for folder in (path, path / "model"):
        recover_folder(folder)
    if (path / "model" / CONFIG).is_file():
        return path / "model"
    return path


def read_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path}: is a file; a model is a folder holding {CONFIG} and {WEIGHTS}"
        )
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path}: not an atomlens model folder (no {CONFIG}){_unfinished(path)}"
        )
    try:
        doc = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG}: damaged model config ({err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError(  # noqa: TRY004 (a bad file: the CLI reports ValueError in one line)
            f"{path / CONFIG}: damaged model config (not an object with a 'model' entry)"
        )
    return doc


def _unfinished(path: Path) -> str:
    """What to do with a training folder that holds no model yet: a run or an ensemble that
    was stopped before its end (a killed run resumes), or ``""``."""
    from ..ensemble import MANIFEST

    if (path / "checkpoints" / "last.ckpt").is_file():
        command = "atomlens train"
        if path.parent != path and (path.parent / "model_0").is_dir():  # an ensemble member
            command = f"atomlens train --ensemble command (--out {path.parent})"
        return (
            "; a training run that has not finished (it has checkpoints/last.ckpt, no model "
            f"yet): the same {command} with --resume goes on from it"
        )
    if (path / MANIFEST).is_file():
        return f"; an ensemble: this command takes one model, a member such as {path / 'model_0'}"
    if (path / "model_0").is_dir():
        return (
            "; an ensemble whose training has not finished (no ensemble.json): the same "
            "atomlens train --ensemble command with --resume goes on, or name finished "
            f"members ({path / 'model_0'}, ...)"
        )
    return ""


def _check_metadata(metadata, max_z: int, source) -> None:
    """Refuse a ``metadata`` block the guards could not read: a mapping whose
    ``elements`` (the training data's atomic numbers), if present, are integers 1..max_z."""
    if not isinstance(metadata, dict):
        raise ValueError(  # noqa: TRY004 (a bad file: the CLI reports ValueError in one line)
            f"{source}: metadata must be a mapping, not {type(metadata).__name__}"
        )
    elements = metadata.get("elements")
    if elements is None:
        return
    if not isinstance(elements, list) or not all(
        isinstance(z, int) and not isinstance(z, bool) and 1 <= z <= max_z for z in elements
    ):
        raise ValueError(
            f"{source}: metadata elements must be a list of atomic numbers 1..{max_z} (the "
            f"training data's elements), not {elements!r}"[:300]
        )


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> AtomisticModel:
    """Rebuild a saved model from its config and safetensors weights, in eval mode.

    ``path`` is the model folder or the training output folder that holds it; ``dtype``
    (see :func:`parse_dtype`) converts it, ``None`` keeps the saved precision.
    """
    dtype = parse_dtype(dtype)
    device = check_device(device)
    path = model_folder(path)
    doc = read_config(path)
    _check_saved_pair(path, doc)
    try:
        model = build_model(doc["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{path / CONFIG}: cannot rebuild the model from this config "
            f"({type(err).__name__}: {err})"
        ) from err
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"{path / WEIGHTS}: damaged or missing weights ({err})") from err
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if saved_dtype is not None:
        model.to(saved_dtype)  # load without rounding, then convert if asked
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or wrongly shaped tensors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise ValueError(
            f"{path}: the weights do not fit the architecture in {CONFIG} "
            f"(config and weights from different models?): {' '.join(lines[:3])}{more}"
        ) from err
    bad = [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(
            f"{path / WEIGHTS}: non-finite (NaN/inf) weights in {bad[:5]}; the "
            f"model is broken (a diverged training?)"
        )
    model.metadata = doc.get("metadata", {})
    _check_metadata(model.metadata, model.config.max_z, path / CONFIG)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()
