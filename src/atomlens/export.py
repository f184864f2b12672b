"""A saved model as one self-contained file: the energy-and-forces program, via ``torch.export``.

    (positions (n, 3) Angstrom, numbers (n,) int64)  ->  (E () eV, F (n, 3) eV/Angstrom)
    F_i = -dE/dR_i

The exported program holds the weights, the fitted statistics and the backward pass that
gives the forces, as plain ATen operations; it runs with nothing but PyTorch::

    import torch
    program = torch.export.load("model.pt2").module()
    energy, forces = program(positions, numbers)      # float32 tensors for a float32 model

How: ``torch.export`` does not trace ``autograd.grad``, so the function positions ->
(E, -dE/dR) (a ``torch.func.grad_and_value``) is first traced by ``make_fx`` into a graph
where the backward pass is explicit, and that graph is exported with the number of atoms
as a dynamic dimension (2 atoms or more). Pairs are all ordered pairs i != j, built by
index arithmetic; the model's smooth cutoff zeroes those beyond it, so the program is the
model itself and not an approximation of it. A JSON description (units, elements, cutoff,
inputs) is stored inside the file as ``extra_files["atomlens.json"]``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .data.batch import Pairs
from .fileio import atomic_file
from .models.potential import AtomisticModel
from .units import energy_factor

DESCRIPTION = "atomlens.json"


def all_ordered_pairs(
    n: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (i, j), i != j, of ``n`` atoms: ``n (n - 1)`` pairs, i-major.

    Pair k has i = k // (n - 1) and j = r + (r >= i) with r = k mod (n - 1): index arithmetic
    only, so the pair count stays a symbolic function of ``n`` in an exported graph.
    """
    k = torch.arange(n * (n - 1), device=device)
    i = torch.div(k, n - 1, rounding_mode="floor")
    r = k - i * (n - 1)
    return i, r + (r >= i).to(r.dtype)


class EnergyAndForces(nn.Module):
    """One molecule's energy (eV) and forces (eV/Angstrom) from an atomlens energy model.

    The model is copied and frozen; the caller's model is never changed.
    """

    def __init__(self, model: AtomisticModel):
        super().__init__()
        from .models.guards import require_extensive_energy

        require_extensive_energy(model, "export (energy and forces)")
        self.energy_to_ev = energy_factor(model.config.unit)  # (checked above)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def forward(
        self, positions: torch.Tensor, numbers: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pair_i, pair_j = all_ordered_pairs(positions.shape[0], positions.device)
        pairs = Pairs(pair_i, pair_j, None, symmetric=False)

        def energy(r: torch.Tensor) -> torch.Tensor:
            return self.model.atomic_energies(numbers, r, pairs).sum()

        gradient, total = torch.func.grad_and_value(energy)(positions)
        return total * self.energy_to_ev, -gradient * self.energy_to_ev


def _example(model: AtomisticModel) -> tuple[torch.Tensor, torch.Tensor]:
    """A small molecule to trace with (methanol; its shape does not matter, its size is dynamic)."""
    from ase.build import molecule

    atoms = molecule("CH3OH")
    dtype = next(model.parameters()).dtype
    return (
        torch.as_tensor(atoms.positions, dtype=dtype),
        torch.as_tensor(atoms.numbers, dtype=torch.int64),
    )


def export_program(model: AtomisticModel) -> torch.export.ExportedProgram:
    """The :class:`EnergyAndForces` of ``model`` as a ``torch.export`` program (CPU)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .nn import kernels

    function = EnergyAndForces(model).cpu()  # a copy: the caller's model stays where it is
    positions, numbers = _example(model)
    enabled = kernels.fused_enabled()
    kernels.set_fused(False)  # the plain formulas: the graph must not hold compiled kernels
    try:
        # weights enter the graph as constants (they are not inputs of the program)
        graph = make_fx(function, tracing_mode="symbolic", _allow_non_fake_inputs=True)(
            positions, numbers
        )
    finally:
        kernels.set_fused(enabled)
    n_atoms = torch.export.Dim("n_atoms", min=2)
    return torch.export.export(
        _Graph(graph),
        (positions, numbers),
        strict=False,
        dynamic_shapes={"positions": {0: n_atoms}, "numbers": {0: n_atoms}},
    )


class _Graph(nn.Module):
    """Holds the traced graph as a module, what ``torch.export.export`` takes."""

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph

    def forward(self, positions, numbers):
        return self.graph_module(positions, numbers)


def export_model(model: AtomisticModel, path: str | os.PathLike, molecules: bool = False) -> Path:
    """Write ``model``'s energy-and-forces program to ``path`` (``.pt2``), atomically.

    Load it with ``torch.export.load(path).module()``, no atomlens needed; inputs are
    positions (n, 3) in Angstrom in the model's dtype and atomic numbers (n,) int64.
    A model trained on periodic cells (its metadata say so) is refused unless
    ``molecules=True``: the program has no cell input and would treat a crystal as an
    isolated cluster.
    """
    if not molecules and (getattr(model, "metadata", None) or {}).get("periodic"):
        raise ValueError(
            "the model was trained on periodic cells; the exported program has no cell "
            "input and would treat a crystal as an isolated cluster. Use atomlens.Calculator "
            "for cells, or export it for isolated structures (molecules=True, --molecules)"
        )
    program = export_program(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    description = {
        "atomlens_version": __version__,
        "torch_version": torch.__version__,
        "inputs": {
            "positions": f"(n_atoms, 3) {dtype}, Angstrom",
            "numbers": "(n_atoms,) int64, atomic numbers; n_atoms >= 2",
        },
        "outputs": {"energy": f"() {dtype}, eV", "forces": f"(n_atoms, 3) {dtype}, eV/Angstrom"},
        "cutoff_angstrom": model.cutoff,
        "max_z": model.config.max_z,
        "model": model.config.to_dict(),
        "metadata": getattr(model, "metadata", {}),
    }
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.export.save(
            program, str(tmp), extra_files={DESCRIPTION: json.dumps(description, indent=1)}
        )
    return path


def read_description(path: str | os.PathLike) -> dict:
    """The JSON description stored in an exported file (units, inputs, model config)."""
    files = {DESCRIPTION: ""}
    torch.export.load(str(path), extra_files=files)
    return json.loads(files[DESCRIPTION])
