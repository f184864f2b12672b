"""Small fixtures shared by test modules: tiny QM9 sample, random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atomlens.models import build_model

DATA = Path(__file__).parent / "data"


def qm9_sample():
    from atomlens.data.sources.qm9 import read_qm9_csv

    return read_qm9_csv(DATA / "qm9_sample40.csv")


#: a small instance of every registered representation (a new model adds one line here and
#: one contract class in test_contract.py; tests parametrised over models read this)
SMALL_MODELS = {
    "schnet": {
        "n_atom_basis": 16,
        "n_interactions": 2,
        "n_filters": 16,
        "n_rbf": 10,
        "cutoff": 5.0,
    },
    "dtnn": {
        "n_atom_basis": 16,
        "n_interactions": 2,
        "n_factors": 12,
        "n_rbf": 30,
        "cutoff": 6.0,
        "rbf_stop": 6.0,
        "rbf_gamma": 10.0,
    },
}
MODELS = sorted(SMALL_MODELS)


def random_model(representation: str = "schnet", seed: int = 0, **kwargs):
    """A small untrained model in float64 with non-trivial statistics."""
    torch.manual_seed(seed)
    model = build_model(
        {
            "representation": representation,
            "representation_kwargs": SMALL_MODELS[representation],
            "head_hidden": 8,
            **kwargs,
        }
    ).double()
    atomref = np.zeros(101)
    atomref[[1, 6, 7, 8, 9]] = [-13.6, -1029.0, -1485.0, -2042.0, -2713.0]
    model.set_statistics(atomref, shift=-0.3, scale=0.7)
    return model.eval()


def random_rotation(seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.det(q))


def tiny_train_config(out: Path, width: int = 8, **overrides):
    """A :class:`TrainConfig` of seconds: U0 of 20/10/10 molecules, 1 epoch, batch 10, a
    one-block SchNet ``width`` features wide (cutoff 4 Angstrom at width 8, else 5), no
    progress bar, on the CPU, written to ``out``; ``overrides`` replace top-level keys."""
    from atomlens.training import TrainConfig

    base = {
        "target": "U0",
        "n_train": 20,
        "n_val": 10,
        "n_test": 10,
        "batch_size": 10,
        "max_epochs": 1,
        "progress": False,
        "out": str(out),
        "device": "cpu",
        "model": {
            "representation": "schnet",
            "head_hidden": 8,
            "representation_kwargs": {
                "n_atom_basis": width,
                "n_interactions": 1,
                "n_filters": width,
                "n_rbf": 8 if width == 8 else 10,
                "cutoff": 4.0 if width == 8 else 5.0,
            },
        },
    }
    return TrainConfig.from_dict({**base, **overrides})


def write_tiny_train_config(path: Path, data: Path, device: str = "cpu") -> Path:
    """A YAML training config of seconds on the packed ``data`` (the QM9 sample): U0 of
    20/10/10 molecules, 2 epochs, a one-block SchNet of 16 features, on ``device``."""
    import yaml

    kwargs = {"n_atom_basis": 16, "n_interactions": 1, "n_filters": 16, "n_rbf": 10}
    config = {
        "data": str(data),
        "target": "U0",
        "n_train": 20,
        "n_val": 10,
        "n_test": 10,
        "batch_size": 10,
        "max_epochs": 2,
        "device": device,
        "model": {
            "representation": "schnet",
            "head_hidden": 8,
            "representation_kwargs": {**kwargs, "cutoff": 5.0},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def perturbed_copy(model_folder: Path, out: Path, seed: int = 1) -> Path:
    """A saved model's copy with its weights moved slightly (1e-3): another ensemble member
    (a plain copy is the same model twice, which ensembles refuse)."""
    import shutil
    import tempfile

    from atomlens.models.io import CONFIG, WEIGHTS, load_model, save_model

    model = load_model(model_folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    shutil.copytree(model_folder, out)  # its other files (split.npz, ...) too
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_model(model, Path(tmp) / "model", metadata=model.metadata)
        for name in (WEIGHTS, CONFIG):  # the pair: the config records the weights' checksum
            shutil.copyfile(saved / name, Path(out) / name)
    return Path(out)
