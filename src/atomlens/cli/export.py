"""``atomlens export``: a saved model as one file that runs without atomlens (torch.export)."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model's energy-and-forces program as a torch.export file (.pt2)",
        description="Trace positions (n, 3) Angstrom + atomic numbers (n,) -> energy (eV), "
        "forces (eV/Angstrom) into a torch.export file, loadable with plain "
        "PyTorch: torch.export.load(PATH).module()(positions, numbers). "
        "Any number of atoms >= 2; the model's dtype (float32 unless --float64). The "
        "program has no cell: every structure is an isolated molecule (no periodic images).",
    )
    p.add_argument("model", help="model folder (or the training output folder)")
    p.add_argument("--out", default="model.pt2", help="output file (default model.pt2)")
    p.add_argument("--float64", action="store_true", help="export in float64")
    p.add_argument(
        "--molecules",
        action="store_true",
        help="export a model trained on periodic cells anyway, for isolated structures "
        "(refused without this: the program has no cell input)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..export import export_model
    from ..fileio import check_outputs
    from ..models.io import load_model, model_folder
    from ..training.config import load_config

    folder = model_folder(args.model)
    check_outputs({"--out": args.out}, [args.model, folder])
    if Path(args.out).suffix.lower() != ".pt2":  # it had replaced a structure file given
        raise ValueError(
            f"--out {args.out}: the exported program is a .pt2 archive; name a .pt2 file"
        )
    trained = folder / "train_config.yaml"
    if not args.molecules and trained.exists() and load_config(trained).stress:
        raise ValueError(
            f"{args.model}: trained on periodic cells (with stress); the exported program "
            f"has no cell input and would treat a crystal as an isolated cluster. Use "
            f"atomlens.Calculator for cells, or pass --molecules to export it for isolated "
            f"structures"
        )
    model = load_model(folder, dtype=torch.float64 if args.float64 else None)
    path = export_model(model, args.out, molecules=args.molecules)
    print(
        f"exported {args.model} -> {path} ({Path(path).stat().st_size / 1e6:.1f} MB); load "
        f"with torch.export.load({str(path)!r}).module()(positions, numbers) -> "
        f"(energy eV, forces eV/Angstrom)"
    )
    return 0
