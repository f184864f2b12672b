"""Time to accuracy, side by side: SchNetPack trained on atomlens's data, split and budget.

``schnetpack_run`` writes the molecules of one atomlens run (its split, its bounded test
subset and its fitted atom references) to an npz, trains SchNetPack on them with its own
training loop in its venv (``peers/schnetpack_train.py``) for the same number of minutes on
the same number of threads, and returns SchNetPack's JSON result (test MAEs in eV, eV/A).
Used by ``qm9.py --peers`` and ``md17.py --peers``.
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


def schnetpack_run(run_dir: Path, data, minutes: float, threads: int, config) -> dict:
    """Train SchNetPack like the atomlens run in ``run_dir`` (its split and test subset)."""
    sys.path.insert(0, str(HERE / "peers"))
    from spk_env import ensure_venv

    from atomlens.data.splits import load_split
    from atomlens.models import load_model
    from atomlens.training.evaluate import bounded_subset

    python = ensure_venv()
    model = load_model(run_dir / "model")
    split = load_split(run_dir / "model" / "split.npz")
    test = (
        split["test"]
        if config.full_test
        else bounded_subset(split["test"], config.test_subset, config.seed)
    )
    workdir = Path(tempfile.mkdtemp(prefix="atomlens-spk-train-"))
    npz = workdir / "data.npz"
    write_peer_data(
        data, split, test, model.atomref.double().numpy(), config.target, npz, config.forces
    )
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
        str(workdir),
    ]
    if config.forces:
        command.append("--forces")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)  # SchNetPack as its users run it
    print(f"SchNetPack: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"SchNetPack training failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), "n_test_evaluated": len(test)}
