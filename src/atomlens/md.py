"""Molecular dynamics with a trained atomlens model, through ASE's integrators.

    NVE:       velocity Verlet;  E_tot = E_pot + E_kin is conserved up to the integration error
    Langevin:  dp = F dt - gamma p dt + sqrt(2 m gamma k_B T) dW   (canonical ensemble at T)

Velocities start from a Maxwell-Boltzmann distribution at ``temperature_K`` with zero total
momentum and angular momentum (unless ``initialize_velocities=False`` keeps the atoms' own).
The trajectory goes to an ASE ``.traj`` file or to extxyz (any other suffix), with the
model's energy and forces on every stored frame; a CSV log records time (fs), E_pot, E_kin,
E_tot (eV) and the kinetic temperature T (K) with 3n - 3 degrees of freedom (the total
momentum is removed), see :func:`kinetic_temperature`.
"""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import units as ase_units
from tqdm.auto import tqdm

LOG_COLUMNS = ("time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K")


def kinetic_temperature(atoms) -> float:
    """T = 2 E_kin / (n_dof k_B), n_dof = 3n - 3 (the total momentum is zero and stays so)."""
    n_dof = max(3 * len(atoms) - 3, 1)
    return 2.0 * atoms.get_kinetic_energy() / (n_dof * ase_units.kB)


@dataclass
class MDLog:
    """Per logged step: time (fs), potential, kinetic and total energy (eV), temperature (K)."""

    time_fs: list[float] = field(default_factory=list)
    epot: list[float] = field(default_factory=list)
    ekin: list[float] = field(default_factory=list)
    etot: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, attr)) for name, attr in zip(
            LOG_COLUMNS, ("time_fs", "epot", "ekin", "etot", "temperature"))}

    def drift(self, n_atoms: int) -> dict[str, float]:
        """Energy conservation: |E_tot(end) - E_tot(0)| and std(E_tot), in eV per atom."""
        etot = np.asarray(self.etot)
        return {"drift_eV_per_atom": float(abs(etot[-1] - etot[0]) / n_atoms),
                "std_eV_per_atom": float(etot.std() / n_atoms)}


def _calculator(model_or_calc, device, dtype, compile=False):
    from ase.calculators.calculator import BaseCalculator

    if isinstance(model_or_calc, BaseCalculator):
        return model_or_calc
    from .calculator import Calculator

    return Calculator(model_or_calc, device=device, dtype=dtype, compile=compile)


