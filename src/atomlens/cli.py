"""The ``atomlens`` command: a thin layer over the library.

Subcommands: train, evaluate, predict, demo (here), and those registered by the capability
modules: sample (data.sampling), md (molecular dynamics), insight, explain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .units import KCAL_MOL_EV

#: modules that add subcommands through ``add_parser(subparsers)``
SUBCOMMAND_MODULES = ["atomlens.cli_sample", "atomlens.cli_md", "atomlens.cli_insight",
                      "atomlens.cli_explain"]


# --------------------------------------------------------------------------- helpers
def describe_error(value_ev: float, unit: str) -> str:
    """An error in the target's unit, with meV and kcal/mol for energies."""
    if unit == "eV":
        return f"{value_ev * 1000:.2f} meV = {value_ev / KCAL_MOL_EV:.3f} kcal/mol"
    if unit == "eV/Angstrom":
        return f"{value_ev * 1000:.2f} meV/Angstrom = {value_ev / KCAL_MOL_EV:.3f} kcal/mol/Angstrom"
    return f"{value_ev:.4g} {unit}"


def _print_metrics(metrics: dict, target: str, unit: str) -> None:
    for key in (f"{target}_mae", f"{target}_rmse"):
        if key in metrics:
            print(f"{key.upper():>16}: {describe_error(metrics[key], unit)}")
    for key in ("forces_mae", "forces_rmse"):
        if key in metrics:
            print(f"{key.upper():>16}: {describe_error(metrics[key], 'eV/Angstrom')}")


# --------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a SchNet or DTNN model",
                       description="Train from a YAML/JSON config, a preset, or both "
                                   "(command-line options override the file).")
    p.add_argument("config", nargs="?", help="YAML/JSON training config")
    p.add_argument("--preset", help="named preset, e.g. qm9-u0-schnet, qm9-u0-dtnn, md17-schnet")
    p.add_argument("--model", choices=["schnet", "dtnn"],
                   help="representation (switches to its default preset for the data)")
    p.add_argument("--data", help="'qm9' or a data file (MD17 .npz, ASE db, extxyz, packed folder)")
    p.add_argument("--target", help="target property (QM9: U0, U, H, G, homo, lumo, gap, zpve, mu, "
                                    "alpha, r2, cv; MD data: energy)")
    p.add_argument("--forces", action="store_true", default=None, help="train on forces too")
    p.add_argument("--rho", type=float, help="energy weight of the energy+force loss")
    p.add_argument("--n-train", type=float)
    p.add_argument("--n-val", type=float)
    p.add_argument("--n-test", type=float)
    p.add_argument("--max-structures", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int, dest="max_epochs")
    p.add_argument("--minutes", type=float, dest="max_minutes",
                   help="wall-clock budget of the whole command, final evaluation included")
    p.add_argument("--test-subset", type=int,
                   help="final evaluation on at most this many random test structures "
                        "(default 10000)")
    p.add_argument("--full-test", action="store_true", default=None,
                   help="final evaluation on the whole test split")
    p.add_argument("--ema-decay", type=float, help="keep an exponential moving average of weights")
    p.add_argument("--patience", type=int, dest="early_stopping_patience")
    p.add_argument("--device", help="auto (default), cpu, gpu")
    p.add_argument("--devices", help="number of devices (DDP when > 1)")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the representation (energy training only)")
    p.add_argument("--seed", type=int)
    p.add_argument("--energy-unit", help="unit of energies in a data file without unit metadata")
    p.add_argument("--length-unit", help="unit of lengths in a data file without unit metadata")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", action="store_true", help="go on from OUT/checkpoints/last.ckpt")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def config_from_args(args):
    from .training.config import TrainConfig, load_config, preset

    if args.config:
        config = load_config(args.config)
        if args.preset:
            raise SystemExit("give a config file or --preset, not both")
    elif args.preset:
        config = preset(args.preset)
    elif args.model == "dtnn":
        config = preset("qm9-u0-dtnn")
    else:
        config = preset("qm9-u0-schnet") if (args.data in (None, "qm9")) else TrainConfig()
    if args.model and args.model != config.model.representation:
        base = "md17" if config.forces else "qm9-u0"
        switched = preset(f"{base}-{args.model}")
        config = switched.updated(data=config.data, target=config.target)
    devices = args.devices
    if devices is not None and str(devices).isdigit():
        devices = int(devices)
    overrides = {k: getattr(args, k) for k in (
        "data", "target", "forces", "rho", "n_train", "n_val", "n_test", "max_structures",
        "batch_size", "lr", "max_epochs", "max_minutes", "ema_decay", "early_stopping_patience",
        "device", "num_nodes", "strategy", "threads", "compile", "seed", "energy_unit",
        "length_unit", "out", "test_subset", "full_test")}
    overrides["devices"] = devices
    if args.no_progress:
        overrides["progress"] = False
    return config.updated(**overrides)


