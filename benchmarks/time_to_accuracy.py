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

import importlib
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


def _run_peer(
    name: str, env_module: str, script: str, run_dir: Path, data, minutes, threads, config, options
) -> dict:
    """Write the run's npz, ensure the peer's venv, run its training script there.

    The script's last JSON line on stdout is the result; ``options`` are its own flags.
    """
    sys.path.insert(0, str(HERE / "peers"))
    python = importlib.import_module(env_module).ensure_venv()
    npz, test = _peer_data(run_dir, data, config, f"atomlens-{name.lower()}-train-")
    command = [
        str(python),
        str(HERE / "peers" / script),
        *("--data", str(npz), "--minutes", str(minutes), "--threads", str(threads)),
        *("--seed", str(config.seed), "--workdir", str(npz.parent)),
        *options,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("OMP_WAIT_POLICY", None)  # the peer as its users run it
    print(f"{name}: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} training failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{name} training printed no result:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "n_test_evaluated": len(test)}


def schnetpack_run(run_dir: Path, data, minutes: float, threads: int, config) -> dict:
    """Train SchNetPack like the atomlens run in ``run_dir`` (its split and test subset)."""
    hyperparameters = {
        k: config.model.representation_kwargs[k]
        for k in ("n_atom_basis", "n_interactions", "n_filters", "n_rbf", "cutoff")
    }
    options = [
        *("--batch-size", str(config.batch_size), "--lr", str(config.lr)),
        *("--lr-patience", str(config.lr_patience), "--rho", str(config.rho)),
        *("--hyperparameters", json.dumps(hyperparameters)),
        *(["--forces"] if config.forces else []),
    ]
    result = _run_peer(
        "SchNetPack",
        "spk_env",
        "schnetpack_train.py",
        run_dir,
        data,
        minutes,
        threads,
        config,
        options,
    )
    # its own loop halves the rate on validation plateaus (schnetpack_train.py)
    return {**result, "lr": config.lr, "lr_schedule": "plateau"}


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
    return _run_peer(
        "MACE", "mace_env", "mace_train.py", run_dir, data, minutes, threads, config, extra or []
    )
