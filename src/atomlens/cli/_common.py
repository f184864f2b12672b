"""Options every command shares; argument parsing only (no torch)."""

from __future__ import annotations

import argparse


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
        help="torch CPU threads (default: the CPUs available to atomlens, 1 if 2 or fewer)",
    )
