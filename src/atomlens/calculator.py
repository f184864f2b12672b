"""An ASE calculator around a trained atomlens energy model, for molecules and periodic cells.

    E = sum_i E_i              energy (eV), atomic energies E_i ("energies", eV)
    F_i = -dE/dR_i             forces (eV/Angstrom), by autograd through the one energy model
    sigma = (1/V) dE/d eps     stress (eV/Angstrom^3, ASE's sign and Voigt order) of cells

Built for molecular dynamics, where the model runs thousands of times on the same atoms: the
atoms are validated (elements, NaN, overlapping atoms, cell) once, when the calculator first
sees them or when their numbers or periodicity change; later calls reuse a Verlet neighbour
list (pairs within cutoff + skin, rebuilt when an atom has moved half the skin or the cell
changed) and the model's frozen state (SchNet's filter tables), and run the model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .data.batch import Batch, Pairs
from .data.dataset import DataError, dataset_from_atoms
from .data.neighbors import VerletList
from .models.guards import check_elements, check_finite, require_extensive_energy
from .models.potential import AtomisticModel
from .nn.geometry import apply_strain
from .nn.kernels import (
    AUTO_COMPILE_MAX_ATOMS,
    auto_compile_enabled,
    compile_fixed_shapes,
    compile_mode,
    compile_option,
)
from .units import energy_factor

#: compiled periodic path: the Verlet list is padded to a capacity of this many pairs, with
#: this much headroom, so that its shape (and the compiled code) survives list rebuilds
PAIR_CAPACITY_STEP = 128
PAIR_CAPACITY_HEADROOM = 1.15
#: padding pairs (atom 0 with itself) sit this many cutoffs away, where the smooth cutoff
#: gives them exactly zero weight and zero gradient (SchNet's tabulated convolution skips
#: every pair beyond its tables' end, :func:`atomlens.nn.cfconv.filter_lookup`)
PADDING_DISTANCE = 10.0
LOGGER = logging.getLogger("atomlens")


def pair_capacity(n_pairs: int, headroom: float, limit: int | None = None) -> int:
    """Room for ``n_pairs`` pairs and ``headroom`` more, in steps of ``PAIR_CAPACITY_STEP``,
    at most ``limit``: the padded length of a compiled path's Verlet list."""
    step = PAIR_CAPACITY_STEP
    capacity = step * math.ceil(headroom * max(n_pairs, 1) / step)
    return capacity if limit is None else min(capacity, limit)


def checked_skin(skin) -> float:
    """A Verlet-list ``skin`` (Angstrom) as a float; ValueError unless a finite number >= 0
    (a negative or NaN skin lists too few pairs: wrong energies, no error)."""
    try:
        value = float(skin)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(skin, (bool, str)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"skin must be a finite number >= 0 (Angstrom), not {skin!r}")
    return value


