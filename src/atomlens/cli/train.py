"""``atomlens train``, ``evaluate`` and ``predict``: parse, call the library, print."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..registry import representation_names
from ..units import EV_A3_GPA, KCAL_MOL_EV
from ._common import add_device, resolve_device


def add_parser(subparsers) -> None:
    """Register ``train``, ``evaluate`` and ``predict``."""
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_predict(subparsers)


# --------------------------------------------------------------------------- helpers
def output_scale_from_text(text: str) -> str | float:
    """``TrainConfig.output_scale`` from a command line (also ``benchmarks/md17.py``): a
    number, or a name (checked with the config)."""
    try:
        return float(text)
    except ValueError:
        return text


def describe_error(value_ev: float, unit: str) -> str:
    """An error in the target's unit, with meV and kcal/mol for energies."""
    if unit == "eV":
        return f"{value_ev * 1000:.2f} meV = {value_ev / KCAL_MOL_EV:.3f} kcal/mol"
    if unit == "eV/Angstrom":
        return (
            f"{value_ev * 1000:.2f} meV/Angstrom = {value_ev / KCAL_MOL_EV:.3f} kcal/mol/Angstrom"
        )
    return f"{value_ev:.4g} {unit}"


def _print_run(metrics: dict, name: str = "the model") -> None:
    """How far a run got: epochs, the budget's stop, the test structures evaluated; and a
    warning on stderr when the budget ended before the first epoch (the saved model then
    has its initial weights: a run whose --minutes went to setting up, e.g. the one-off
    build of the C++ kernels, had saved it with test errors and nothing else said)."""
    epochs = metrics.get("epochs")
    if epochs is None:
        return
    parts = [f"{epochs} epoch{'s' * (epochs != 1)}"]
    if metrics.get("stopped_by_budget"):
        parts.append("stopped by the --minutes budget")
    if metrics.get("n_test"):
        parts.append(
            f"{metrics.get('n_test_evaluated', 0):,} of {metrics['n_test']:,} test structures "
            f"evaluated"
        )
    print(f"{'':>6}{'; '.join(parts)}")
    if epochs == 0:
        print(
            f"atomlens train: warning: {name} trained no epoch (the budget ended first): "
            f"it is untrained; give more --minutes",
            file=sys.stderr,
        )


def _print_metrics(metrics: dict, target: str, unit: str) -> None:
    for key in (f"{target}_mae", f"{target}_rmse"):
        if key in metrics:
            print(f"{key.upper():>16}: {describe_error(metrics[key], unit)}")
    for key in ("forces_mae", "forces_rmse"):
        if key in metrics:
            print(f"{key.upper():>16}: {describe_error(metrics[key], 'eV/Angstrom')}")
    for key in ("stress_mae", "stress_rmse"):
        if key in metrics:
            print(
                f"{key.upper():>16}: {metrics[key] * 1000:.3f} meV/Angstrom^3 = "
                f"{metrics[key] * EV_A3_GPA:.4f} GPa"
            )


