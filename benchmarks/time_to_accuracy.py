"""Time to accuracy, side by side: peers trained on atomlens's data, split and budget.

``schnetpack_run`` writes the molecules of one atomlens run (its split, its bounded test
subset and its fitted atom references) to an npz, trains SchNetPack on them with its own
training loop in its venv (``peers/schnetpack_train.py``) for the same number of minutes on
the same number of threads, and returns SchNetPack's JSON result (test MAEs in eV, eV/A).
Used by ``qm9.py --peers`` and ``md17.py --peers``. ``mace_run`` does the same for a small
MACE model (energy + forces) in MACE's venv (``peers/mace_train.py``); used by
``md17.py --mace``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_peer_data(
    data, split: dict, test: np.ndarray, atomref: np.ndarray, target: str, path: Path, forces: bool
) -> None:
    """The train, val and test molecules (in that order) with the split as new indices."""
    parts = [np.asarray(split["train"]), np.asarray(split["val"]), np.asarray(test)]
    chosen = np.concatenate(parts)
    subset = data.subset(chosen)
    counts = np.cumsum([0] + [len(p) for p in parts])
    arrays = {
        "numbers": np.asarray(subset.numbers),
        "positions": np.asarray(subset.positions),
        "offsets": subset.offsets,
        "energy": np.asarray(subset.targets[target]),
        "train_idx": np.arange(counts[0], counts[1]),
        "val_idx": np.arange(counts[1], counts[2]),
        "test_idx": np.arange(counts[2], counts[3]),
        "atomref": np.asarray(atomref, dtype=np.float64)[:100],
    }
    if forces:
        arrays["forces"] = np.asarray(subset.targets["forces"])
    np.savez(path, **arrays)


def _peer_data(run_dir: Path, data, config, prefix: str) -> tuple[Path, np.ndarray]:
    """The npz of the atomlens run in ``run_dir`` (its split, test subset, atom refs)."""
    from atomlens.data.splits import load_split
    from atomlens.models import load_model
    from atomlens.training.evaluate import bounded_subset

    model = load_model(run_dir / "model")
    split = load_split(run_dir / "model" / "split.npz")
    test = (
        split["test"]
        if config.full_test
        else bounded_subset(split["test"], config.test_subset, config.seed)
    )
    npz = Path(tempfile.mkdtemp(prefix=prefix)) / "data.npz"
    write_peer_data(
        data, split, test, model.atomref.double().numpy(), config.target, npz, config.forces
    )
    return npz, test


def _run_peer(name: str, command: list[str], threads: int) -> dict:
    """Run a peer's training script; its last JSON line on stdout is the result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)  # the peer as its users run it
    print(f"{name}: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} training failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{name} training printed no result:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def schnetpack_run(run_dir: Path, data, minutes: float, threads: int, config) -> dict:
    """Train SchNetPack like the atomlens run in ``run_dir`` (its split and test subset)."""
    sys.path.insert(0, str(HERE / "peers"))
    from spk_env import ensure_venv

    python = ensure_venv()
    npz, test = _peer_data(run_dir, data, config, "atomlens-spk-train-")
    hyperparameters = {
        k: config.model.representation_kwargs[k]
        for k in ("n_atom_basis", "n_interactions", "n_filters", "n_rbf", "cutoff")
    }
    command = [
        str(python),
        str(HERE / "peers" / "schnetpack_train.py"),
        "--data",
        str(npz),
        "--minutes",
        str(minutes),
        "--threads",
        str(threads),
        "--batch-size",
        str(config.batch_size),
        "--lr",
        str(config.lr),
        "--lr-patience",
        str(config.lr_patience),
        "--rho",
        str(config.rho),
        "--hyperparameters",
        json.dumps(hyperparameters),
        "--seed",
        str(config.seed),
        "--workdir",
        str(npz.parent),
    ]
    if config.forces:
        command.append("--forces")
    return {**_run_peer("SchNetPack", command, threads), "n_test_evaluated": len(test)}


def mace_run(
    run_dir: Path, data, minutes: float, threads: int, config, extra: list[str] | None = None
) -> dict:
    """Train a small MACE model (energy + forces) like the atomlens run in ``run_dir``.

    Same frames, split, test subset, threads and wall-clock budget; MACE's own recipe and
    hyperparameters (``peers/mace_train.py``; ``extra`` is passed on to it, e.g.
    ``["--num-channels", "32"]``).
    """
    if not config.forces:
        raise ValueError("mace_run: MACE is compared on energy+force training only")
    sys.path.insert(0, str(HERE / "peers"))
    from mace_env import ensure_venv

    python = ensure_venv()
    npz, test = _peer_data(run_dir, data, config, "atomlens-mace-train-")
    command = [
        str(python),
        str(HERE / "peers" / "mace_train.py"),
        "--data",
        str(npz),
        "--minutes",
        str(minutes),
        "--threads",
        str(threads),
        "--seed",
        str(config.seed),
        "--workdir",
        str(npz.parent),
        *(extra or []),
    ]
    return {**_run_peer("MACE", command, threads), "n_test_evaluated": len(test)}
