"""``atomlens explain``: every explanation method on the digits CNN, with figures and tables.

    atomlens explain --out runs/explain [--model digits.safetensors] [--n-images 8] [--epochs 10]
    atomlens explain molecule MODEL STRUCTURE --out DIR [--method ...]   (see explain molecule --help)

Trains (or loads) the digits CNN, fits the patterns in one pass over the training set,
explains ``--n-images`` test images with every method (``explanations.png``), and
writes the signal-quality table (``quality.json``/``.csv``) and the image-degradation
table (``perturbation.json``/``.csv``).
"""

from __future__ import annotations

import argparse
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
        "--n-quality",
        type=int,
        default=None,
        help="training images, and as many test images, for rho(S) (default: all)",
    )
    parser.add_argument("--patch", type=int, default=2, help="region size for degradation")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
    from . import explain_molecule

    explain_molecule.add_parser(parser.add_subparsers(dest="explain_mode", metavar="molecule"))
    return parser


def _print_table(title: str, rows: list[dict]) -> None:
    print(title)
    keys = list(rows[0])
    print("  ".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(
            "  ".join(f"{v:>20.4f}" if isinstance(v, float) else f"{v!s:>20}" for v in row.values())
        )


def run(args: argparse.Namespace) -> int:
    """Run the digits study (:func:`atomlens.explain.digits.digits_study`) and print its tables."""
    if args.out is None:
        raise ValueError("the digits study needs --out DIR")
    from ..fileio import check_output_folder

    check_output_folder(args.out)
    # imported here: `atomlens --help` must not pay for torch and matplotlib
    from ..explain.digits import digits_study
    from ..explain.quality import ESTIMATORS

    study = digits_study(
        args.out,
        model_path=args.model,
        n_images=args.n_images,
        epochs=args.epochs,
        n_perturbation=args.n_perturbation,
        n_quality=args.n_quality,
        patch=args.patch,
        seed=args.seed,
    )
    print(f"test accuracy {study.accuracy:.4f}")
    _print_table(
        f"signal quality rho(S), estimators {ESTIMATORS} (higher is better)", study.quality
    )
    _print_table(
        "image degradation, most relevant regions first (lower auc is better)",
        study.perturbation,
    )
    return 0