# --------------------------------------------------------------------------- train
class _TrainHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default: the value of :class:`TrainConfig` it overrides.

    The options default to None (a value given in a config file or preset is kept unless
    the option is given), so the defaults shown are read from ``TrainConfig`` and the
    preset list from ``PRESETS``, when help is printed: ``atomlens --help`` imports
    neither torch nor the training code.
    """

    def _get_help_string(self, action):
        from ..training.config import PRESETS, TrainConfig

        text = action.help or ""
        if action.dest == "preset":
            return f"{text}; one of: {', '.join(sorted(PRESETS))}"
        if action.dest == "model":
            from ..models.base import representation_names

            return f"{text}; one of: {', '.join(representation_names())}"
        field = TrainConfig.__dataclass_fields__.get(action.dest)
        # flags and options without a value by default say so in their own help text
        value = getattr(field, "default", None)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return f"{text} (default: {value})"
        return text


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a SchNet or DTNN model (or an ensemble, or fine-tune one)",
        formatter_class=_TrainHelpFormatter,
        description="Train from a YAML/JSON config, a preset, or both (command-line options "
        "override the file). Without a config or preset: qm9-u0-schnet for QM9, "
        "the TrainConfig defaults shown below for a data file.",
    )
    p.add_argument("config", nargs="?", help="YAML/JSON training config (TrainConfig fields)")
    p.add_argument("--preset", help="named preset")
    p.add_argument(
        "--model",
        choices=representation_names(),
        help="representation (switches to its default preset for the data)",
    )
    p.add_argument("--data", help="'qm9' or a data file (MD17 .npz, ASE db, extxyz, packed folder)")
    p.add_argument(
        "--target",
        help="target property (QM9: U0, U, H, G, homo, lumo, gap, zpve, mu, "
        "alpha, r2, cv; MD data: energy)",
    )
    p.add_argument("--forces", action="store_true", default=None, help="train on forces too")
    p.add_argument(
        "--rho",
        type=float,
        help="energy weight of the loss rho*dE^2 + (1-rho)*dF^2 (with --forces)",
    )
    p.add_argument(
        "--output-scale",
        type=output_scale_from_text,
        help="sigma of the atom-wise output: auto (default: the RMS force with --forces, "
        "else the energy's standard deviation per atom), std, forces, or a number",
    )
    p.add_argument(
        "--stress",
        action="store_true",
        default=None,
        help="train on the stress of periodic cells too (eV/Angstrom^3)",
    )
    p.add_argument("--stress-weight", type=float, help="weight of the stress term of the loss")
    p.add_argument(
        "--n-train", type=count_or_fraction, help="training structures (count, or fraction < 1)"
    )
    p.add_argument(
        "--n-val", type=count_or_fraction, help="validation structures (count, or fraction < 1)"
    )
    p.add_argument(
        "--n-test",
        type=count_or_fraction,
        help="test structures (count, or fraction < 1; default: all the rest)",
    )
    p.add_argument(
        "--max-structures",
        type=int,
        help="use only the first n structures of the data (quick runs)",
    )
    p.add_argument("--batch-size", type=int, help="structures per batch")
    p.add_argument("--lr", type=float, help="initial Adam learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=["plateau", "cosine"],
        help="plateau: halve the rate when validation stalls; cosine: decay it to lr_min "
        "over the budget (--minutes, else --epochs)",
    )
    p.add_argument(
        "--loss",
        choices=["mse", "mae"],
        help="squared (default) or absolute errors in the loss",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        help="decoupled weight decay (AdamW): each step shrinks the weights by lr * this",
    )
    p.add_argument("--epochs", type=int, dest="max_epochs", help="maximum number of epochs")
    p.add_argument(
        "--minutes",
        type=float,
        dest="max_minutes",
        help="wall-clock budget of the whole command, final evaluation included "
        "(none: until --epochs or --patience)",
    )
    p.add_argument(
        "--test-subset",
        type=int,
        help="final evaluation on at most this many random test structures",
    )
    p.add_argument(
        "--full-test",
        action="store_true",
        default=None,
        help="final evaluation on the whole test split",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        help="keep an exponential moving average of the weights (e.g. 0.999)",
    )
    p.add_argument(
        "--patience",
        type=int,
        dest="early_stopping_patience",
        help="stop after this many epochs without a better validation loss",
    )
    p.add_argument("--device", help="auto (a GPU when present), cpu, gpu")
    p.add_argument(
        "--devices",
        help="number of devices (DDP when > 1; on the CPU, one process per device with "
        "gradients exchanged through shared memory: strategy ddp_spawn_shm)",
    )
    p.add_argument("--num-nodes", type=int, help="number of machines (multi-node DDP)")
    p.add_argument(
        "--strategy", help="Lightning strategy, e.g. ddp, ddp_spawn (gloo), ddp_spawn_shm"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (none: torch's choice)")
    p.add_argument(
        "--num-workers",
        type=int,
        help="processes that build batches (neighbour lists) beside training (default 0: "
        "the training process; on a GPU machine with idle cores a few workers keep the GPU "
        "fed)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the representation (energy training only). On the CPU the "
        "eager path with atomlens's kernels is faster: a QM9 128/6 step took 47-52 ms "
        "compiled against 41-43 eager (one thread, 2026-12-04); measure first",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the split, the initial weights and the "
        "batch order (ensemble member k: seed + k)",
    )
    p.add_argument(
        "--energy-unit",
        help="unit of energies in a data file without unit metadata "
        "(eV, meV, hartree, kcal/mol, kJ/mol)",
    )
    p.add_argument(
        "--length-unit",
        help="unit of lengths in a data file without unit metadata (Angstrom, bohr, nm)",
    )
    p.add_argument("--out", help="output folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from OUT/checkpoints/last.ckpt (an ensemble: each unfinished member "
        "from its own)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a non-empty OUT (else it is refused)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--init-from",
        metavar="MODEL",
        help="fine-tune: start from this saved model's weights and statistics "
        "(its architecture replaces the config's)",
    )
    p.add_argument(
        "--refit-statistics",
        action="store_true",
        default=None,
        help="with --init-from: refit atom references and shift/scale on the new "
        "training split (default: keep the model's)",
    )
    p.add_argument(
        "--freeze-representation",
        action="store_true",
        default=None,
        help="train the output head only; the representation keeps its weights",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        metavar="K",
        help="train K models with seeds seed..seed+K-1 on one split, into "
        "OUT/model_0..model_K-1 (+ OUT/ensemble.json with the committee's test errors); "
        "--minutes bounds all of them",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="P",
        help="with --ensemble: train P members at a time, each in its own process with "
        "cores // P threads (default 1); on a few cores the better use of them",
    )
    p.set_defaults(func=run_train)


def config_from_args(args):
    from ..training.config import TrainConfig, load_config, preset

    if args.config:
        config = load_config(args.config)
        if args.preset:
            raise ValueError("give a config file or --preset, not both")
    elif args.preset:
        config = preset(args.preset)
    elif args.model == "dtnn":
        config = preset("qm9-u0-dtnn")
    else:
        config = preset("qm9-u0-schnet") if (args.data in (None, "qm9")) else TrainConfig()
    if args.model:
        from ..models.base import representation_names

        if args.model not in representation_names():
            raise ValueError(
                f"--model {args.model!r}: unknown representation; known: "
                f"{', '.join(representation_names())}"
            )
    if args.init_from and not args.target:  # fine-tuning: the saved model's target
        from ..models.io import model_folder, read_config

        config = config.updated(target=read_config(model_folder(args.init_from))["model"]["target"])
    if args.model and args.model != config.model.representation:
        base = "md17" if config.forces else "qm9-u0"
        switched = preset(f"{base}-{args.model}")
        config = switched.updated(data=config.data, target=config.target)
    devices = args.devices
    if devices is not None and str(devices).isdigit():
        devices = int(devices)
    overrides = {
        k: getattr(args, k)
        for k in (
            "data",
            "target",
            "forces",
            "rho",
            "output_scale",
            "stress",
            "stress_weight",
            "n_train",
            "n_val",
            "n_test",
            "max_structures",
            "batch_size",
            "lr",
            "lr_schedule",
            "loss",
            "weight_decay",
            "max_epochs",
            "max_minutes",
            "ema_decay",
            "early_stopping_patience",
            "device",
            "num_nodes",
            "strategy",
            "threads",
            "num_workers",
            "compile",
            "seed",
            "energy_unit",
            "length_unit",
            "out",
            "init_from",
            "refit_statistics",
            "freeze_representation",
            "test_subset",
            "full_test",
        )
    }
    overrides["devices"] = devices
    qm9_spec = args.data == "qm9" or str(args.data).startswith("qm9:")
    if args.data and not qm9_spec and Path(args.data).exists():
        # the config saved with the model names the data wherever it is read from later
        # (evaluate from another folder said "packed: file not found")
        overrides["data"] = str(Path(args.data).resolve())
    if args.no_progress:
        overrides["progress"] = False
    try:
        config = config.updated(**overrides)
    except ValueError as err:  # a bad value from the command line: name its option
        for name, value in overrides.items():
            prefix = f"training config: {name} "
            if value is not None and str(err).startswith(prefix):
                raise ValueError(f"{_option(name)} {str(err)[len(prefix) :]}") from None
        raise
    # a weight of a term the loss does not have would be ignored without a word; an error,
    # not a warning: the option was typed for this run, and the run would not be the one
    # asked for (checked on the final config: a config file's stress: true counts)
    for option, given, needed, flag in (
        ("--stress-weight", args.stress_weight, config.stress, "--stress"),
        ("--rho", args.rho, config.forces, "--forces"),
    ):
        if given is not None and not needed:
            raise ValueError(
                f"{option} weighs a term of the loss that this run does not have: give "
                f"{flag} too (or set it in the config), or leave {option} out"
            )
    if args.refit_statistics and not config.init_from:
        raise ValueError(
            "--refit-statistics refits the statistics of the model fine-tuned from "
            "--init-from; without it every run fits its own (leave the option out)"
        )
    return config


#: TrainConfig fields whose command-line option has another name
_OPTION_NAMES = {
    "max_epochs": "--epochs",
    "max_minutes": "--minutes",
    "early_stopping_patience": "--patience",
}


def _option(field: str) -> str:
    """The ``atomlens train`` option that sets the TrainConfig field ``field``."""
    return _OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def _the_files_only_target(config):
    """A data file given without --target (nor a config or preset that names one): its only
    target, when the default (QM9's U0) is not in it and the choice is not ambiguous; with
    the data set, checked for that config, so that training does not read the file again."""
    from ..data.sources.open import open_dataset
    from ..training.train import load_dataset

    data = open_dataset(config.data, config.energy_unit, config.length_unit)
    data.opened_from = config.data  # training records this name as the run's data
    targets = data.model_targets
    if config.target not in data.targets and len(targets) == 1:
        print(f"target: {targets[0]!r}, the only one in {config.data}")
        config = config.updated(target=targets[0])
    # the default, or several to choose from: load_dataset says which
    return config, load_dataset(config, opened=data)


def run_train(args) -> int:
    from ..training.train import train

    if args.ensemble is not None and args.ensemble < 1:  # 0 trained one model, silently
        raise ValueError(f"--ensemble must be at least 1 (models), not {args.ensemble}")
    if args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, not {args.parallel}")
    config = config_from_args(args)
    args.run_folder = Path(config.out)  # for the Ctrl-C message (what --resume would find)
    data = None  # read by training, unless read here already
    if args.data and not (args.target or args.config or args.preset or args.init_from):
        config, data = _the_files_only_target(config)
    if args.ensemble is not None:
        from ..training.ensemble import MANIFEST, train_ensemble

        members = train_ensemble(
            config,
            args.ensemble,
            data=data,
            overwrite=args.overwrite,
            resume=args.resume,
            parallel=args.parallel,
            started=args.started,
        )
        print(
            f"ensemble of {len(members)} models saved in {Path(config.out)} "
            f"(model_0 .. model_{len(members) - 1}, ensemble.json)"
        )
        for k, metrics in enumerate(members):
            print(f"model_{k}:")
            _print_run(metrics, f"model_{k}")
            _print_metrics(metrics, config.target, metrics.get("unit", ""))
        committee = json.loads((Path(config.out) / MANIFEST).read_text())["committee"]
        if committee:
            print(f"committee (mean of the members, {committee['n_evaluated']} test structures):")
            _print_metrics(committee, config.target, committee["unit"])
        return 0
    if args.parallel != 1:
        raise ValueError("--parallel trains the members of an --ensemble at once")
    metrics = train(
        config, resume=args.resume, overwrite=args.overwrite, started=args.started, data=data
    )
    if metrics:
        print(f"model saved in {Path(config.out) / 'model'}")
        _print_run(metrics)
        _print_metrics(metrics, config.target, metrics.get("unit", ""))
        if not metrics.get("n_test"):  # all structures went to training and validation
            print(
                "no test split (n_test = 0), so no test errors; see the validation errors "
                f"with: atomlens evaluate {config.out} --split val"
            )
    return 0


def count_or_fraction(text: str) -> int | float:
    """A split size on the command line: ``1000`` a count, ``0.8`` a fraction (a decimal
    point or an exponent makes a float; :func:`atomlens.data.splits.random_split` refuses the
    ambiguous ``1.0``)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a count nor a fraction"
            ) from None


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="MAE and RMSE of a trained model (or an ensemble's committee) on a split",
    )
    p.add_argument(
        "model",
        help="model folder, training output folder, or an ensemble folder (atomlens train "
        "--ensemble: the errors of the members' mean, each member's, and their spread)",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test", "all"],
        help="the structures scored (default: test; with --data: all). A split of a --data "
        "file only if it holds the very data the run was trained on (its fingerprint)",
    )
    p.add_argument(
        "--data",
        help="another data set, scored whole (default: the one the model was trained on)",
    )
    p.add_argument(
        "--energy-unit",
        help="unit of energies in the --data file if it states none "
        "(eV, meV, hartree, kcal/mol, kJ/mol; not the training file's)",
    )
    p.add_argument(
        "--length-unit",
        help="unit of lengths in the --data file if it states none (Angstrom, bohr, nm)",
    )
    p.add_argument("--batch-size", type=int, default=100, help="structures per model call")
    p.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="score a --data file with elements absent from the training data (its errors "
        "then measure extrapolation; refused without this)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    add_device(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from ..ensemble import ensemble_members, is_ensemble_folder, load_ensemble
    from ..models.io import model_folder, read_config
    from ..training.evaluate import evaluate

    is_ensemble = is_ensemble_folder(args.model)
    folders = ensemble_members(args.model) if is_ensemble else [model_folder(args.model)]
    # one target and unit for all members (refused otherwise)
    models = load_ensemble(folders, device=resolve_device(args.device))
    data, indices, split, config = _evaluation_set(args, folders, models)
    forces = bool(config.forces) and "forces" in data.targets
    stress = bool(config.stress) and "stress" in data.targets
    target, unit = models[0].target, read_config(folders[0])["model"].get("unit", "")
    label = "all frames" if split == "all" else f"{split} split"
    if not len(indices):
        raise ValueError(f"{args.model}: the {split} split holds no structures")
    if not is_ensemble:
        metrics = evaluate(models[0], data, indices, args.batch_size, forces=forces, stress=stress)
        if args.json:
            print(json.dumps({"split": split, "n": len(indices), "unit": unit, **metrics}))
        else:
            print(f"{folders[0]}: {target} on {len(indices)} structures ({label})")
            _print_metrics(metrics, target, unit)
        return 0
    from ..training.ensemble import committee_of

    saved = []
    for model in models:  # the members' predictions, then the errors of their mean
        _, predictions = evaluate(
            model,
            data,
            indices,
            args.batch_size,
            forces=forces,
            stress=stress,
            return_predictions=True,
        )
        saved.append({"target": target, "unit": unit, **predictions})
    committee = committee_of(saved)
    if args.json:
        print(json.dumps({"split": split, "n": len(indices), **committee}))
        return 0
    print(
        f"{args.model}: committee of {len(models)} models, {target} on {len(indices)} "
        f"structures ({label})"
    )
    _print_metrics(committee, target, unit)
    members = ", ".join(describe_error(mae, unit) for mae in committee[f"member_{target}_mae"])
    print(f"{'MEMBERS MAE':>16}: {members}")
    print(f"{'MEAN SPREAD':>16}: {describe_error(committee[f'{target}_spread_mean'], unit)}")
    if "forces_spread_mean" in committee:
        print(
            f"{'FORCES SPREAD':>16}: "
            f"{describe_error(committee['forces_spread_mean'], 'eV/Angstrom')} (per atom, norm)"
        )
    if "stress_spread_mean" in committee:
        print(
            f"{'STRESS SPREAD':>16}: {committee['stress_spread_mean'] * 1000:.3f} "
            f"meV/Angstrom^3 (per component)"
        )
    return 0


