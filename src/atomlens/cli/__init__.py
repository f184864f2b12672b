"""The ``atomlens`` command: parses arguments, calls the library, prints.

One module per command group, each with ``add_parser(subparsers)`` and the ``run``
functions the parsed arguments point at:

=====================  ==================================================================
:mod:`.train`          ``train``, ``evaluate``, ``predict``
:mod:`.demo`           ``demo``
:mod:`.sample`         ``sample`` (ab initio reference data)
:mod:`.md`             ``md`` (molecular dynamics)
:mod:`.insight`        ``insight`` (atomic energies, potential maps, rings, isomers, ...)
:mod:`.explain`        ``explain`` (digits study) and ``explain molecule``
                       (:mod:`.explain_molecule`)
:mod:`.export`         ``export`` (torch.export)
:mod:`._common`        options every command shares (``--threads``)
=====================  ==================================================================

Error policy (the one place is :func:`main`): an expected user error, that is an exception
of a class in :data:`USER_ERRORS` (bad values and bad input files, unknown elements and
targets: ``ValueError`` with its subclasses ``DataError``, ``RunFolderError``,
``MDUnstableError``; missing, unreadable or read-only paths: ``OSError``; an optional package
not installed: ``MissingExtra``), is printed as one line ``atomlens <command>: error:
<message>`` on stderr, and the exit status is 2, as for argparse's own usage errors. Any
other exception is a bug: it propagates with its traceback. ``--debug`` (before the
command) or the environment variable ``ATOMLENS_DEBUG=1`` prints the traceback of expected
errors too. The commands raise; none of them prints errors or chooses exit statuses for
them.

Importing this package and ``atomlens --help`` load neither torch nor matplotlib: the
command modules import the library inside their ``run`` functions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from .._optional import MissingExtra
from ._common import add_threads_everywhere

__all__ = ["COMMAND_MODULES", "USER_ERRORS", "build_parser", "main"]

#: command modules, in the order of ``atomlens --help``
COMMAND_MODULES = [
    "atomlens.cli.demo",
    "atomlens.cli.train",
    "atomlens.cli.sample",
    "atomlens.cli.md",
    "atomlens.cli.insight",
    "atomlens.cli.explain",
    "atomlens.cli.export",
]

#: exceptions that are the user's to fix: one line on stderr, exit status 2, no traceback.
#: ``ValueError`` covers ``DataError`` (bad data files, unknown elements),
#: ``RunFolderError`` (run-folder lock and conflicts) and ``MDUnstableError``; ``OSError``
#: covers missing (``FileNotFoundError``), unreadable and read-only paths.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MissingExtra)

#: exit status of an expected user error (argparse uses 2 for usage errors too)
USER_ERROR_STATUS = 2


def build_parser() -> argparse.ArgumentParser:
    """The ``atomlens`` argument parser with every command (torch is not imported)."""
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="atomlens", description="Deep learning for quantum chemistry you can look inside."
    )
    parser.add_argument("--version", action="version", version=f"atomlens {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of expected errors too (or set ATOMLENS_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    add_threads_everywhere(parser)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("ATOMLENS_DEBUG", "") not in (
        "",
        "0",
    )


def _log_to_stderr() -> None:
    """The library's notes (e.g. compiling) on stderr, prefixed ``atomlens:``."""
    import logging

    logger = logging.getLogger("atomlens")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("atomlens: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


#: exit status when stdout's reader has gone (128 + SIGPIPE, as shells report it)
BROKEN_PIPE_STATUS = 141
#: exit status after a Ctrl-C (128 + SIGINT, as shells report it)
INTERRUPTED_STATUS = 130
#: what a command's user can do after a Ctrl-C
INTERRUPTED_HINTS = {
    "train": (
        "; every finished epoch is saved: run the same command with --resume to go on "
        "from the last one"
    ),
    "md": "; the steps done so far are kept in the output files",
}


def _resumable(out) -> bool:
    """Whether a training run (or an ensemble's member) in ``out`` saved a checkpoint."""
    if out is None:
        return False
    out = Path(out)
    return (out / "checkpoints" / "last.ckpt").is_file() or any(
        out.glob("model_*/checkpoints/last.ckpt")
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``atomlens`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from ..runtime import configure, ignore_dependency_warnings, prepare_environment

    started = time.monotonic()  # budgets (train --minutes) count from here
    prepare_environment()  # before torch loads: libgomp reads its wait policy once
    args = build_parser().parse_args(argv)  # before any heavy import: --help stays fast
    args.started = started
    try:
        threads = getattr(args, "threads", None)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be >= 1, not {threads}")
        try:
            configure(threads=threads)
        except ValueError as err:  # the option's name, as for every other option
            if not str(err).startswith("threads "):
                raise
            raise ValueError(f"--{err}") from None
        _log_to_stderr()
        ignore_dependency_warnings()
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`atomlens predict ... | head`): no message
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no real stdout
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # flush at exit
        return BROKEN_PIPE_STATUS
    except USER_ERRORS as err:
        if _debug(args):
            traceback.print_exc()
        print(f"atomlens {args.command}: error: {err}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        if _debug(args):
            traceback.print_exc()
        hint = INTERRUPTED_HINTS.get(args.command, "")
        if args.command == "train" and not _resumable(getattr(args, "run_folder", None)):
            hint = "; no epoch had finished, nothing to resume: run the command again"
        print(f"atomlens {args.command}: interrupted{hint}", file=sys.stderr)
        return INTERRUPTED_STATUS
