"""``atomlens explain``: every explanation method on the digits CNN, with figures and tables.

    atomlens explain --out runs/explain [--model digits.safetensors] [--n-images 8] [--epochs 10]
    atomlens explain molecule MODEL STRUCTURE --out DIR [--method ...]   (see cli_explain_molecule)

Trains (or loads) the digits CNN, fits the patterns in one pass over the training set,
explains ``--n-images`` test images with every method (``explanations.png``), and
writes the signal-quality table (``quality.json``/``.csv``) and the image-degradation
table (``perturbation.json``/``.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``explain`` subcommand on an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "explain",
        help="explanation methods (PatternNet, PatternAttribution, LRP, ...) on a digits CNN",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="output folder (required)")
    parser.add_argument(
        "--model",
        type=Path,
        help="digits CNN weights (.safetensors): loaded if present, else trained and saved there",
    )
    parser.add_argument("--n-images", type=int, default=8, help="test images in the figure")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument(
        "--n-perturbation", type=int, default=300, help="test images in the degradation test"
    )
    parser.add_argument(
        "--n-quality", type=int, default=None, help="training images for rho(S) (default: all)"
    )
    parser.add_argument("--patch", type=int, default=2, help="region size for degradation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: the CPUs available to the process)"
    )
    parser.set_defaults(func=run)
    from . import cli_explain_molecule

    cli_explain_molecule.add_parser(parser.add_subparsers(dest="explain_mode", metavar="molecule"))
    return parser


def _write_table(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _print_table(title: str, rows: list[dict]) -> None:
    print(title)
    keys = list(rows[0])
    print("  ".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(
            "  ".join(f"{v:>20.4f}" if isinstance(v, float) else f"{v!s:>20}" for v in row.values())
        )


def run(args: argparse.Namespace) -> int:
    """Run the digits study; returns the exit code."""
    if args.out is None:
        raise ValueError("the digits study needs --out DIR")
    # imported here: `atomlens --help` must not pay for torch and matplotlib
    import torch

    from .explain import METHODS, explain, fit_patterns, perturbation_curve
    from .explain.digits import (
        accuracy,
        load_digits_data,
        load_model,
        save_model,
        train_digits_cnn,
    )
    from .explain.figures import explanation_grid
    from .explain.quality import ESTIMATORS, quality_table

    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_data(seed=args.seed)
    if args.model is not None and Path(args.model).exists():
        model = load_model(args.model)
    else:
        model = train_digits_cnn(data, epochs=args.epochs, seed=args.seed)
        save_model(model, args.model or out / "digits_cnn.safetensors")
    print(f"test accuracy {accuracy(model, data.x_test, data.y_test):.4f}")

    loader = torch.utils.data.DataLoader(data.x_train, batch_size=256)
    patterns = fit_patterns(model, loader)
    patterns.save(out / "patterns.safetensors")

    images = data.x_test[: args.n_images]
    figure = {name: explain(model, images, name, patterns=patterns) for name in METHODS}
    labels = [f"label {int(y)}" for y in data.y_test[: args.n_images]]
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    explanation_grid(images, figure, out / "explanations.png", labels, predicted)

    quality = quality_table(model, data.x_train[: args.n_quality], patterns)
    _write_table(quality, out / "quality")
    _print_table(f"signal quality rho(S), estimators {ESTIMATORS} (higher is better)", quality)

    inputs = data.x_test[: args.n_perturbation]
    generator = torch.Generator().manual_seed(args.seed)
    orderings = {"random": torch.rand(inputs.shape, generator=generator)}
    for name, method in METHODS.items():
        relevance = explain(model, inputs, name, patterns=patterns)
        # functions and signals carry no sign of evidence: order them by magnitude
        orderings[name] = relevance if method.kind == "attribution" else relevance.abs()
    rows = []
    for name, relevance in orderings.items():
        result = perturbation_curve(model, inputs, relevance, patch=args.patch)
        rows.append(
            {
                "method": name,
                "auc": result.auc,
                "output_start": float(result.curve[0]),
                "output_end": float(result.curve[-1]),
            }
        )
    _write_table(rows, out / "perturbation")
    _print_table("image degradation, most relevant regions first (lower auc is better)", rows)
    return 0