def _evaluation_set(args, folders: list[Path], models: list):
    """The data, structure indices, split name and training config that ``evaluate``
    scores: the models' split of their training data, or a --data file whole. An
    ensemble's members must share the split (``atomlens train --ensemble`` gives them
    one): another member's test structures could be in a member's training split."""
    from ..data.splits import load_split
    from ..training.config import TrainConfig, load_config
    from ..training.train import load_dataset

    cfg_file = folders[0] / "train_config.yaml"
    config = load_config(cfg_file) if cfg_file.exists() else TrainConfig(target=models[0].target)
    if args.data:  # its own units (the training file's declaration is not this file's), whole
        config = dataclasses.replace(
            config,
            data=args.data,
            energy_unit=args.energy_unit,
            length_unit=args.length_unit,
            max_structures=None,
        )
    elif args.energy_unit or args.length_unit:
        raise ValueError("--energy-unit and --length-unit describe a --data file")
    split = args.split or ("all" if args.data else "test")
    splits = [load_split(folder / "split.npz") for folder in folders] if split != "all" else []
    for folder, other in zip(folders[1:], splits[1:]):  # before the data set is read
        if any(not np.array_equal(splits[0][k], other[k]) for k in ("train", "val", "test")):
            raise ValueError(
                f"{folder}: trained on another split than {folders[0]}; the committee's "
                f"{split} errors would mix in training structures (score a --data file instead)"
            )
    data = load_dataset(config, fixed_target=True)
    if args.data:  # as predict, md and insight do: no silent scores of untrained elements
        from ..models.guards import check_elements

        for model in models:
            check_elements(model, data.elements, args.allow_unknown_elements, args.data)
    elif args.allow_unknown_elements:
        raise ValueError("--allow-unknown-elements is for a --data file")
    if split != "all":
        _check_split_fits(args, folders, data, split, config.data)
    if split == "all":  # another data set is scored whole: its frames are not the split
        return data, np.arange(len(data)), split, config
    return data, splits[0][split], split, config


