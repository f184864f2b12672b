"""Many independent MD trajectories at once: one model call per step for all of them.

R trajectories (replicas of one molecule, or different molecules) are packed into one
:class:`~atomlens.data.Batch`; every step computes the neighbour pairs of all of them once
and their energies and forces in one model call, so a small molecule's per-call overhead
is paid once for R trajectories instead of R times. Units as in ASE: positions in Angstrom,
momenta p in amu Angstrom / t_ASE (ASE's time unit, 10.18 fs: ``ase.units.fs`` = 0.0982
t_ASE), energies in eV, forces in eV/Angstrom; ``dt`` = ``timestep_fs * ase.units.fs``.

Velocity Verlet (NVE; the same update as ``ase.md.verlet.VelocityVerlet``)::

    p <- p + dt/2 F(x);   x <- x + dt p / m;   p <- p + dt/2 F(x)

Langevin (NVT, BAOAB splitting; Leimkuhler & Matthews, Appl. Math. Res. Express 2013)::

    B: p <- p + dt/2 F      A: x <- x + dt/2 p/m
    O: p <- c1 p + sqrt(1 - c1^2) sqrt(m k_B T) xi,   c1 = exp(-gamma dt),  xi ~ N(0, 1)
    A: x <- x + dt/2 p/m    (new F)    B: p <- p + dt/2 F

after O the centre-of-mass momentum of each trajectory is removed (the noise would move
it; the model's forces sum to zero). Degrees of freedom per trajectory as
:func:`atomlens.md.run_md` counts them: 3n - 3 for Langevin and for NVE from given
velocities; NVE from drawn velocities also removes their angular momentum, which it then
conserves, so 3n - 6 (3n - 5 for a linear molecule). Drawn velocities are scaled to exactly
``temperature_K`` over those degrees of freedom.

``compile=True`` (or a ``torch.compile`` mode; on a GPU ``True`` and ``"auto"`` mean
``"reduce-overhead"``, which records the step as a CUDA graph and replays it) keeps the shapes fixed from step to step: the pairs are a Verlet list of all
trajectories (pairs within cutoff + ``skin``, rebuilt when an atom has moved skin / 2),
padded to a fixed capacity with pairs far beyond the cutoff; when the list outgrows the
capacity, the capacity grows and the function is compiled once more (said on the logger).
The smooth cutoff gives listed pairs beyond it, and the padding, exactly zero weight (SchNet's
tabulated convolution skips them), so the results equal the eager path's up to rounding. (32 aspirins at 5 Angstrom: 73% of the
intra-molecular pairs lie within the cutoff, 78% within cutoff + 0.3 Angstrom.) A model
without a cutoff keeps every intra-molecular pair. On the CPU the same code runs, without
graphs. ``"auto"`` (the default) compiles when every molecule has at most
:data:`~atomlens.nn.kernels.AUTO_COMPILE_MAX_ATOMS` atoms (all pairs grow as n^2) and
``ATOMLENS_COMPILE`` is not ``0``, says so on the ``atomlens`` logger, and falls back to the
eager path with a warning if compiling fails.

Precision: the integrator's state (positions, momenta, masses) is float64 whatever the
model's precision (float32 by default), as ASE's integrators keep it; a float32 state
rounded every step's displacement (about 1e-3 Angstrom against coordinates of a few
Angstrom, kept to seven digits) and a coordinate far from the origin to its float32
spacing. The model sees each trajectory's positions relative to its first atom, in the
model's precision (energies and forces depend on differences only), and its per-atom
energies are summed per trajectory in float64: a float32 total of -10,000 eV (QM9's scale)
is rounded to 1 meV, more than an NVE run's drift.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import units as ase_units
from ase.constraints import FixCom
from tqdm.auto import tqdm

from .calculator import PADDING_DISTANCE, checked_skin, pair_capacity
from .data.batch import Pairs
from .data.dataset import DataError, dataset_from_atoms
from .data.neighbors import molecular_pairs
from .md import (
    LOG_COLUMNS,
    SPREAD_COLUMNS,
    MDLog,
    MDUnstableError,
    check_stop_limits,
    degrees_of_freedom,
    draw_momenta,
    kinetic_temperature,
    published,
    temporary_outputs,
)
from .models.guards import check_elements, require_extensive_energy
from .models.io import parse_dtype
from .models.potential import AtomisticModel
from .nn import scatter_sum
from .nn.kernels import (
    AUTO_COMPILE_MAX_ATOMS,
    auto_compile_enabled,
    compile_fixed_shapes,
    compile_mode,
    compile_option,
)
from .units import energy_factor

#: torch.compile backend of ``compile=``; tests trace with "eager" (no code generation)
COMPILE_BACKEND = "inductor"
LOGGER = logging.getLogger("atomlens")
#: compiled path: the Verlet list's capacity is its first length times this, in steps of
#: :data:`~atomlens.calculator.PAIR_CAPACITY_STEP` pairs (the pair count of many
#: trajectories together varies little; outgrowing the capacity costs one more compilation)
PAIR_CAPACITY_HEADROOM = 1.05


class BatchedMD:
    """R independent MD trajectories of ``systems`` (ASE ``Atoms``), integrated together.

    Args:
        model: an extensive energy :class:`~atomlens.models.AtomisticModel` or a saved
            model folder (a private copy is made on ``device``/``dtype``); or an ensemble:
            a list of models or folders, or an ensemble folder (``ensemble.json``). An
            ensemble's mean energy and forces drive the dynamics, and its spread per
            trajectory is kept (:attr:`energy_std`, :attr:`max_force_std`: the members'
            energy standard deviation and the largest per-atom force standard deviation)
            and logged (``energy_std_eV``, ``max_force_std_eV_A``), as
            :class:`atomlens.ensemble.EnsembleCalculator` does for one trajectory.
        systems: the start structures, one per trajectory (isolated molecules; repeat one
            ``Atoms`` for replicas). They are not changed.
        ensemble: ``"nve"`` (velocity Verlet) or ``"langevin"`` (BAOAB at ``temperature_K``).
        temperature_K: Maxwell-Boltzmann temperature of the initial velocities and the
            thermostat's temperature (K).
        timestep_fs: time step (fs). friction: Langevin friction gamma (1/fs).
        seed: seeds the initial velocities (trajectory after trajectory) and the noise.
        initialize_velocities: draw velocities (zero momentum and angular momentum per
            trajectory), else keep each ``Atoms``' own momenta.
        device, dtype: where and in which precision (``"float64"`` for conservation tests,
            ``"float32"``; ``None``: the model's own, an ensemble's widest; as
            ``atomlens.Calculator``).
        compile: ``"auto"``, ``False``, ``True`` or a ``torch.compile`` mode (module doc).
        skin: Verlet-list skin of the compiled path (Angstrom; as ``atomlens.Calculator``).
        allow_unknown_elements: warn instead of refusing elements absent from the model's
            training data (as ``atomlens.Calculator``).
    """

    def __init__(
        self,
        model: AtomisticModel | str | os.PathLike,
        systems: Sequence,
        ensemble: str = "nve",
        temperature_K: float = 300.0,
        timestep_fs: float = 0.5,
        friction: float = 0.01,
        seed: int | None = 0,
        initialize_velocities: bool = True,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        compile: bool | str = "auto",
        skin: float = 0.3,
        allow_unknown_elements: bool = False,
    ):
        if ensemble not in ("nve", "langevin"):
            raise ValueError(f"ensemble must be 'nve' or 'langevin', not {ensemble!r}")
        if not (
            all(map(math.isfinite, (timestep_fs, friction, temperature_K)))
            and timestep_fs > 0
            and friction >= 0
            and temperature_K >= 0
        ):
            raise ValueError(
                f"need finite timestep_fs > 0, friction >= 0 and temperature_K >= 0, not "
                f"{timestep_fs}, {friction}, {temperature_K}"
            )
        skin = checked_skin(skin)
        compile = compile_option(compile)  # refused before any work
        dtype = parse_dtype(dtype)
        systems = list(systems)
        if not systems:
            raise ValueError("BatchedMD needs at least one structure")
        for k, atoms in enumerate(systems):
            if atoms.pbc.any():
                raise DataError(
                    f"structure {k}: atomlens models describe isolated molecules; "
                    f"the atoms are periodic (set atoms.pbc = False)"
                )
            held = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixCom)]
            if held:  # (FixCom: the integrators keep each trajectory's momentum at zero)
                raise DataError(
                    f"structure {k} carries constraints ({', '.join(held)}), which batched MD "
                    f"does not apply: it would move constrained atoms freely. Run it alone "
                    f"with atomlens.md.run_md (`atomlens md` without --replicas), which "
                    f"honours them, or remove them (atoms.set_constraint())"
                )
        dataset_from_atoms(
            systems, source="BatchedMD", targets=False
        )  # elements, NaN, overlapping atoms
        #: the model, or an ensemble's members (energies and forces: their mean)
        self.models = self._private_models(model, device, dtype)
        self.model = self.models[0]
        numbers = np.concatenate([atoms.numbers for atoms in systems])
        for member in self.models:
            check_elements(member, numbers, allow_unknown_elements, "BatchedMD")
        self.energy_to_ev = energy_factor(self.model.config.unit)
        cutoffs = [member.cutoff for member in self.models]
        #: pairs within this distance reach the models (an ensemble: its largest cutoff;
        #: each member's smooth cutoff gives pairs beyond its own exactly zero weight)
        self.cutoff = None if None in cutoffs else max(cutoffs)
        #: ensembles: the members' spread per trajectory at the last step (eV, eV/Angstrom)
        self.energy_std: torch.Tensor | None = None
        self.max_force_std: torch.Tensor | None = None
        param = next(self.model.parameters())
        #: the model's device and precision
        self.device, self.dtype = param.device, param.dtype
        #: the integrator's precision (module doc): float64 (MPS has none: the model's)
        self.state_dtype = torch.float64 if self.device.type != "mps" else self.dtype
        self.ensemble, self.temperature_K = ensemble, float(temperature_K)
        self.timestep_fs, self.friction = float(timestep_fs), float(friction)
        self.dt = self.timestep_fs * ase_units.fs
        self.symbols = [atoms.get_chemical_symbols() for atoms in systems]

        starts = [atoms.copy() for atoms in systems]
        rng = np.random.default_rng(seed)
        # as atomlens.md.run_md: NVE from drawn velocities conserves their zero angular
        # momentum, so rotations are no degrees of freedom (3n - 6, 3n - 5 if linear);
        # Langevin's noise fills them (3n - 3, the centre of mass fixed)
        rotation_removed = ensemble == "nve" and initialize_velocities
        n_dof = [degrees_of_freedom(atoms, rotation_removed and len(atoms) > 2) for atoms in starts]
        if initialize_velocities:
            from ase.md import velocitydistribution as velocities

            for atoms, dof in zip(starts, n_dof):
                draw_momenta(atoms, temperature_K, rng)
                velocities.Stationary(atoms, preserve_temperature=False)
                if rotation_removed and len(atoms) > 2:
                    velocities.ZeroRotation(atoms, preserve_temperature=False)
                drawn = kinetic_temperature(atoms, dof)
                if drawn > 0:  # exactly temperature_K over the degrees of freedom left
                    atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature_K / drawn))
        counts = [len(atoms) for atoms in starts]
        as_tensor = lambda values, dtype: torch.as_tensor(
            np.concatenate(values), dtype=dtype, device=self.device
        )
        self.numbers = as_tensor([a.numbers for a in starts], torch.int64)
        self.positions = as_tensor([a.positions for a in starts], self.state_dtype)
        self.momenta = as_tensor([a.get_momenta() for a in starts], self.state_dtype)
        self.masses = as_tensor([a.get_masses() for a in starts], self.state_dtype)[:, None]
        self.n_atoms_per = torch.tensor(counts, dtype=torch.int64, device=self.device)
        self.n_structures = len(starts)
        self.structure_index = torch.repeat_interleave(
            torch.arange(self.n_structures, device=self.device), self.n_atoms_per
        )
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        #: each atom's trajectory's first atom: the origin of the model's positions
        self._first_atom = torch.as_tensor(self.offsets[:-1], device=self.device)[
            self.structure_index
        ]
        self.n_dof = torch.tensor(n_dof, dtype=self.state_dtype, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(rng.integers(2**62)))
        self.nsteps = 0
        self.skin = skin
        self.pair_builds = 0  # Verlet-list builds of the compiled path
        self._capacity = 0
        self._padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: the Verlet list's candidates: every intra-molecular pair once (built once)
        self._candidates: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference: torch.Tensor | None = None

        with torch.no_grad():  # weight-only state (SchNet's filter tables) once, not per step
            self.frozen = [member.freeze() for member in self.models]
        self.compiled = None
        auto = self._auto = compile == "auto"
        if auto:
            compile = max(counts) <= AUTO_COMPILE_MAX_ATOMS and auto_compile_enabled()
        if compile:
            LOGGER.info(
                "compiling energy and forces for %d trajectories (%d atoms; a one-off, "
                "cached on disk)",
                self.n_structures,
                len(self.numbers),
            )
            self._mode = compile_mode(compile, self.device)  # CUDA graphs on a GPU
            try:
                self.compiled = self._compile()
                with torch.no_grad():  # as in step(): one grad mode, one compiled graph
                    self.energies, self.forces = self.energy_and_forces()
            except Exception as err:
                if not auto:
                    raise
                warnings.warn(
                    f"atomlens.BatchedMD: compiling failed ({type(err).__name__}: {err}); "
                    f"running the eager model instead",
                    stacklevel=2,
                )
                self.compiled = None
        if self.compiled is None:
            with torch.no_grad():
                self.energies, self.forces = self.energy_and_forces()

    # ------------------------------------------------------------------ model
    @classmethod
    def _private_models(cls, model, device, dtype) -> list[AtomisticModel]:
        """Private copies of one model, of a list of models or paths, or of the members of
        an ensemble folder (``ensemble.json``, as ``atomlens train --ensemble`` writes)."""
        from .ensemble import check_members, ensemble_members

        items = list(model) if isinstance(model, (list, tuple)) else [model]
        is_path = [isinstance(item, (str, os.PathLike)) for item in items]
        # folders: ensemble folders give their members; one model twice is refused there
        folders = ensemble_members([item for item, path in zip(items, is_path) if path])
        objects = [item for item, path in zip(items, is_path) if not path]
        if not folders and not objects:
            raise ValueError("BatchedMD needs a model (an empty list of models was given)")
        models = [cls._private_model(item, device, dtype) for item in [*folders, *objects]]
        check_members(models)  # one target and unit; no model twice
        if dtype is None:  # the model's own precision (an ensemble of several: the widest)
            widest = max((next(m.parameters()).dtype for m in models), key=lambda t: t.itemsize)
            models = [member.to(parse_dtype(widest)) for member in models]
        return models

    @staticmethod
    def _private_model(model, device, dtype) -> AtomisticModel:
        from .models.io import check_device

        device = check_device(device)
        if isinstance(model, (str, os.PathLike)):
            from .models.io import load_model

            model = load_model(model, device=device, dtype=dtype)
        else:  # a private copy: the caller's model is never changed
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        require_extensive_energy(model, "MD (energy and forces)")
        return model.eval().requires_grad_(False)

    def _energy(
        self, positions: torch.Tensor, pairs: Pairs, k: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of all energies, per-trajectory energies (R,)) of member ``k``, in its unit."""
        atomic = self.models[k].atomic_energies(self.numbers, positions, pairs, self.frozen[k])
        # summed in float64 (module doc); the gradient reaches positions in their dtype
        energies = scatter_sum(atomic.to(self.state_dtype), self.structure_index, self.n_structures)
        return energies.sum(), energies

    def _model_positions(self) -> torch.Tensor:
        """The positions as the model sees them: relative to each trajectory's first atom,
        in the model's dtype (module doc)."""
        return (self.positions - self.positions[self._first_atom]).to(self.dtype)

    def _compile(self):
        """The energy+forces function of fixed shapes, compiled (see the module doc)."""
        function = self._energy_forces_listed() if self._listed else self._energy_forces_all()
        return compile_fixed_shapes(function, self.device, self._mode, COMPILE_BACKEND)

    @property
    def _listed(self) -> bool:
        """Whether the compiled path uses the padded Verlet list (the model has a cutoff)."""
        return self.cutoff is not None

    def _energy_forces_all(self):
        """positions -> (energies, forces) on all intra-molecular pairs (an ensemble: every
        member's, stacked)."""
        pair_i, pair_j = molecular_pairs(self.n_atoms_per)
        members = [
            torch.func.grad_and_value(
                lambda positions, k=k: self._energy(
                    positions, Pairs(pair_i, pair_j, None, True), k
                ),
                has_aux=True,
            )
            for k in range(len(self.models))
        ]

        def energy_forces(positions):
            return self._stacked([member(positions) for member in members])

        return energy_forces

    def _energy_forces_listed(self):
        """(positions, i, j, shifts) -> (energies, forces) on a padded half pair list (an
        ensemble: every member's, stacked)."""
        members = [
            torch.func.grad_and_value(
                lambda positions, i, j, shifts, k=k: self._energy(
                    positions, Pairs.symmetric_from_half(i, j, shifts), k
                ),
                has_aux=True,
            )
            for k in range(len(self.models))
        ]

        def energy_forces(positions, i, j, shifts):
            return self._stacked([member(positions, i, j, shifts) for member in members])

        return energy_forces

    @staticmethod
    def _stacked(results) -> tuple[torch.Tensor, torch.Tensor]:
        """One member's (energies (R,), forces (N, 3)); several: (K, R) and (K, N, 3)."""
        if len(results) == 1:
            gradient, (_, energies) = results[0]
            return energies, -gradient
        energies = torch.stack([energies for _, (_, energies) in results])
        forces = torch.stack([-gradient for gradient, _ in results])
        return energies, forces

    def _padded_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Verlet list (pairs within cutoff + skin, each once) padded to the capacity.

        Rebuilt when an atom has moved more than skin / 2 since the last build; padding
        pairs are atom 0 with itself shifted ``PADDING_DISTANCE`` cutoffs away."""
        if self._padded is not None:
            moved = float((self.positions - self._reference).pow(2).sum(-1).max())
            if not math.isfinite(moved):  # NaN or inf positions: checked at no extra sync
                self._raise_not_finite()
            if moved <= (0.5 * self.skin) ** 2:
                return self._padded
        reach = self.cutoff + self.skin
        if self._candidates is None:  # every pair of each molecule, once (a < b)
            every_i, every_j = molecular_pairs(self.n_atoms_per)
            half = len(every_i) // 2  # (copies: the views would keep the whole list)
            self._candidates = (every_i[:half].clone(), every_j[:half].clone())
        every_i, every_j = self._candidates
        near = (self.positions[every_i] - self.positions[every_j]).pow(2).sum(-1) < reach * reach
        pair_i, pair_j = every_i[near], every_j[near]
        half = pair_i.shape[0]
        if half > self._capacity:
            if self._capacity:  # new shapes: a new function, compiled afresh
                LOGGER.info(
                    "BatchedMD: %d pairs outgrew the compiled capacity of %d; compiling again",
                    half,
                    self._capacity,
                )
                self.compiled = self._compile()
            every_pair = int((self.n_atoms_per * (self.n_atoms_per - 1) // 2).sum())
            self._capacity = pair_capacity(half, PAIR_CAPACITY_HEADROOM, limit=every_pair)
        pad = self._capacity - half
        padding = pair_i.new_zeros(pad)
        shifts = torch.zeros(self._capacity, 3, dtype=self.dtype, device=self.device)
        shifts[half:, 0] = PADDING_DISTANCE * self.cutoff
        self._padded = (torch.cat([pair_i, padding]), torch.cat([pair_j, padding]), shifts)
        self._reference = self.positions.clone()
        self.pair_builds += 1
        return self._padded

    def _raise_not_finite(self):
        bad = ~torch.isfinite(self.positions).all(-1)
        trajectories = sorted(set(self.structure_index[bad].tolist()))
        raise MDUnstableError(
            f"BatchedMD: the positions of trajectories {trajectories} are not finite at step "
            f"{self.nsteps} (the dynamics blew up: try a shorter timestep, or check that the "
            f"structures lie in the model's training range)"
        )

    def energy_and_forces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies (R,) in eV and forces (N, 3) in eV/Angstrom at the current positions.

        One neighbour search (pairs within the cutoff) and one model call for all R.
        """
        listed = self.compiled is not None and self._listed
        if not listed and not bool(torch.isfinite(self.positions).all()):
            self._raise_not_finite()  # (the listed path checks in _padded_pairs, no extra sync)
        if self.compiled is not None:
            pairs = self._padded_pairs() if self._listed else ()
            try:
                energies, forces = self.compiled(self._model_positions(), *pairs)
            except Exception as err:
                # compiling failed (also a later compile: the pair list outgrew its
                # capacity): with compile="auto" go on eagerly
                if not self._auto:
                    raise
                warnings.warn(
                    f"atomlens.BatchedMD: compiling failed ({type(err).__name__}: {err}); "
                    f"running the eager model from step {self.nsteps} on",
                    stacklevel=2,
                )
                self.compiled = None
                return self.energy_and_forces()
            if self.device.type == "cuda":  # CUDA graphs reuse their outputs' memory: copies
                energies, forces = energies.clone(), forces.clone()
        else:
            positions = self._model_positions().requires_grad_(True)
            pair_i, pair_j = molecular_pairs(self.n_atoms_per, self.positions, self.cutoff)
            pairs = Pairs(pair_i, pair_j, None, True)
            results = []
            with torch.enable_grad():
                for k in range(len(self.models)):
                    total, member_energies = self._energy(positions, pairs, k)
                    (gradient,) = torch.autograd.grad(total, positions)
                    results.append((gradient, (total, member_energies)))
            energies, forces = self._stacked(results)
        energies, forces = energies.detach(), forces.detach().to(self.state_dtype)
        if self.energy_to_ev != 1.0:  # (an eV model: no copies)
            energies, forces = energies * self.energy_to_ev, forces * self.energy_to_ev
        if len(self.models) > 1:  # the members' mean drives the dynamics; their spread
            energies, self.energy_std = energies.mean(0), energies.std(0, correction=0)
            force_std = forces.std(0, correction=0).pow(2).sum(-1).sqrt()  # per atom
            self.max_force_std = torch.zeros_like(energies).scatter_reduce_(
                0, self.structure_index, force_std, "amax", include_self=False
            )
            forces = forces.mean(0)
        return energies, forces

    # ------------------------------------------------------------------ integrators
    def _remove_momentum(self) -> None:
        """Zero each trajectory's total momentum: p_i <- p_i - m_i P / M."""
        total = scatter_sum(self.momenta, self.structure_index, self.n_structures)
        mass = scatter_sum(self.masses, self.structure_index, self.n_structures)
        self.momenta -= self.masses * (total / mass)[self.structure_index]

    @torch.no_grad()
    def step(self) -> None:
        """One time step of every trajectory (one model call). Interrupted (a Ctrl-C during
        the model call, an error), it leaves the state as it was before the step, so that a
        later :meth:`run` goes on from a whole step."""
        saved = (self.positions.clone(), self.momenta.clone())
        noise_state = self.generator.get_state() if self.ensemble == "langevin" else None
        try:
            self._step()
        except BaseException:
            self.positions.copy_(saved[0])
            self.momenta.copy_(saved[1])
            if noise_state is not None:
                self.generator.set_state(noise_state)
            raise

    def _step(self) -> None:
        half = 0.5 * self.dt
        if self.ensemble == "nve":
            self.momenta.add_(self.forces, alpha=half)
            self.positions.addcdiv_(self.momenta, self.masses, value=self.dt)
        else:
            self.momenta.add_(self.forces, alpha=half)
            self.positions.addcdiv_(self.momenta, self.masses, value=half)
            c1 = float(np.exp(-self.friction / ase_units.fs * self.dt))
            kt = ase_units.kB * self.temperature_K
            noise = torch.randn(
                self.momenta.shape,
                generator=self.generator,
                device=self.device,
                dtype=self.state_dtype,
            )
            self.momenta.mul_(c1).add_(np.sqrt((1.0 - c1 * c1) * kt) * self.masses.sqrt() * noise)
            self._remove_momentum()
            self.positions.addcdiv_(self.momenta, self.masses, value=half)
        self.energies, self.forces = self.energy_and_forces()
        self.momenta.add_(self.forces, alpha=half)
        self.nsteps += 1

    # ------------------------------------------------------------------ observables
    def kinetic_energies(self) -> torch.Tensor:
        """E_kin per trajectory (R,), eV: sum_i p_i^2 / (2 m_i)."""
        per_atom = (self.momenta.pow(2) / (2.0 * self.masses)).sum(-1)
        return scatter_sum(per_atom, self.structure_index, self.n_structures)

    def temperatures(self, kinetic: torch.Tensor | None = None) -> torch.Tensor:
        """Kinetic temperature per trajectory (R,), K: 2 E_kin / (n_dof k_B), n_dof as the
        module doc counts them; ``kinetic``: the :meth:`kinetic_energies` if already
        computed."""
        kinetic = self.kinetic_energies() if kinetic is None else kinetic
        return 2.0 * kinetic / (self.n_dof * ase_units.kB)

    def atoms(self, k: int):
        """Trajectory ``k`` now, as ASE ``Atoms`` with momenta, energy and forces."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        a, b = self.offsets[k], self.offsets[k + 1]
        atoms = Atoms(
            self.symbols[k],
            positions=self.positions[a:b].double().cpu().numpy(),
            masses=self.masses[a:b, 0].double().cpu().numpy(),  # isotopes as integrated
            momenta=self.momenta[a:b].double().cpu().numpy(),
        )
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(self.energies[k]), forces=self.forces[a:b].double().cpu().numpy()
        )
        return atoms

    # ------------------------------------------------------------------ running
    def run(
        self,
        steps: int,
        trajectories: Sequence[str | os.PathLike] | None = None,
        logfiles: Sequence[str | os.PathLike] | None = None,
        interval: int = 1,
        progress: bool | None = None,
        max_temperature_K: float | None = None,
        max_drift_eV_per_atom: float = 0.1,
    ) -> list[MDLog]:
        """Run ``steps`` steps; every ``interval`` steps log and store each trajectory.

        At every logged step, as :func:`atomlens.md.run_md` does, a trajectory whose kinetic
        temperature exceeds ``max_temperature_K`` (default the larger of 2000 K and 5 x
        ``temperature_K``) or, in NVE, whose total energy has drifted by more than
        ``max_drift_eV_per_atom`` from its start stops the run with
        :class:`~atomlens.md.MDUnstableError` naming it.

        ``trajectories``: one ``.traj`` (ASE) or extxyz (other suffixes) file per trajectory;
        ``logfiles``: one CSV per trajectory (:data:`atomlens.md.LOG_COLUMNS`). Files are
        written under temporary names and appear complete when the run ends. Returns one
        :class:`~atomlens.md.MDLog` per trajectory (step 0 included).
        """
        if steps < 0 or interval < 1:
            raise ValueError(f"need steps >= 0 and interval >= 1, not {steps}, {interval}")
        check_stop_limits(max_temperature_K, max_drift_eV_per_atom)
        for name, paths in (("trajectories", trajectories), ("logfiles", logfiles)):
            if paths is not None and len(paths) != self.n_structures:
                raise ValueError(f"{name}: {len(paths)} files for {self.n_structures} trajectories")
        named = [Path(p).resolve() for p in [*(trajectories or []), *(logfiles or [])]]
        if len(set(named)) < len(named):
            twice = sorted({str(p) for p in named if named.count(p) > 1})
            raise ValueError(f"one file for two outputs: {', '.join(twice)}")
        logs = [MDLog() for _ in range(self.n_structures)]
        if max_temperature_K is None:
            max_temperature_K = max(2000.0, 5.0 * self.temperature_K)
        # temporary files beside their names, renamed at the end (or at a Ctrl-C); a run
        # stopped as unstable keeps them as NAME.unstable.SUFFIX, as single-trajectory MD
        outputs = temporary_outputs([*(trajectories or []), *(logfiles or [])])
        with published(outputs), contextlib.ExitStack() as stack:
            writers = [self._trajectory_writer(outputs[Path(p)], stack) for p in trajectories or []]
            tables = []
            for path in logfiles or []:
                handle = stack.enter_context(open(outputs[Path(path)], "w", newline=""))
                tables.append(csv.writer(handle))
                spread = SPREAD_COLUMNS if len(self.models) > 1 else ()
                tables[-1].writerow(LOG_COLUMNS + spread)
            bar = stack.enter_context(
                tqdm(
                    total=steps,
                    desc=f"{self.ensemble.upper()} MD x{self.n_structures}",
                    unit="step",
                    leave=False,
                    disable=None if progress is None else not progress,
                )
            )
            start = None
            for n in range(steps + 1):
                if n:
                    self.step()
                    bar.update(1)
                if n % interval == 0:
                    etot, temperature = self._record(logs, tables, writers)
                    if n == 0:  # E_tot of each trajectory at this run's start
                        start = etot
                    self._check_stability(
                        etot, temperature, start, max_temperature_K, max_drift_eV_per_atom
                    )
        return logs

    def _record(
        self, logs: list[MDLog], tables: list, writers: list
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log and store every trajectory now; returns their E_tot (eV) and temperatures."""
        time_fs = self.nsteps * self.timestep_fs
        kinetic = self.kinetic_energies()
        epot = self.energies.double().cpu().numpy()
        ekin = kinetic.double().cpu().numpy()
        temperature = self.temperatures(kinetic).double().cpu().numpy()
        spread = self.energy_std is not None
        if spread:
            energy_std = self.energy_std.double().cpu().numpy()
            max_force_std = self.max_force_std.double().cpu().numpy()
        for k, log in enumerate(logs):
            row = (time_fs, epot[k], ekin[k], epot[k] + ekin[k], temperature[k])
            for values, value in zip(
                (log.time_fs, log.epot, log.ekin, log.etot, log.temperature), row
            ):
                values.append(float(value))
            if spread:
                log.energy_std.append(float(energy_std[k]))
                log.max_force_std.append(float(max_force_std[k]))
                row = (*row, energy_std[k], max_force_std[k])
            if tables:
                tables[k].writerow([f"{v:.10g}" for v in row])
        for k, write in enumerate(writers):
            write(self.atoms(k))
        return epot + ekin, temperature

    def _check_stability(
        self,
        etot: np.ndarray,
        temperature: np.ndarray,
        start: np.ndarray,
        max_temperature: float,
        max_drift: float,
    ) -> None:
        """Stop (MDUnstableError) at a trajectory too hot, or (NVE) drifted from ``start``
        by more than ``max_drift`` eV/atom."""
        drift = np.abs(etot - start) / np.diff(self.offsets)
        hint = (
            f"at step {self.nsteps} ({self.nsteps * self.timestep_fs:g} fs); shorten the time "
            f"step ({self.timestep_fs:g} fs now) or check that the model knows these molecules"
        )
        hot = np.flatnonzero(~(temperature <= max_temperature))
        if hot.size:
            k = int(hot[0])
            raise MDUnstableError(
                f"BatchedMD: trajectories {hot.tolist()} exceed the temperature limit of "
                f"{max_temperature:g} K (trajectory {k}: {temperature[k]:.4g} K), {hint}"
            )
        drifted = np.flatnonzero(~(drift <= max_drift)) if self.ensemble == "nve" else []
        if len(drifted):
            k = int(drifted[0])
            raise MDUnstableError(
                f"BatchedMD: the total energy of trajectories {list(map(int, drifted))} "
                f"drifted beyond the limit of {max_drift:g} eV/atom (trajectory {k}: "
                f"{drift[k]:.4g} eV/atom), {hint}"
            )

    @staticmethod
    def _trajectory_writer(path: Path, stack: contextlib.ExitStack):
        """A callable appending ``Atoms`` to ``path`` (``.traj``, else extxyz)."""
        if path.suffix == ".traj":
            from ase.io import Trajectory

            return stack.enter_context(Trajectory(str(path), "w")).write
        from ase.io import write

        handle = stack.enter_context(open(path, "w"))  # noqa: SIM115 (the stack closes it)

        def append(atoms) -> None:
            # stated units: the trajectory reads back as data (read_ase), as run_md's
            atoms.info.update(energy_unit="eV", length_unit="Angstrom")
            write(handle, atoms, format="extxyz")

        return append


def run_batched_md(
    model,
    systems: Sequence,
    steps: int = 1000,
    trajectories: Sequence[str | os.PathLike] | None = None,
    logfiles: Sequence[str | os.PathLike] | None = None,
    interval: int = 1,
    progress: bool | None = None,
    **options,
) -> list[MDLog]:
    """Build a :class:`BatchedMD` of ``systems`` (``options`` go to it) and run it."""
    limits = {
        key: options.pop(key)
        for key in ("max_temperature_K", "max_drift_eV_per_atom")
        if key in options
    }
    md = BatchedMD(model, systems, **options)
    return md.run(steps, trajectories, logfiles, interval, progress, **limits)
