"""Separate virtual environments for the peer libraries (SchNetPack, MACE).

A peer is never a dependency of atomlens: the comparison benchmarks run it in its own venv
(``benchmarks/.venv-<peer>``, ignored by git) through a subprocess, so its pins cannot
disturb the project's environment. ``spk_env.py`` and ``mace_env.py`` say what goes in each.
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path


def venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def ready(python: Path, versions: dict[str, str]) -> bool:
    """Whether ``python`` exists and has these distributions at these versions (a local
    version label such as ``+cpu`` is ignored)."""
    if not python.exists():
        return False
    check = "import importlib.metadata as m; " + "".join(
        f"assert m.version({name!r}).split('+')[0] == {version!r}; "
        for name, version in versions.items()
    )
    return (
        subprocess.run([str(python), "-c", check], capture_output=True, check=False).returncode == 0
    )


def ensure(
    path: Path,
    installs: list[list[str]],
    versions: dict[str, str],
    quiet: bool = True,
) -> Path:
    """Create the venv at ``path`` if it is missing or incomplete; return its python.

    ``installs``: the ``pip install`` argument lists, run in order.
    """
    python = venv_python(path)
    if ready(python, versions):
        return python
    if not python.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
    pip = [str(python), "-m", "pip", "install", *(["-q"] if quiet else [])]
    for arguments in installs:
        subprocess.run([*pip, *arguments], check=True)
    if not ready(python, versions):
        wanted = ", ".join(f"{name}=={version}" for name, version in versions.items())
        raise RuntimeError(f"{path}: {wanted} could not be installed")
    return python
