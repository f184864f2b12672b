"""``atomlens demo``: a SchNet on QM9 U0 in a few CPU minutes, with a parity plot."""

from __future__ import annotations

from pathlib import Path

from ..units import KCAL_MOL_EV


def add_parser(subparsers) -> None:
    """Register ``demo``."""
    p = subparsers.add_parser("demo", help="train a SchNet on QM9 U0 for a few minutes (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, help="training budget (default: the preset's)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..data.splits import load_split
    from ..insight.plots import parity_plot
    from ..models.io import load_model
    from ..training.config import preset
    from ..training.evaluate import relative_to_atomrefs
    from ..training.train import load_dataset, train

    config = preset("qm9-u0-demo").updated(out=args.out, max_minutes=args.minutes)
    print(
        "atomlens demo: SchNet on QM9 U0 "
        f"(n_train={int(config.n_train)}, budget {config.max_minutes} min on the CPU)"
    )
    data = load_dataset(config)
    metrics = train(config, data=data, overwrite=args.overwrite)
    folder = Path(config.out) / "model"
    model = load_model(folder)
    test = load_split(folder / "split.npz")["test"]
    reference, predicted = relative_to_atomrefs(model, data, test)
    png = parity_plot(
        reference,
        predicted,
        Path(config.out) / "parity.png",
        title=f"SchNet, QM9 U0 minus fitted atom references, n_train={int(config.n_train)}",
        unit="eV",
    )
    mae = metrics[f"{model.target}_mae"]
    print(
        f"test MAE (U0, {len(test)} molecules): {mae * 1000:.1f} meV = "
        f"{mae / KCAL_MOL_EV:.2f} kcal/mol"
    )
    print(f"parity plot: {png}")
    print(f"model: {folder}")
    return 0