def _check_split_fits(args, folders: list[Path], data, split: str, name: str) -> None:
    """Refuse to score a split of ``data`` that is not the data the runs were trained on
    (their recorded fingerprints): a changed or reordered training file, or another --data
    file, would be scored on other structures (training ones, perhaps) under the split's
    name. A run without a fingerprint (older atomlens) is scored on its own data as before;
    a --data file cannot be checked against it and is refused."""
    from ..training.run_folder import FINGERPRINT, run_of, same_data

    for folder in folders:
        run = run_of(folder)  # the fingerprint's folder
        same = same_data(run, data)
        if same is None and args.data:
            raise ValueError(
                f"--split {split} with --data: {run} records no {FINGERPRINT} (an older "
                f"run), so whether {args.data} holds its training data cannot be checked; "
                f"leave out --data to score the run's own data, or --split to score the "
                f"file whole"
            )
        if same is False and args.data:
            raise ValueError(
                f"--split {split} with --data: the split indexes the data {run} was trained "
                f"on, and {args.data} holds other data (its content differs from the "
                f"run's {FINGERPRINT}); leave out --split (or --split all) to score the "
                f"file whole, or --data to score the run's own data"
            )
        if same is False:
            raise ValueError(
                f"{name}: the data has changed since {run} was trained on it (its content "
                f"differs from the run's {FINGERPRINT}), so the {split} split's indices "
                f"would pick other structures, training ones perhaps; restore the "
                f"training data, or score the file whole with --data {name}"
            )


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="predict for structures in any ASE-readable file",
        description="Predict with one model, or with an ensemble (several models, or a folder "
        "written by 'atomlens train --ensemble K': mean and spread). Predictions "
        "are stored under their own keys (atomlens_<target>, "
        "atomlens_atomic_<target>, atomlens_forces, atomlens_stress, and *_std for "
        "ensembles), so "
        "reference values in the input file are kept beside them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model", nargs="+", help="model folder(s), training output folder(s) or an ensemble folder"
    )
    p.add_argument("file", help="xyz, extxyz, ASE db, traj, ... (anything ase.io.read reads)")
    p.add_argument("--index", default=":", help="which frames (ASE index syntax)")
    p.add_argument("--forces", action="store_true", help="also predict forces (eV/Angstrom)")
    p.add_argument(
        "--stress",
        action="store_true",
        help="also predict the stress of the periodic structures (eV/Angstrom^3, Voigt order "
        "xx yy zz yz xz xy, as ASE; positive under tension)",
    )
    p.add_argument("--out", help="write the structures with the predictions as extxyz")
    p.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="predict for elements the model was not trained on (a warning)",
    )
    p.add_argument("--chunk", type=int, default=1000, help="structures per model call")
    add_device(p)
    p.set_defaults(func=run_predict)


