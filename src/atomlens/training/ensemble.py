"""Ensembles: K models of one configuration, trained from K seeds on one shared split.

The output folder holds ``model_0`` ... ``model_{K-1}`` (each a training output folder
as :func:`~atomlens.training.train.train` writes it, member k trained with seed
``config.seed + k``) and ``ensemble.json``, which lists the members. The members differ in
their initial weights and in the order they see the training data; they share the split,
so their test errors compare and their spread measures the model, not the data.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.dataset import PackedDataset
from ..data.splits import random_split
from .config import TrainConfig

MANIFEST = "ensemble.json"


def train_ensemble(
    config: TrainConfig, n_models: int, data: PackedDataset | None = None, overwrite: bool = False
) -> list[dict]:
    """Train ``n_models`` members under ``config.out``; returns their test metrics.

    ``overwrite`` replaces members' folders that hold earlier runs."""
    from .train import load_dataset, train

    if n_models < 1:
        raise ValueError(f"an ensemble needs at least one model, not {n_models}")
    out = Path(config.out)
    data = data if data is not None else load_dataset(config)
    split = random_split(len(data), config.n_train, config.n_val, config.n_test, seed=config.seed)
    metrics, members = [], []
    for k in range(n_models):
        member = config.updated(seed=config.seed + k, out=str(out / f"model_{k}"))
        metrics.append(train(member, data=data, split=split, overwrite=overwrite))
        members.append(f"model_{k}")
    (out / MANIFEST).write_text(
        json.dumps(
            {
                "members": members,
                "seeds": [config.seed + k for k in range(n_models)],
                "metrics": metrics,
            },
            indent=1,
            default=float,
        )
    )
    return metrics