def run_train(args) -> int:
    from .training.train import train

    config = config_from_args(args)
    metrics = train(config, resume=args.resume, started=args.started)
    if metrics:
        print(f"model saved in {Path(config.out) / 'model'}")
        _print_metrics(metrics, config.target, metrics.get("unit", ""))
    return 0


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="MAE and RMSE of a trained model on a split")
    p.add_argument("model", help="model folder (or the training output folder)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--data", help="data set (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from .data.splits import load_split
    from .models.io import load_model, model_folder, read_config
    from .training.config import TrainConfig, load_config
    from .training.evaluate import evaluate
    from .training.train import load_dataset

    folder = model_folder(args.model)
    model = load_model(folder)
    cfg_file = folder / "train_config.yaml"
    config = load_config(cfg_file) if cfg_file.exists() else TrainConfig(target=model.target)
    if args.data:
        config = config.updated(data=args.data)
    config = config.updated(max_structures=None) if args.data else config
    data = load_dataset(config)
    if args.split == "all" or args.data:
        indices = np.arange(len(data))
    else:
        indices = load_split(folder / "split.npz")[args.split]
    forces = bool(config.forces) and "forces" in data.targets
    metrics = evaluate(model, data, indices, args.batch_size, forces=forces)
    unit = read_config(folder)["model"].get("unit", "")
    if args.json:
        print(json.dumps({"split": args.split, "n": len(indices), "unit": unit, **metrics}))
    else:
        print(f"{folder}: {model.target} on {len(indices)} structures ({args.split})")
        _print_metrics(metrics, model.target, unit)
    return 0


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict for structures in any ASE-readable file")
    p.add_argument("model")
    p.add_argument("file", help="xyz, extxyz, ASE db, ... (anything ase.io.read reads)")
    p.add_argument("--index", default=":", help="which frames (ASE index syntax)")
    p.add_argument("--forces", action="store_true", help="also predict forces")
    p.add_argument("--out", help="write results as extxyz (per-atom contributions as arrays)")
    p.add_argument("--chunk", type=int, default=1000,
                   help="structures per model call (default 1000)")
    p.set_defaults(func=run_predict)


def read_structures(path: str, index: str = ":"):
    """ASE-readable structures, with a clear error for missing, empty or malformed files."""
    import ase.io

    from .data.dataset import DataError

    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as err:  # ASE raises many types for bad files
        raise DataError(f"{path}: cannot read structures ({type(err).__name__}: {err})") from err
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise DataError(f"{path}: the file holds no structures")
    return frames


def predict_in_chunks(model, frames: list, forces: bool = False, chunk: int = 1000) -> dict:
    """``model.predict`` over ``chunk`` structures at a time (bounded memory, a progress bar
    on a terminal); the same arrays as one call on all of them."""
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, not {chunk}")
    parts: dict[str, list] = {}
    with tqdm(total=len(frames), desc="predict", unit="structure", leave=False,
              disable=None) as bar:
        for start in range(0, len(frames), chunk):
            for key, value in model.predict(frames[start:start + chunk], forces=forces).items():
                parts.setdefault(key, []).append(value)
            bar.update(min(chunk, len(frames) - start))
    return {key: np.concatenate(values) for key, values in parts.items()}


def run_predict(args) -> int:
    from .data.dataset import dataset_from_atoms
    from .models.io import load_model, model_folder, read_config

    folder = model_folder(args.model)
    model = load_model(folder)
    unit = read_config(folder)["model"].get("unit", "")
    frames = read_structures(args.file, args.index)
    dataset_from_atoms(frames, source=args.file)  # validates before any output is written
    out = predict_in_chunks(model, frames, forces=args.forces, chunk=args.chunk)
    start = 0
    for k, atoms in enumerate(frames):
        n = len(atoms)
        atomic = out["atomic"][start:start + n]
        print(f"structure {k} ({atoms.get_chemical_formula()}): {model.target} = "
              f"{out[model.target][k]:.6f} {unit}")
        for symbol, value in zip(atoms.get_chemical_symbols(), atomic):
            print(f"    {symbol:>2} {value: .6f}")
        atoms.info[model.target] = float(out[model.target][k])
        atoms.arrays[f"atomic_{model.target}"] = atomic
        if args.forces:
            atoms.arrays["predicted_forces"] = out["forces"][start:start + n]
        start += n
    if args.out:
        import ase.io

        ase.io.write(args.out, frames, format="extxyz")
        print(f"written {args.out}")
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a SchNet on QM9 U0 for a few minutes (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, help="training budget (default: the preset's)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .data.splits import load_split
    from .insight.plots import parity_plot
    from .models.io import load_model
    from .training.config import preset
    from .training.evaluate import predict_dataset
    from .training.train import load_dataset, train

    config = preset("qm9-u0-demo").updated(out=args.out, max_minutes=args.minutes)
    print("atomlens demo: SchNet on QM9 U0 "
          f"(n_train={int(config.n_train)}, budget {config.max_minutes} min on the CPU)")
    data = load_dataset(config)
    metrics = train(config, data=data)
    folder = Path(config.out) / "model"
    model = load_model(folder)
    test = load_split(folder / "split.npz")["test"]
    pred = predict_dataset(model, data, test)[model.target]
    ref = np.asarray(data.targets[model.target])[test]
    # plot energies relative to the fitted per-element references, where the errors show
    atomref = model.atomref.numpy()[np.asarray(data.numbers)[data.atom_index(test)]]
    baseline = np.add.reduceat(atomref, np.concatenate([[0], np.cumsum(data.n_atoms_per[test])[:-1]]))
    png = parity_plot(ref - baseline, pred - baseline, Path(config.out) / "parity.png",
                      title=f"SchNet, QM9 U0 minus fitted atom references, "
                            f"n_train={int(config.n_train)}", unit="eV")
    mae = metrics[f"{model.target}_mae"]
    print(f"test MAE (U0, {len(test)} molecules): {mae * 1000:.1f} meV = "
          f"{mae / KCAL_MOL_EV:.2f} kcal/mol")
    print(f"parity plot: {png}")
    print(f"model: {folder}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="atomlens", description="Deep learning for quantum chemistry you can look inside.")
    parser.add_argument("--version", action="version", version=f"atomlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    _add_threads(parser)
    return parser


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads`` on every command that lacks it (nested subcommands included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_threads(command)
            return
    if not any("--threads" in action.option_strings for action in parser._actions):
        parser.add_argument("--threads", type=int,
                            help="torch CPU threads (default: the CPUs available to atomlens)")


def main(argv: list[str] | None = None) -> int:
    from .runtime import configure, prepare_environment

    started = time.monotonic()  # budgets (train --minutes) count from here
    prepare_environment()  # before torch loads: libgomp reads its wait policy once
    from .data.dataset import DataError

    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"atomlens {args.command}: error: --threads must be >= 1, not {args.threads}",
              file=sys.stderr)
        return 2
    args.started = started
    configure(threads=args.threads)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"atomlens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
