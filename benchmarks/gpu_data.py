"""Write the data ``benchmarks/gpu.sh`` carries to a GPU machine that has no network.

    python benchmarks/gpu_data.py [--out .gpu]

``OUT/qm9-20k``: 20,000 QM9 molecules (seed 0) with U0, a packed atomlens dataset (9 MB), from
the local qm9pack cache; ``OUT/md17-xtb/aspirin.npz``: the first 600 frames of
``../shared/data/md17-xtb/aspirin.npz`` (when present; else md_speed.py rattles an RDKit
aspirin, which needs RDKit there). Carry OUT and ``.whl`` (the wheels of the packages the
machine lacks) with the run, e.g. the device tool's ``carry: [".gpu", ".whl"]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--n-molecules", type=int, default=20000)
    args = parser.parse_args(argv)
    from atomlens.data.sources.qm9 import load_qm9

    data = load_qm9()
    indices = np.sort(np.random.default_rng(0).choice(len(data), args.n_molecules, replace=False))
    subset = data.subset(indices)
    subset.targets = {"U0": np.asarray(subset.targets["U0"])}
    subset.extras = {}
    subset.save(args.out / f"qm9-{args.n_molecules // 1000}k")
    aspirin = ROOT.parent / "shared" / "data" / "md17-xtb" / "aspirin.npz"
    if aspirin.is_file():
        frames = np.load(aspirin)
        (args.out / "md17-xtb").mkdir(parents=True, exist_ok=True)
        np.savez(
            args.out / "md17-xtb" / "aspirin.npz",
            **{
                k: frames[k] if k == "z" or frames[k].ndim == 0 else frames[k][:600] for k in frames
            },
        )
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