class Calculator(AseCalculator):
    """ASE calculator for an atomlens energy model (energies in eV, forces in eV/Angstrom).

    Args:
        model: an :class:`~atomlens.models.AtomisticModel` or the path of a saved model folder
            (or of the training output folder holding ``model/``).
        device: torch device to run on (``"cpu"``, ``"cuda"``, ...).
        dtype: ``"float64"`` (or ``torch.float64``) for tight finite-difference checks and
            energy conservation tests, or ``"float32"``; ``None`` keeps the model's own dtype
            (names: :func:`~atomlens.models.io.parse_dtype`; half precisions are refused). A
            model passed in is copied, never changed, when device or dtype differ from its own.

        allow_unknown_elements: elements absent from the model's training data are refused
            unless this is True (then a warning; see :mod:`atomlens.models.guards`).
        compile: compile energy + forces (``torch.func`` gradient, ``torch.compile``) for
            fast repeated calls on one structure, e.g. MD: aspirin runs ~4.5x as many steps
            per second on one CPU thread, after a one-off compile (Inductor caches it on
            disk, so a second run of the same structure compiles faster). The compiled code
            has a C++ wrapper and checks no guards at call time
            (:func:`~atomlens.nn.kernels.compile_fixed_shapes`). Molecules keep all
            pairs and the smooth cutoff zeroes those beyond it (SchNet's tabulated
            convolution skips them), so the shapes stay fixed while
            the atoms move; periodic cells keep their Verlet list padded to a fixed capacity
            (energy, forces and the virial in one compiled function; a list that outgrows the
            capacity recompiles once, with room to spare). ``"auto"`` (the default) compiles
            periodic cells and molecules of up to :data:`~atomlens.nn.kernels.AUTO_COMPILE_MAX_ATOMS` atoms (all
            pairs grow as n^2) and says so on the ``atomlens`` logger; larger molecules and
            ``ATOMLENS_COMPILE=0`` run eagerly, and a compile that fails falls back to the
            eager path with a warning. ``True`` compiles any structure, ``False`` never.
            On a GPU, compiling records the step as a CUDA graph (``torch.compile`` mode
            ``"reduce-overhead"``, :func:`~atomlens.nn.kernels.default_compile_mode`); a
            mode name (``"default"``, ``"max-autotune"``, ...) compiles any structure with
            that mode instead.
        skin: Verlet-list skin (Angstrom): pairs within cutoff + skin are listed, and the
            list is rebuilt only when an atom has moved more than skin / 2. Every listed pair
            costs a model evaluation, so the skin is small (0.3, as ASE's neighbour list):
            at 5 Angstrom cutoff a skin of 1.0 lists 1.7x the pairs inside the cutoff, and
            64-atom Si MD ran ~1.5x slower with it than with 0.3; a rebuild costs little.

    SchNet filters are read from tables computed once (see :mod:`atomlens.models.schnet`).

    ``implemented_properties``: ``energy``, ``free_energy`` (= energy), ``forces``,
    ``energies`` (atomic energies E_i, which sum to the energy) and ``stress`` (periodic
    cells).
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "forces",
        "energies",
        "stress",
    ]

    def __init__(
        self,
        model: AtomisticModel | str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        compile: bool | str = "auto",
        skin: float = 0.3,
        allow_unknown_elements: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from .models.io import check_device, load_model, parse_dtype

        compile = compile_option(compile)  # refused before the model loads
        dtype = parse_dtype(dtype)
        device = check_device(device)
        skin = checked_skin(skin)
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, device=device, dtype=dtype)
        else:  # a private copy: the caller's model is never changed
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        config = model.config
        require_extensive_energy(model, "an ASE calculator's energy and forces")
        self.energy_to_ev = energy_factor(config.unit)  # (an energy unit: checked above)
        self.model = model
        param = next(model.parameters())
        # (a half-precision model passed in with dtype=None is refused too)
        self.device, self.dtype = param.device, parse_dtype(param.dtype)
        self._numbers: np.ndarray | None = None  # the numbers the cached tensors belong to
        self._mode = None if compile is False else compile_mode(compile, self.device)
        self.compile = True if compile not in (False, "auto") else compile
        self._use_compiled = False  # decided per structure in _prepare
        #: added to the "compiling ..." notice; None: no notice (an ensemble's later members)
        self.compile_notice: str | None = ""
        self.allow_unknown_elements = allow_unknown_elements
        # frozen: gradients w.r.t. positions only, and the weight-only state (SchNet's filter
        # tables) computed once instead of at every call
        self.model.eval().requires_grad_(False)
        with torch.no_grad():
            self._frozen = self.model.freeze()
        self.skin = skin
        self._neighbors = VerletList(self.model.cutoff, self.skin)
        self._pairs: Pairs | None = None
        self._last_atoms = None  # the copy of the atoms that calculate() updates in place

    # ------------------------------------------------------------------ set-up per structure
    def _prepare(self, atoms) -> None:
        """Validate ``atoms`` and cache the tensors that depend only on their numbers."""
        numbers = atoms.get_atomic_numbers()
        periodic = bool(atoms.pbc.any())
        if periodic and self.model.cutoff is None:
            raise DataError(
                "the atoms are periodic, but the model has no cutoff: periodic "
                "cells need a model with a cutoff"
            )
        # elements, NaN, overlapping atoms (with periodic images), the cell
        dataset_from_atoms([atoms], source="Calculator", targets=False)
        check_elements(self.model, numbers, self.allow_unknown_elements, "Calculator")
        n = len(numbers)
        self._batch_numbers = torch.as_tensor(numbers, dtype=torch.int64, device=self.device)
        self._structure_index = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._n_atoms_per = torch.tensor([n], dtype=torch.int64, device=self.device)
        self._numbers = numbers.copy()
        self._pbc = atoms.pbc.copy()
        self._neighbors = VerletList(self.model.cutoff, self.skin)
        # a new list: the pairs of the last structure are no one's (the eager path after a
        # compiled one failed had used them for the next structure)
        self._pairs = None
        self._padded = None
        self._use_compiled = self.compile is True or (
            self.compile == "auto"
            and (periodic or 2 <= n <= AUTO_COMPILE_MAX_ATOMS)
            and auto_compile_enabled()
        )
        self._periodic = periodic
        if self._use_compiled:
            self._compiled_once = False
            self._capacity = 0
            try:
                if periodic:
                    function = self._periodic_function()
                else:
                    i, j = torch.triu_indices(n, n, offset=1, device=self.device)
                    self._upper = (i, j)  # all pairs: fixed shapes for the compiled function
                    function = self._energy_forces_function()
                self._compiled = compile_fixed_shapes(function, self.device, self._mode)
            except Exception as err:  # noqa: BLE001 (any compile failure: fall back)
                self._compile_failed(err)

    def _energy(self, positions: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy, atomic energies) in the model's unit. The energy is summed in float64
        (MPS has none): a float32 total of -10,000 eV (QM9's scale) is rounded to 1 meV,
        more than an NVE run's drift; the gradient reaches the positions in their dtype."""
        atomic = self.model.atomic_energies(self._batch_numbers, positions, pairs, self._frozen)
        return atomic.sum(dtype=torch.float64 if atomic.device.type != "mps" else None), atomic

    def _energy_forces_function(self):
        """positions -> (energy, forces, atomic energies) on all pairs, for torch.compile."""
        pairs = Pairs.symmetric_from_half(*self._upper)

        def energy(positions):
            return self._energy(positions, pairs)

        grad_and_value = torch.func.grad_and_value(energy, has_aux=True)

        def energy_forces(positions):
            gradient, (total, atomic) = grad_and_value(positions)
            return total, -gradient, atomic

        return energy_forces

    def _periodic_function(self):
        """(positions, cell, i, j, n_shift) -> (energy, forces, virial, atomic energies).

        The pairs are one half of a padded Verlet list with integer cell shifts ``n_shift``
        (as floats); shifts = n_shift . cell are computed inside, so a changing cell (NPT)
        needs no recompile. The virial dE/d eps comes from the same backward pass.
        """
        structure_index = self._structure_index

        def energy(positions, strain, cell, i, j, n_shift):
            pairs = Pairs.symmetric_from_half(i, j, n_shift @ cell)
            positions, pairs, _ = apply_strain(
                positions, pairs, cell[None], structure_index, strain[None]
            )
            return self._energy(positions, pairs)

        grad_and_value = torch.func.grad_and_value(energy, argnums=(0, 1), has_aux=True)

        def energy_forces_virial(positions, cell, i, j, n_shift):
            strain = torch.zeros_like(cell)
            (d_positions, d_strain), (total, atomic) = grad_and_value(
                positions, strain, cell, i, j, n_shift
            )
            return total, -d_positions, d_strain, atomic

        return energy_forces_virial

    def _padded_pairs(self, cell: np.ndarray, pbc: np.ndarray):
        """The Verlet list's half pairs padded to ``self._capacity`` (grown when outgrown)."""
        if not (self._neighbors.update(self.atoms.positions, cell, pbc) or self._padded is None):
            return self._padded
        i, j, n_shift = self._neighbors.pairs
        if len(i) > self._capacity:
            if self._capacity:  # shapes change: one more compile (the compiled code has no
                self._compiled_once = False  # shape guards: a new function, compiled afresh
                self._compiled = None  # in _calculate_compiled, where a failure falls back)
            self._capacity = pair_capacity(len(i), PAIR_CAPACITY_HEADROOM)
        pad = self._capacity - len(i)
        # padding: atom 0 and its image far along the longest periodic cell vector
        lengths = np.where(pbc, np.linalg.norm(cell, axis=1), 0.0)
        axis = int(np.argmax(lengths))
        far = np.zeros((pad, 3))
        far[:, axis] = math.ceil(PADDING_DISTANCE * self.model.cutoff / lengths[axis])
        as_tensor = partial(torch.as_tensor, device=self.device)
        self._padded = (
            as_tensor(np.concatenate([i, np.zeros(pad, np.int64)])),
            as_tensor(np.concatenate([j, np.zeros(pad, np.int64)])),
            as_tensor(np.concatenate([n_shift, far]), dtype=self.dtype),
        )
        return self._padded

    def _changed_structure(self, atoms) -> bool:
        numbers = atoms.numbers
        return (
            self._numbers is None
            or len(numbers) != len(self._numbers)
            or (numbers != self._numbers).any()
            or (atoms.pbc != self._pbc).any()
        )

    def batch(self, atoms) -> Batch:
        """The one-structure :class:`~atomlens.data.Batch` of ``atoms`` (Verlet-list pairs)."""
        if self._changed_structure(atoms):
            self._prepare(atoms)
        positions = atoms.positions
        if not np.isfinite(positions).all():
            raise DataError("Calculator: the atoms have non-finite (NaN/inf) positions")
        cell = atoms.cell.array
        if self._neighbors.update(positions, cell, atoms.pbc) or self._pairs is None:
            i, j, n_shift = (torch.as_tensor(a, device=self.device) for a in self._neighbors.pairs)
            shifts = None
            if atoms.pbc.any():
                shifts = n_shift.to(self.dtype) @ torch.as_tensor(
                    cell, dtype=self.dtype, device=self.device
                )
            self._pairs = Pairs.symmetric_from_half(i, j, shifts)
        periodic = atoms.pbc.any()
        return Batch(
            numbers=self._batch_numbers,
            positions=self._model_positions(positions),
            structure_index=self._structure_index,
            n_atoms_per=self._n_atoms_per,
            pairs=self._pairs,
            n_structures=1,
            cell=torch.as_tensor(cell, dtype=self.dtype, device=self.device)[None]
            if periodic
            else None,
            pbc=torch.as_tensor(atoms.pbc, device=self.device)[None] if periodic else None,
        )

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
            # (ASE's get_property resets self.atoms to None before it calls this: keep our own)
            last = self._last_atoms
            if (
                last is not None
                and set(system_changes) <= {"positions"}
                and np.array_equal(last.numbers, atoms.numbers)
            ):
                last.positions[:] = atoms.positions
                self.atoms = last
            else:
                self.atoms = self._last_atoms = atoms.copy()
        if "numbers" in system_changes or "pbc" in system_changes:
            self._numbers = None
        forces = "forces" in properties
        stress = "stress" in properties
        if stress and not self.atoms.pbc.all():
            raise DataError("stress needs a cell periodic in all three directions")
        if (forces or stress) and self.atoms.pbc.all():
            # both from one backward pass, kept together: ASE's NPT asks for forces and
            # stress in separate calls, and each call's results replace the last's (5 model
            # calls per NPT step, where 1 does)
            forces = stress = True
        if self._changed_structure(self.atoms):
            self._prepare(self.atoms)
        if self._use_compiled:
            # the inputs first, outside the fallback: a bad input (NaN positions, a flat
            # cell) raises as on the eager path and leaves compiling on for later calls
            inputs = self._compiled_inputs()
            try:
                self._calculate_compiled(inputs, stress)
                return
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 (no C++ compiler, Inductor limits)
                self._compile_failed(err)
        batch = self.batch(self.atoms)
        positions = batch.positions.requires_grad_(forces or stress)
        pairs = batch.pairs
        inputs = [positions]
        with torch.set_grad_enabled(forces or stress):
            if stress:
                strain = torch.zeros_like(batch.cell).requires_grad_(True)
                inputs.append(strain)
                positions, pairs, _ = apply_strain(
                    positions, pairs, batch.cell, batch.structure_index, strain
                )
            total, atomic = self._energy(positions, pairs)
            if forces or stress:
                gradients = torch.autograd.grad(total, inputs)
        factor = self.energy_to_ev
        energy = float(total.detach()) * factor
        if not np.isfinite(energy):
            raise DataError("Calculator: the model gave a non-finite energy")
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": atomic.detach().cpu().double().numpy() * factor,
        }
        if forces:
            self.results["forces"] = -gradients[0].cpu().double().numpy() * factor
        if stress:
            virial = gradients[1][0].cpu().double().numpy() * factor
            self.results["stress"] = full_3x3_to_voigt_6_stress(virial / self.atoms.get_volume())
        check_finite(self.results, "Calculator")

    def _compile_failed(self, err: Exception) -> None:
        """compile=True: raise; "auto": warn and run the eager model from now on."""
        if self.compile is True:
            raise err
        warnings.warn(
            f"atomlens.Calculator: compiling failed ({type(err).__name__}: {err}); "
            f"running the eager model instead",
            stacklevel=3,
        )
        self._use_compiled = False

    def _model_positions(self, positions: np.ndarray) -> torch.Tensor:
        """``positions`` as the model's tensor, relative to the first atom's (in float64)
        first: the energy, forces and stress depend on differences only, and float32 keeps
        about seven digits of a coordinate, so a molecule 1e4 Angstrom from the origin (an
        unwrapped trajectory) lost forces to 3e-4 of their size before its differences were
        taken. (The first atom, not the mean: 1 us instead of 4 per MD step.)"""
        centred = positions - positions[0]
        return torch.as_tensor(centred, dtype=self.dtype, device=self.device)

    def _compiled_inputs(self) -> tuple[torch.Tensor, ...]:
        """The compiled function's inputs for ``self.atoms``: the positions (and the cell
        and the padded Verlet list of a periodic cell), validated as the eager path does."""
        atoms = self.atoms
        if not np.isfinite(atoms.positions).all():
            raise DataError("Calculator: the atoms have non-finite (NaN/inf) positions")
        positions = self._model_positions(atoms.positions)
        if not self._periodic:
            return (positions,)
        cell = atoms.cell.array
        padded = self._padded_pairs(cell, atoms.pbc)
        return (positions, torch.as_tensor(cell, dtype=self.dtype, device=self.device), *padded)

    def _calculate_compiled(self, inputs: tuple[torch.Tensor, ...], stress: bool) -> None:
        atoms = self.atoms
        if self._compiled is None:  # the padded list outgrew its capacity: new shapes
            self._compiled = compile_fixed_shapes(
                self._periodic_function(), self.device, self._mode
            )
        if not self._compiled_once and self.compile_notice is not None:  # no silent pause
            LOGGER.info(
                "compiling energy%s for %s (%d atoms%s%s; a one-off, cached on disk)",
                ", forces and stress" if self._periodic else " and forces",
                atoms.get_chemical_formula(),
                len(atoms),
                f", room for {self._capacity} pairs" if self._periodic else "",
                self.compile_notice,
            )
        # (energy, forces, atomic energies); a periodic cell's: (energy, forces, virial, ...)
        energy, forces, *virial, atomic = self._compiled(*inputs)
        self._compiled_once = True
        factor = self.energy_to_ev
        energy = float(energy) * factor
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": atomic.cpu().double().numpy() * factor,
            "forces": forces.cpu().double().numpy() * factor,
        }
        if stress:
            virial = virial[0].cpu().double().numpy() * factor
            self.results["stress"] = full_3x3_to_voigt_6_stress(virial / atoms.get_volume())
        check_finite(self.results, "Calculator")