def _trajectory_writer(path: Path, atoms, stack: contextlib.ExitStack):
    """A callable appending ``atoms`` (with the model's energy and forces) to ``.traj`` or
    extxyz; the file is closed by ``stack``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".traj":
        from ase.io import Trajectory

        traj = stack.enter_context(Trajectory(str(path), "w", atoms))
        return traj.write
    from ase.io import write

    handle = stack.enter_context(open(path, "w"))  # noqa: SIM115 (the stack closes it)

    def append() -> None:
        write(handle, atoms, format="extxyz")
        handle.flush()

    return append


def run_md(model_or_calc, atoms, ensemble: str = "nve", temperature_K: float = 300.0,
           timestep_fs: float = 0.5, steps: int = 1000, friction: float = 0.01,
           trajectory: str | os.PathLike | None = None, logfile: str | os.PathLike | None = None,
           interval: int = 1, seed: int | None = 0, initialize_velocities: bool = True,
           device: str = "cpu", dtype: str | None = None, threads: int | None = 1,
           compile: bool = False) -> MDLog:
    """Run molecular dynamics of ``atoms`` (changed in place) with an atomlens model.

    Args:
        model_or_calc: an :class:`~atomlens.models.AtomisticModel`, a saved model folder, or
            an ASE calculator (e.g. an :class:`atomlens.Calculator` already set up).
        atoms: ASE ``Atoms`` of one molecule (positions in Angstrom).
        ensemble: ``"nve"`` (velocity Verlet) or ``"langevin"`` (NVT, thermostat at
            ``temperature_K``).
        temperature_K: Maxwell-Boltzmann temperature of the initial velocities, and the
            thermostat temperature for Langevin (K).
        timestep_fs: time step (fs). steps: number of steps.
        friction: Langevin friction (1/fs; 0.01/fs is a relaxation time of 100 fs).
        trajectory: ``.traj`` (ASE) or another suffix (extxyz) file; frames every ``interval``.
        logfile: CSV file with columns ``time_fs, epot_eV, ekin_eV, etot_eV, temperature_K``.
        interval: write the trajectory and the log every ``interval`` steps.
        seed: random seed of the initial velocities and of the Langevin noise.
        initialize_velocities: draw fresh velocities (else keep the atoms' momenta).
        device, dtype: for a model or a path (``dtype="float64"`` for conservation tests).
        threads: torch CPU threads during the run (restored afterwards); one molecule of
            tens of atoms runs fastest on one thread (its tensors are too small to split,
            and on a busy machine thread barriers cost more than the model), ``None`` keeps
            the current setting.
        compile: torch.compile the model's energy and forces (see :class:`Calculator`).

    Returns:
        :class:`MDLog` of the logged steps (step 0 included).
    """
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    if ensemble not in ("nve", "langevin"):
        raise ValueError(f"ensemble must be 'nve' or 'langevin', not {ensemble!r}")
    if steps < 0 or timestep_fs <= 0 or interval < 1:
        raise ValueError("steps must be >= 0, timestep_fs > 0 and interval >= 1")
    atoms.calc = _calculator(model_or_calc, device, dtype, compile)
    rng = np.random.default_rng(seed)
    if initialize_velocities:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
        if len(atoms) > 2:
            ZeroRotation(atoms)
    dt = timestep_fs * ase_units.fs
    if ensemble == "nve":
        dyn = VelocityVerlet(atoms, dt)
    else:
        # the thermostat's noise would move the centre of mass: fix it by a constraint
        # (ASE's fixcm=True option is deprecated as not sampling NVT exactly)
        constraints = list(atoms.constraints)
        if not any(isinstance(c, FixCom) for c in constraints):
            atoms.set_constraint(constraints + [FixCom()])
        dyn = Langevin(atoms, dt, temperature_K=temperature_K,
                       friction=friction / ase_units.fs, fixcm=False, rng=rng)

    log = MDLog()
    stack = contextlib.ExitStack()
    writer = None
    if logfile is not None:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        writer = csv.writer(stack.enter_context(open(logfile, "w", newline="")))  # noqa: SIM115
        writer.writerow(LOG_COLUMNS)

    def record() -> None:
        epot = atoms.get_potential_energy()  # cached from the step's force call
        ekin = atoms.get_kinetic_energy()
        row = (dyn.nsteps * timestep_fs, epot, ekin, epot + ekin, kinetic_temperature(atoms))
        for values, value in zip((log.time_fs, log.epot, log.ekin, log.etot, log.temperature),
                                 row):
            values.append(float(value))
        if writer is not None:
            writer.writerow([f"{v:.10g}" for v in row])

    dyn.attach(record, interval=interval)
    bar = stack.enter_context(tqdm(total=steps, desc=f"{ensemble.upper()} MD", unit="step",
                                   leave=False, disable=None))  # a bar on a terminal only
    dyn.attach(lambda: bar.update(1) if dyn.nsteps else None, interval=1)
    previous_threads = torch.get_num_threads()
    with stack:
        if trajectory is not None:
            dyn.attach(_trajectory_writer(Path(trajectory), atoms, stack), interval=interval)
        try:
            if threads:
                torch.set_num_threads(threads)
            dyn.run(steps)
        finally:
            torch.set_num_threads(previous_threads)
            if ensemble == "langevin":
                atoms.set_constraint(constraints)
    return log
