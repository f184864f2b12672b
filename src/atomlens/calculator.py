"""An ASE calculator around a trained atomlens energy model.

    E = sum_i E_i          energy (eV), atomic energies E_i ("energies", eV)
    F_i = -dE/dR_i         forces (eV/Angstrom), by autograd through the one energy model

Built for molecular dynamics of one molecule, where the model runs thousands of times on the
same atoms: the atoms are validated (elements, NaN, overlapping atoms, no periodic cell) once,
when the calculator first sees them or when their numbers change; each later call only turns
the positions into a tensor, picks the pairs within the cutoff from a cached list of all pairs,
and runs the model. No packed dataset, no per-step validation.
"""

from __future__ import annotations

import copy
import os
from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from .data.batch import Batch
from .data.dataset import DataError, dataset_from_atoms
from .models.potential import AtomisticModel
from .units import energy_factor

DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


class Calculator(AseCalculator):
    """ASE calculator for an atomlens energy model (energies in eV, forces in eV/Angstrom).

    Args:
        model: an :class:`~atomlens.models.AtomisticModel` or the path of a saved model folder
            (or of the training output folder holding ``model/``).
        device: torch device to run on (``"cpu"``, ``"cuda"``, ...).
        dtype: ``"float64"`` (or ``torch.float64``) for tight finite-difference checks and
            energy conservation tests; ``None`` keeps the model's own dtype. A model passed
            in is copied, never changed, when device or dtype differ from its own.

        compile: compile energy + forces (``torch.func`` gradient, ``torch.compile``) for
            fast repeated calls on one molecule, e.g. MD: aspirin runs ~3.5x as many steps
            per second on one CPU thread, after a compile of a few seconds per molecule. All
            pairs are then kept and the smooth cutoff zeroes those beyond it, so the shapes
            stay fixed while the atoms move.

    SchNet filters are read from tables computed once (see :mod:`atomlens.models.schnet`).

    ``implemented_properties``: ``energy``, ``free_energy`` (= energy), ``forces`` and
    ``energies`` (atomic energies E_i, which sum to the energy).
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model: AtomisticModel | str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        dtype = DTYPES[dtype] if isinstance(dtype, str) or dtype is None else dtype
        if isinstance(model, (str, os.PathLike)):
            from .models.io import load_model

            model = load_model(model, device=device, dtype=dtype)
        else:  # a private copy: the caller's model is never changed
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        config = model.config
        if config.aggregation != "sum":
            raise ValueError(f"the model predicts {config.target!r} as a mean over atoms; an "
                             f"ASE calculator needs an extensive energy model")
        try:
            self.energy_to_ev = energy_factor(config.unit)
        except ValueError:
            raise ValueError(f"the model predicts {config.target!r} in {config.unit!r}, not an "
                             f"energy; the calculator needs an energy model") from None
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._numbers: np.ndarray | None = None  # the numbers the cached tensors belong to
        self.compile = compile
        # frozen: gradients w.r.t. positions only, and the filter tables (SchNet) computed once
        # instead of at every call
        self.model.eval().requires_grad_(False)
        self._representation_kwargs: dict = {}
        if getattr(self.model.representation, "filter_spacing", None) is not None:
            with torch.no_grad():
                self._representation_kwargs["tables"] = self.model.representation.filter_tables()

    # ------------------------------------------------------------------ set-up per molecule
    def _prepare(self, atoms) -> None:
        """Validate ``atoms`` and cache the tensors that depend only on their numbers."""
        if atoms.pbc.any():
            raise DataError("atomlens models describe isolated molecules; the atoms are "
                            "periodic (set atoms.pbc = False)")
        numbers = atoms.get_atomic_numbers()
        if len(numbers) and numbers.max() > self.model.config.max_z:
            raise DataError(f"element Z={int(numbers.max())} is beyond the model's "
                            f"max_z={self.model.config.max_z}")
        dataset_from_atoms([atoms], source="Calculator", targets=False)  # elements, NaN, overlaps
        n = len(numbers)
        i, j = torch.triu_indices(n, n, offset=1, device=self.device)
        self._upper = (i, j)  # all unordered pairs; filtered by the cutoff at every call
        self._batch_numbers = torch.as_tensor(numbers, dtype=torch.int64, device=self.device)
        self._structure_index = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._n_atoms_per = torch.tensor([n], dtype=torch.int64, device=self.device)
        self._numbers = numbers.copy()
        if self.compile:
            self._compiled = torch.compile(self._energy_forces_function(), dynamic=False)

    def _energy(self, positions: torch.Tensor, pair_i: torch.Tensor, pair_j: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy, atomic energies) in the model's unit, from symmetric-layout pairs."""
        numbers = self._batch_numbers
        features = self.model.representation(numbers, positions, pair_i, pair_j, True,
                                             **self._representation_kwargs)
        atomic = self.model.atomic_contributions(features, numbers)
        return atomic.sum(), atomic

    def _energy_forces_function(self):
        """positions -> (energy, forces, atomic energies) on all pairs, for torch.compile."""
        i, j = self._upper
        pair_i, pair_j = torch.cat([i, j]), torch.cat([j, i])

        def energy(positions):
            return self._energy(positions, pair_i, pair_j)

        grad_and_value = torch.func.grad_and_value(energy, has_aux=True)

        def energy_forces(positions):
            gradient, (total, atomic) = grad_and_value(positions)
            return total, -gradient, atomic

        return energy_forces

    def batch(self, atoms) -> Batch:
        """The one-structure :class:`~atomlens.data.Batch` of ``atoms`` (pairs within the cutoff)."""
        numbers = atoms.numbers
        if self._numbers is None or len(numbers) != len(self._numbers) or (
                numbers != self._numbers).any():
            self._prepare(atoms)
        positions = atoms.positions
        if not np.isfinite(positions).all():
            raise DataError("Calculator: the atoms have non-finite (NaN/inf) positions")
        positions = torch.as_tensor(positions, dtype=self.dtype, device=self.device)
        i, j = self._upper
        cutoff = self.model.cutoff
        if cutoff is not None:
            near = (positions[i] - positions[j]).pow(2).sum(-1) < cutoff * cutoff
            i, j = i[near], j[near]
        return Batch(numbers=self._batch_numbers, positions=positions,
                     structure_index=self._structure_index, n_atoms_per=self._n_atoms_per,
                     pair_i=torch.cat([i, j]), pair_j=torch.cat([j, i]), n_structures=1)

    # ------------------------------------------------------------------ ASE interface
    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation, of what the model depends on.

        ASE's generic check compares every per-atom array with ``np.isclose`` (a third of an
        MD step's time for a small molecule); the model sees only numbers, positions, cell
        and pbc, so only those are compared (magnetic moments and charges are ignored).
        """
        old = self.atoms
        if old is None or len(old) != len(atoms):
            return list(all_changes)
        changes = []
        if not np.array_equal(old.positions, atoms.positions):
            changes.append("positions")
        if not np.array_equal(old.numbers, atoms.numbers):
            changes.append("numbers")
        if not np.array_equal(old.cell.array, atoms.cell.array):
            changes.append("cell")
        if not np.array_equal(old.pbc, atoms.pbc):
            changes.append("pbc")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        if atoms is not None:  # ASE copies the atoms at every call; an MD step moves only atoms
            if self.atoms is not None and set(system_changes) <= {"positions"}:
                self.atoms.positions[:] = atoms.positions
            else:
                self.atoms = atoms.copy()
        if "numbers" in system_changes or "pbc" in system_changes:
            self._numbers = None
        forces = "forces" in properties
        if self.compile:
            self._calculate_compiled()
            return
        batch = self.batch(self.atoms)
        positions = batch.positions.requires_grad_(forces)
        with torch.set_grad_enabled(forces):
            total, atomic = self._energy(positions, batch.pair_i, batch.pair_j)
            if forces:
                (gradient,) = torch.autograd.grad(total, positions)
        factor = self.energy_to_ev
        energy = float(total.detach()) * factor
        self.results = {"energy": energy, "free_energy": energy,
                        "energies": atomic.detach().cpu().double().numpy() * factor}
        if forces:
            self.results["forces"] = -gradient.cpu().double().numpy() * factor

    def _calculate_compiled(self) -> None:
        numbers = self.atoms.numbers
        if self._numbers is None or len(numbers) != len(self._numbers) or (
                numbers != self._numbers).any():
            self._prepare(self.atoms)
        if not np.isfinite(self.atoms.positions).all():
            raise DataError("Calculator: the atoms have non-finite (NaN/inf) positions")
        positions = torch.as_tensor(self.atoms.positions, dtype=self.dtype, device=self.device)
        energy, forces, atomic = self._compiled(positions)
        factor = self.energy_to_ev
        energy = float(energy) * factor
        self.results = {"energy": energy, "free_energy": energy,
                        "energies": atomic.cpu().double().numpy() * factor,
                        "forces": forces.cpu().double().numpy() * factor}
