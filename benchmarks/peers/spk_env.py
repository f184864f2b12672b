"""A separate virtual environment with SchNetPack, for the peer comparisons.

SchNetPack is never a dependency of atomlens: the comparison benchmarks run it in its own
venv (``benchmarks/.venv-schnetpack``, ignored by git) through a subprocess, so its pins
cannot disturb the project's environment. Both use the same torch release.

    python benchmarks/peers/spk_env.py      # create it (idempotent) and print its python
"""

from __future__ import annotations

import sys
from pathlib import Path

import peer_venv  # this folder is on sys.path (the script's, or time_to_accuracy's)

SCHNETPACK_VERSION = "2.1.1"
TORCH_VERSION = "2.13.0"
VENV = Path(__file__).resolve().parents[1] / ".venv-schnetpack"
#: schnetpack 2.1.1's own runtime requirements, less two that cannot be met or are not needed:
#: it pins ``sympy<=1.12`` while torch 2.13 needs ``sympy>=1.13.3`` (sympy is used by torch's
#: compiler, not by SchNetPack's SchNet path), and it lists the dev tools black and pre-commit.
#: So these are installed first and SchNetPack itself with ``--no-deps``.
DEPENDENCIES = [
    "numpy>=2.0.0",
    "ase>=3.21",
    "h5py",
    "pyyaml",
    "hydra-core>=1.1.0",
    "pytorch-lightning>=2.0.0",
    "torchmetrics",
    "hydra-colorlog>=1.1.0",
    "rich",
    "fasteners",
    "dirsync",
    "torch-ema",
    "matscipy>=1.1.0",
    "tensorboard>=2.17.1",
    "tensorboardX>=2.6.2.2",
    "tqdm",
    "protobuf",
]


def venv_python(path: Path = VENV) -> Path:
    return peer_venv.venv_python(path)


def ensure_venv(path: Path = VENV, quiet: bool = True) -> Path:
    """Create the SchNetPack venv if it is missing or incomplete; return its python."""
    return peer_venv.ensure(
        path,
        installs=[
            [f"torch=={TORCH_VERSION}", *DEPENDENCIES],
            ["--no-deps", f"schnetpack=={SCHNETPACK_VERSION}"],
        ],
        versions={"schnetpack": SCHNETPACK_VERSION, "torch": TORCH_VERSION},
        quiet=quiet,
    )


def import_schnetpack():
    """Import SchNetPack inside its venv, after the one shim it needs on torch 2.13.

    SchNetPack 2.1.1 imports the type variable ``T_co`` from
    ``torch.utils.data.dataloader``, which newer torch no longer defines there; it is only a
    typing annotation, so an equivalent ``TypeVar`` is put back before the import.
    """
    from typing import TypeVar

    from torch.utils.data import dataloader

    if not hasattr(dataloader, "T_co"):
        dataloader.T_co = TypeVar("T_co", covariant=True)
    import schnetpack

    return schnetpack


if __name__ == "__main__":
    print(ensure_venv(quiet="-v" not in sys.argv))
