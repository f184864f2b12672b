"""A small CNN on scikit-learn's 8x8 digits: the test bed for the explanation methods.

Conv2d(1, 8) -> BatchNorm2d -> ReLU -> MaxPool2d(2) -> Conv2d(8, 16) -> ReLU ->
AvgPool2d(2) -> Flatten -> Linear(64, 32) -> ReLU -> Dropout -> Linear(32, 10).
Pixel values are scaled to [0, 1]; training takes a few seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._optional import require


def digits_cnn() -> nn.Sequential:
    """The untrained digits CNN (an ``nn.Sequential``, so BatchNorm can be folded)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, 10),
    )


@dataclass
class Digits:
    """Train/test split of ``load_digits``: images (N, 1, 8, 8) in [0, 1], labels (N,)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_data(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """The 1,797 digits, shuffled with ``seed`` and split."""
    require("sklearn.datasets", "the 8x8 digits data set")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = round(test_fraction * len(y))
    return Digits(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def train_digits_cnn(
    data: Digits, epochs: int = 10, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
) -> nn.Sequential:
    """Train :func:`digits_cnn` with Adam and cross-entropy; returned in eval mode."""
    torch.manual_seed(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of correctly classified images."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def save_model(model: nn.Module, path: str | Path) -> None:
    """Weights and BatchNorm statistics as safetensors."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "atomlens.digits_cnn/1"})


def load_model(path: str | Path) -> nn.Sequential:
    """A :func:`digits_cnn` with the weights saved by :func:`save_model`, in eval mode."""
    model = digits_cnn()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
