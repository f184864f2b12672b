"""A separate virtual environment with MACE (PyPI ``mace-torch``), for the peer comparisons.

MACE is never a dependency of atomlens: ``benchmarks/md17.py --mace`` runs it in its own venv
(``benchmarks/.venv-mace``, ignored by git) through a subprocess, like SchNetPack
(``spk_env.py``), so its pins cannot disturb the project's environment. Both use the same
torch release: ``torch==2.13.0`` is installed first, on its own, so that pip takes the CPU
wheel from local disk and never resolves a plain ``torch`` (a multi-GB CUDA build).

mace-torch 0.3.16's requirements (``torch>=1.12``, ``e3nn==0.4.4``, ``numpy``, ``ase``,
``matscipy``, ``torch-ema``, ``torchmetrics``, ...) are all met by the package mirror and none
conflicts with torch 2.13, so mace-torch is then installed with its own dependencies, pinned
to the version this comparison was written against; no ``--no-deps`` workaround is needed.

    python benchmarks/peers/mace_env.py      # create it (idempotent) and print its python
"""

from __future__ import annotations

import sys
from pathlib import Path

import peer_venv  # this folder is on sys.path (the script's, or time_to_accuracy's)

MACE_VERSION = "0.3.16"
TORCH_VERSION = "2.13.0"
VENV = Path(__file__).resolve().parents[1] / ".venv-mace"


def ensure_venv(path: Path = VENV, quiet: bool = True) -> Path:
    """Create the MACE venv if it is missing or incomplete; return its python."""
    return peer_venv.ensure(
        path,
        # torch alone first: with it installed, mace-torch's ``torch>=1.12`` is already met
        installs=[
            [f"torch=={TORCH_VERSION}"],
            [f"torch=={TORCH_VERSION}", f"mace-torch=={MACE_VERSION}"],
        ],
        versions={"mace-torch": MACE_VERSION, "torch": TORCH_VERSION},
        quiet=quiet,
    )


if __name__ == "__main__":
    print(ensure_venv(quiet="-v" not in sys.argv))