#: prefix of every value ``atomlens predict`` stores in a structure (info / arrays keys)
PREDICTION_PREFIX = "atomlens_"


def run_predict(args) -> int:
    from ase.stress import full_3x3_to_voigt_6_stress

    from ..data.dataset import dataset_from_atoms
    from ..data.sources.ase_files import read_structures
    from ..ensemble import load_ensemble, predict_ensemble
    from ..models.inference import predict_in_chunks

    models = load_ensemble(args.model, device=resolve_device(args.device))
    model, unit = models[0], models[0].config.unit
    frames = read_structures(args.file, args.index)
    if args.out:
        from ..fileio import check_outputs

        if Path(args.out).suffix.lower() not in (".xyz", ".extxyz"):
            raise ValueError(
                f"--out {args.out}: the predictions are written as extxyz; name a .extxyz "
                f"or .xyz file"
            )
        check_outputs({"--out": args.out}, [args.file, *args.model])
    if args.out and not Path(args.out).parent.is_dir():  # refused before any work, not created
        raise FileNotFoundError(
            f"--out {args.out}: its folder {Path(args.out).parent} does not exist (create it "
            f"first; predictions are not written into a folder made from a typo)"
        )
    dataset_from_atoms(frames, source=args.file, targets=False)  # validate before any output
    periodic = [bool(atoms.pbc.any()) for atoms in frames]
    if args.stress:
        from ..models.guards import require_extensive_energy

        require_extensive_energy(model, "--stress (the derivative of the energy by strain) and")
        if not any(periodic):
            raise ValueError(
                f"--stress: none of the structures of {args.file} has a periodic cell (stress "
                f"is per volume of a cell)"
            )
    if not args.allow_unknown_elements:  # refused naming the file (allowed: predict warns)
        from ..models.guards import refuse_unknown_elements

        refuse_unknown_elements(models, frames, args.file)
    if len(models) == 1:
        predict = model.predict
    else:

        def predict(atoms, **options):
            return predict_ensemble(models, atoms, **options)

    out = predict_in_chunks(
        predict,
        frames,
        args.chunk,
        forces=args.forces,
        stress=args.stress,
        allow_unknown_elements=args.allow_unknown_elements,
    )
    target, std = model.target, len(models) > 1
    charges = "charges" in out  # a dipole model: the per-atom values are partial charges (e)
    atomic_name, atomic_unit = ("charges", "e") if charges else (f"atomic_{target}", unit)
    print(
        f"{'ensemble of ' + str(len(models)) + ' models' if std else 'model'}: {target} in "
        f"{unit}" + (" (mean ± standard deviation of the members)" if std else "")
    )
    start = 0
    for k, atoms in enumerate(frames):
        n = len(atoms)
        rows = slice(start, start + n)
        spread = f" ± {out[f'{target}_std'][k]:.6f}" if std else ""
        print(
            f"structure {k} ({atoms.get_chemical_formula()}): {target} = "
            f"{out[target][k]:.6f}{spread} {unit}"
        )
        if charges:
            print(f"    dipole ({unit}): {np.array2string(out['dipole'][k], precision=6)}")
        if args.stress and periodic[k]:
            voigt = full_3x3_to_voigt_6_stress(out["stress"][k])
            spread = (
                f" ± {np.array2string(full_3x3_to_voigt_6_stress(out['stress_std'][k]))}"
                if std
                else ""
            )
            print(
                f"    stress ({unit}/Angstrom^3, xx yy zz yz xz xy): "
                f"{np.array2string(voigt, precision=8)}{spread}"
            )
        label = "charges" if charges else f"atomic {target}"
        header = f"    {'atom':>4} {'el':>2} {f'{label} ({atomic_unit})':>20}"
        if args.forces:
            header += f"  {'F_x':>10} {'F_y':>10} {'F_z':>10} ({unit}/Angstrom)"
        print(header)
        for a, symbol in enumerate(atoms.get_chemical_symbols()):
            line = f"    {a:>4} {symbol:>2} {out['atomic'][start + a]:>20.6f}"
            if args.forces:
                line += "  " + " ".join(f"{f:>10.6f}" for f in out["forces"][start + a])
            print(line)
        # own keys: the file's reference values (info, arrays, calculator) stay as they are
        store = {target: out[target][k]}
        names = {atomic_name: "atomic"} | ({"forces": "forces"} if args.forces else {})
        if charges:  # the dipole vector (debye) beside its norm
            atoms.info[PREDICTION_PREFIX + "dipole"] = np.round(out["dipole"][k], 6)
        if std:
            store[f"{target}_std"] = out[f"{target}_std"][k]
            names |= {f"{name}_std": f"{key}_std" for name, key in names.items()}
        arrays = {name: out[key][rows] for name, key in names.items()}
        for key, value in store.items():
            atoms.info[PREDICTION_PREFIX + key] = round(float(value), 6)
        if args.stress and periodic[k]:  # Voigt, as ASE's own stress; no rounding (1e-4 scale)
            for key in ("stress", "stress_std") if std else ("stress",):
                atoms.info[PREDICTION_PREFIX + key] = full_3x3_to_voigt_6_stress(out[key][k])
        # the predictions' unit, stated in the file (the input's own values keep theirs)
        atoms.info[PREDICTION_PREFIX + "unit"] = unit
        if charges and not std:
            atoms.info[PREDICTION_PREFIX + "dipole"] = np.round(out["dipole"][k], 6)
        for key, value in arrays.items():
            atoms.arrays[PREDICTION_PREFIX + key] = np.asarray(value, dtype=np.float64)
        start += n
    if args.out:
        import ase.io

        from ..fileio import atomic_file

        with atomic_file(args.out) as tmp:
            ase.io.write(tmp, frames, format="extxyz")
        units = f"{unit}, {unit}/Angstrom" + (f", {unit}/Angstrom^3" if args.stress else "")
        print(f"written {args.out} (predictions under atomlens_* keys, {units})")
    return 0
