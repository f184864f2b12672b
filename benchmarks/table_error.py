"""Force error of SchNet's tabulated filters against float32 rounding of the direct path.

    python benchmarks/table_error.py [--model runs/u0/model] [--molecules 100] [--threads 1]
                                     [--spacings 0.01 0.02]

Reference: the direct filter network in float64. Printed, as JSON lines, the largest force
component error (meV/Angstrom) and energy error (meV) over ``--molecules`` QM9 molecules
spread across the set, for: the tables in float64 (interpolation error alone), the direct path
in float32 (float32 rounding alone) and the tables in float32 (what a float32 model runs),
the tables at each of ``--spacings`` (Angstrom; default: the model's own spacing and 0.01).
Without ``--model`` a freshly initialised SchNet of the ``qm9-u0-schnet`` preset is used.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from atomlens.data.sources.qm9 import load_qm9
from atomlens.models import build_model, load_model
from atomlens.training import preset


def with_spacing(model, spacing):
    """The same weights with ``filter_spacing`` set (``None``: direct filter network)."""
    config = model.config.to_dict()
    config["representation_kwargs"] = dict(config["representation_kwargs"], filter_spacing=spacing)
    other = build_model(config).double()
    other.load_state_dict(model.state_dict())
    return other.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained SchNet (default: freshly initialised)")
    parser.add_argument("--molecules", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spacings", type=float, nargs="+", help="table node spacings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = load_model(args.model, dtype=torch.float64)
    else:
        model = build_model(preset("qm9-u0-schnet").model).double()
    data = load_qm9()
    idx = np.linspace(0, len(data) - 1, args.molecules).astype(int)
    own = model.config.representation_kwargs.get("filter_spacing") or 0.02
    spacings = args.spacings or sorted({own, 0.01})
    direct = with_spacing(model, None)

    def run(m, dtype):
        m = m.to(dtype)
        batch = data.batch(idx, m.cutoff, dtype)
        out = m(batch, forces=True)
        m.double()
        return out[m.target].detach().double(), out["forces"].detach().double()

    energy, forces = run(direct, torch.float64)
    cases = [("direct_float32", None, direct, torch.float32)]
    for spacing in spacings:
        table = with_spacing(model, spacing)
        cases += [
            ("table_float64", spacing, table, torch.float64),
            ("table_float32", spacing, table, torch.float32),
        ]
    for name, spacing, m, dtype in cases:
        e, f = run(m, dtype)
        print(
            json.dumps(
                {
                    "case": name,
                    "filter_spacing_A": spacing,
                    "model": args.model or "initialised",
                    "molecules": len(idx),
                    "max_force_error_meV_A": float((f - forces).abs().max()) * 1e3,
                    "max_energy_error_meV": float((e - energy).abs().max()) * 1e3,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
