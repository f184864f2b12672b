"""A small CNN on scikit-learn's 8x8 digits: the test bed for the explanation methods.

Conv2d(1, 8) -> BatchNorm2d -> ReLU -> MaxPool2d(2) -> Conv2d(8, 16) -> ReLU ->
AvgPool2d(2) -> Flatten -> Linear(64, 32) -> ReLU -> Dropout -> Linear(32, 10).
Pixel values are scaled to [0, 1]; training takes a few seconds on a CPU.

:func:`digits_study` is the whole study behind ``atomlens explain``: every explanation
method on test images, the signal-quality table and the image-degradation table.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._optional import require
from ..fileio import atomic_file


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
    """Train :func:`digits_cnn` with Adam and cross-entropy; returned in eval mode. The
    caller's global torch random state is left as it was."""
    with torch.random.fork_rng(devices=[]):  # initial weights and dropout masks: seeded
        torch.manual_seed(seed)
        model = digits_cnn()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(data.y_train), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                logits = model(data.x_train[index])
                loss = nn.functional.cross_entropy(logits, data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of correctly classified images."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def save_model(model: nn.Module, path: str | Path, split_seed: int | None = None) -> None:
    """Weights and BatchNorm statistics as safetensors; ``split_seed``: the seed of the
    :func:`load_digits_data` split it was trained on (recorded, so that a later study tests
    it on that split's test images, not on its own training images)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "atomlens.digits_cnn/1"}
    if split_seed is not None:
        metadata["split_seed"] = str(split_seed)
    save_file(state, str(path), metadata=metadata)


def load_model(path: str | Path) -> nn.Sequential:
    """A :func:`digits_cnn` with the weights saved by :func:`save_model`, in eval mode."""
    model = digits_cnn()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001 (safetensors' header errors, another model's tensors)
        raise ValueError(
            f"{path}: not the weights of the digits CNN ({type(err).__name__}); give a "
            f"file written by 'atomlens explain', or a new path to train and save one there"
        ) from None
    return model.eval()


def saved_split_seed(path: str | Path) -> int | None:
    """The split seed :func:`save_model` recorded in ``path`` (None: not recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        value = (handle.metadata() or {}).get("split_seed")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


@dataclass
class DigitsStudy:
    """What :func:`digits_study` measured and wrote.

    ``accuracy``: fraction of test images classified correctly. ``quality``: one row per
    layer, signal quality rho(S) of each estimator (higher is better). ``perturbation``: one
    row per method (and ``random``): area under the mean output as the most relevant regions
    are degraded first, and the output at the start and end (lower auc is better).
    ``files``: the files written, by name.
    """

    accuracy: float
    quality: list[dict]
    perturbation: list[dict]
    files: dict[str, Path] = field(default_factory=dict)


def write_table(rows: list[dict], stem: Path) -> tuple[Path, Path]:
    """``rows`` (dicts with the same keys) as ``stem.json`` and ``stem.csv``."""
    stem = Path(stem)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
    with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def digits_study(
    out: str | Path,
    model_path: str | Path | None = None,
    n_images: int = 8,
    epochs: int = 10,
    n_perturbation: int = 300,
    n_quality: int | None = None,
    patch: int = 2,
    seed: int = 0,
) -> DigitsStudy:
    """Every explanation method on the digits CNN, with figures and tables, into ``out``.

    Loads the CNN from ``model_path`` if that file exists, else trains it (``epochs``) and
    saves it there (default ``out/digits_cnn.safetensors``); fits the patterns in one pass
    over the training set (``patterns.safetensors``); explains ``n_images`` test images with
    every method (``explanations.png``); measures rho(S) on ``n_quality`` training images
    (the patterns' own) and as many test images (default all; ``quality.json``/``.csv``,
    a ``data`` column) and the degradation of ``n_perturbation`` test
    images in ``patch`` x ``patch`` regions (``perturbation.json``/``.csv``). A loaded CNN
    trained on another seed's split is refused (its test images would be training images).
    The caller's global torch random state is left as it was.
    """
    for name, value in (("n_images", n_images), ("epochs", epochs), ("patch", patch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, not {value}")
    if n_perturbation < 1 or (n_quality is not None and n_quality < 1):
        raise ValueError("n_perturbation and n_quality must be >= 1")
    new = model_path is not None and not Path(model_path).exists()
    if new and not Path(model_path).parent.is_dir():  # found now, not after the training
        raise FileNotFoundError(
            f"{model_path}: its folder does not exist; the trained CNN would be lost"
        )
    with torch.random.fork_rng(devices=[]):  # seeded inside; the caller's state kept
        torch.manual_seed(seed)
        return _digits_study(
            out, model_path, n_images, epochs, n_perturbation, n_quality, patch, seed
        )


def _digits_study(
    out: str | Path,
    model_path: str | Path | None,
    n_images: int,
    epochs: int,
    n_perturbation: int,
    n_quality: int | None,
    patch: int,
    seed: int,
) -> DigitsStudy:
    from .figures import explanation_grid
    from .methods import METHODS, explain
    from .patterns import fit_patterns
    from .perturbation import perturbation_curve
    from .quality import quality_table

    loaded = model_path is not None and Path(model_path).exists()
    if loaded:
        model = load_model(model_path)
        trained_on = saved_split_seed(model_path)
        if trained_on is not None and trained_on != seed:
            raise ValueError(
                f"{model_path} was trained on the digits split of seed {trained_on}; with "
                f"seed {seed} about 80% of this study's test images would be its own "
                f"training images: run with --seed {trained_on}, or train a new CNN"
            )
        if trained_on is None:
            warnings.warn(
                f"{model_path} does not record the split it was trained on (saved by an "
                f"earlier atomlens): its test accuracy and the test rows hold only if it "
                f"was trained with seed {seed}",
                stacklevel=2,
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    data = load_digits_data(seed=seed)
    if not loaded:
        model = train_digits_cnn(data, epochs=epochs, seed=seed)
        files["model"] = Path(model_path or out / "digits_cnn.safetensors")
        save_model(model, files["model"], split_seed=seed)
    test_accuracy = accuracy(model, data.x_test, data.y_test)

    loader = torch.utils.data.DataLoader(data.x_train, batch_size=256)
    patterns = fit_patterns(model, loader)
    files["patterns"] = out / "patterns.safetensors"
    patterns.save(files["patterns"], model)

    images = data.x_test[:n_images]
    figure = {name: explain(model, images, name, patterns=patterns) for name in METHODS}
    labels = [f"label {int(y)}" for y in data.y_test[:n_images]]
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    files["explanations"] = out / "explanations.png"
    explanation_grid(images, figure, files["explanations"], labels, predicted)

    # on the patterns' own (training) images S_a and S_a+- leave no covariance with y by
    # construction; held-out test images show how the estimators generalise
    quality = [
        {"data": split, **row}
        for split, images in (("train", data.x_train), ("test", data.x_test))
        for row in quality_table(model, images[:n_quality], patterns)
    ]
    files["quality"], _ = write_table(quality, out / "quality")

    inputs = data.x_test[:n_perturbation]
    generator = torch.Generator().manual_seed(seed)
    orderings = {"random": torch.rand(inputs.shape, generator=generator)}
    for name, method in METHODS.items():
        relevance = explain(model, inputs, name, patterns=patterns)
        # functions and signals carry no sign of evidence: order them by magnitude
        orderings[name] = relevance if method.kind == "attribution" else relevance.abs()
    perturbation = []
    for name, relevance in orderings.items():
        result = perturbation_curve(model, inputs, relevance, patch=patch)
        perturbation.append(
            {
                "method": name,
                "auc": result.auc,
                "output_start": float(result.curve[0]),
                "output_end": float(result.curve[-1]),
            }
        )
    files["perturbation"], _ = write_table(perturbation, out / "perturbation")
    return DigitsStudy(test_accuracy, quality, perturbation, files)
