"""Options every command shares; argument parsing only (no torch)."""

from __future__ import annotations

import argparse
import math


def add_threads_everywhere(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--threads`` on every command that runs something and lacks it (nested subcommands
    included; not on ``atomlens`` itself nor on a group such as ``insight``: a subcommand's
    default would overwrite the value given before it)."""
    group = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            group = True
            for command in action.choices.values():
                add_threads_everywhere(command, top=False)
    runs = parser.get_default("func") is not None  # ``explain`` runs and has a subcommand
    if top or (group and not runs):
        return
    if any("--threads" in action.option_strings for action in parser._actions):
        return
    parser.add_argument(
        "--threads",
        type=int,
        # absent unless given: a subcommand's default had overwritten the value given to its
        # group before it (``explain --threads 3 molecule ...``)
        default=argparse.SUPPRESS,
        help="torch CPU threads (default: the CPUs available to atomlens, 1 if 2 or fewer, "
        "or OMP_NUM_THREADS if set)",
    )


def add_device(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    """``--device``: where the model runs (:func:`resolve_device`)."""
    parser.add_argument(
        "--device",
        default=default,
        help=f"cpu, cuda, cuda:1, ... or auto (a GPU when torch sees one, else the CPU); "
        f"default {default}",
    )


def resolve_device(name: str) -> str:
    """The torch device of a ``--device`` value: ``auto`` is a GPU when torch sees one,
    else the CPU; a GPU that torch does not see is an error, never a silent CPU run."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from None
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xla, meta, ...: not atomlens
        raise ValueError(f"--device {name}: atomlens runs on cpu, cuda[:N] or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; "
            f"use --device cpu (or auto)"
        )
    return name


#: the comparisons a numeric option can be held to (:func:`check_numbers`)
_COMPARISONS = {">=": float.__ge__, ">": float.__gt__}


def check_numbers(args: argparse.Namespace, rules: dict[str, str], infinite: tuple = ()) -> None:
    """Refuse a numeric option that is NaN, infinite or out of its range, naming it, before
    any work: ``--padding must be >= 0, not -1.0``.

    ``rules`` maps an option (``"--chunk-size"``) to its range (``">= 1"``, ``"> 0"``) or to
    ``""`` for any finite number; an option left unset (None) is skipped. The options in
    ``infinite`` may be ``inf`` (a limit that is off)."""
    for option, rule in rules.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        finite = math.isfinite(value) or (option in infinite and value == math.inf)
        if rule:
            comparison, bound = rule.split()
            in_range = finite and _COMPARISONS[comparison](float(value), float(bound))
        else:
            in_range = finite
        if not in_range:
            what = rule if finite else f"a finite number{' ' + rule if rule else ''}"
            raise ValueError(f"{option} must be {what}, not {value}")
