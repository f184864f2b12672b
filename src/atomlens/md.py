"""Molecular dynamics with a trained atomlens model, through ASE's integrators.

    NVE:       velocity Verlet;  E_tot = E_pot + E_kin is conserved up to the integration error
    Langevin:  dp = F dt - gamma p dt + sqrt(2 m gamma k_B T) dW   (canonical ensemble at T)
    NPT:       periodic cells at temperature T and pressure P: ASE's isotropic
               Martyna-Tobias-Klein integrator (Nose-Hoover chains for T, an MTK barostat
               for the volume), driven by the model's stress

Velocities start from a Maxwell-Boltzmann distribution with zero total momentum (NVE of a
molecule: and zero angular momentum), rescaled so that the kinetic temperature over the
degrees of freedom left is exactly ``temperature_K`` (unless ``initialize_velocities=False``
keeps the atoms' own): 3n - 6 for NVE of a molecule (3n - 5 for a linear one), where both
momenta stay zero, and 3n - 3 for Langevin, whose noise moves the rotation but not the fixed
centre of mass, and for periodic cells. Atoms held by constraints (``FixAtoms``, fixed bonds
or directions) count 3n minus what the constraints remove, as ASE's ``get_temperature``
does, and keep the momenta the constraints allow (none removed). (Removing the momenta
while keeping, on average, the kinetic energy of 3n degrees of freedom, as before 0.3,
started 3n/(3n - 3) hot: ethanol 12.5 %.) The trajectory goes to an ASE ``.traj`` file or to extxyz (any other suffix), with
the model's energy and forces on every stored frame; a CSV log records time (fs), E_pot,
E_kin, E_tot (eV) and the kinetic temperature T (K) over the same degrees of freedom, see
:func:`kinetic_temperature` and :func:`degrees_of_freedom`, and the volume of a cell. With an
ensemble (an :class:`~atomlens.ensemble.EnsembleCalculator`, or an ensemble folder) the log
also records the members' spread: ``energy_std_eV`` and ``max_force_std_eV_A``.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import units as ase_units
from tqdm.auto import tqdm

LOG_COLUMNS = ("time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K")
ENSEMBLES = ("nve", "langevin", "npt")
#: logged in addition when the calculator is an ensemble (its uncertainty)
SPREAD_COLUMNS = ("energy_std_eV", "max_force_std_eV_A")


def held_by_constraints(atoms) -> bool:
    """Whether constraints other than ``FixCom`` remove degrees of freedom (``FixAtoms``,
    fixed bonds or directions): the atoms are then not free to translate and rotate as a
    whole, so no momentum is removed and the degrees of freedom are the constraints'."""
    from ase.constraints import FixCom

    return any(c.get_removed_dof(atoms) > 0 for c in atoms.constraints if not isinstance(c, FixCom))


def degrees_of_freedom(atoms, rotation_removed: bool = False) -> int:
    """3n - 3 (total momentum zero); with ``rotation_removed`` also the angular momentum:
    3n - 6, or 3n - 5 for a linear molecule (at least 1). Atoms held by constraints
    (:func:`held_by_constraints`): 3n minus what every constraint removes, as ASE's
    ``Atoms.get_temperature`` counts them."""
    n = len(atoms)
    if held_by_constraints(atoms):
        return max(3 * n - sum(c.get_removed_dof(atoms) for c in atoms.constraints), 1)
    n_dof = 3 * n - 3
    if rotation_removed and n > 1:
        inertia = atoms.get_moments_of_inertia()
        n_dof -= 2 if inertia.min() < 1e-8 * max(inertia.max(), 1e-30) else 3
    return max(n_dof, 1)


def draw_momenta(atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K`` (K) from ``rng``: ASE's
    ``thermalize_momenta``, ``MaxwellBoltzmannDistribution`` before ASE 3.29 (which
    deprecates that name)."""
    from ase.md import velocitydistribution as velocities

    if hasattr(velocities, "thermalize_momenta"):
        velocities.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        velocities.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def kinetic_temperature(atoms, n_dof: int | None = None) -> float:
    """T = 2 E_kin / (n_dof k_B) (K); ``n_dof`` by default 3n - 3 (zero total momentum)."""
    n_dof = degrees_of_freedom(atoms) if n_dof is None else n_dof
    return 2.0 * atoms.get_kinetic_energy() / (n_dof * ase_units.kB)


@dataclass
class MDLog:
    """Per logged step: time (fs), potential, kinetic and total energy (eV), temperature (K)."""

    time_fs: list[float] = field(default_factory=list)
    epot: list[float] = field(default_factory=list)
    ekin: list[float] = field(default_factory=list)
    etot: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    #: cell volume (Angstrom^3) of periodic systems; empty for molecules
    volume: list[float] = field(default_factory=list)
    #: ensembles only: spread of the members' energy (eV) and largest per-atom force
    #: spread (eV/Angstrom)
    energy_std: list[float] = field(default_factory=list)
    max_force_std: list[float] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            name: np.asarray(getattr(self, attr))
            for name, attr in zip(LOG_COLUMNS, ("time_fs", "epot", "ekin", "etot", "temperature"))
        }
        if self.volume:
            out["volume_A3"] = np.asarray(self.volume)
        if self.energy_std:
            out.update(
                zip(SPREAD_COLUMNS, (np.asarray(self.energy_std), np.asarray(self.max_force_std)))
            )
        return out

    def drift(self, n_atoms: int) -> dict[str, float]:
        """Energy conservation: |E_tot(end) - E_tot(0)| and std(E_tot), in eV per atom."""
        etot = np.asarray(self.etot)
        return {
            "drift_eV_per_atom": float(abs(etot[-1] - etot[0]) / n_atoms),
            "std_eV_per_atom": float(etot.std() / n_atoms),
        }


def _calculator(model_or_calc, device, dtype, compile="auto", allow_unknown_elements=False):
    from ase.calculators.calculator import BaseCalculator

    if isinstance(model_or_calc, BaseCalculator):
        return model_or_calc
    from .calculator import Calculator
    from .ensemble import EnsembleCalculator, ensemble_members, is_ensemble_folder

    if isinstance(model_or_calc, (str, os.PathLike)) and is_ensemble_folder(model_or_calc):
        model_or_calc = ensemble_members(model_or_calc)
    if isinstance(model_or_calc, (list, tuple)) and len(model_or_calc) == 1:
        model_or_calc = model_or_calc[0]  # a committee of one (train --ensemble 1): itself
    if isinstance(model_or_calc, (list, tuple)):
        return EnsembleCalculator(
            model_or_calc,
            device=device,
            dtype=dtype,
            compile=compile,
            allow_unknown_elements=allow_unknown_elements,
        )
    return Calculator(
        model_or_calc,
        device=device,
        dtype=dtype,
        compile=compile,
        allow_unknown_elements=allow_unknown_elements,
    )


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
    # stated units: the trajectory reads back as data (read_ase) without a declaration
    atoms.info.update(energy_unit="eV", length_unit="Angstrom")

    def append() -> None:
        write(handle, atoms, format="extxyz")
        handle.flush()

    return append


def run_md(
    model_or_calc,
    atoms,
    ensemble: str = "nve",
    temperature_K: float = 300.0,
    timestep_fs: float = 0.5,
    steps: int = 1000,
    friction: float = 0.01,
    trajectory: str | os.PathLike | None = None,
    logfile: str | os.PathLike | None = None,
    interval: int = 1,
    seed: int | None = 0,
    initialize_velocities: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = 1,
    compile: bool | str = "auto",
    pressure_bar: float = 1.01325,
    barostat_time_fs: float | None = None,
    max_temperature_K: float | None = None,
    max_drift_eV_per_atom: float = 0.1,
    allow_unknown_elements: bool = False,
) -> MDLog:
    """Run molecular dynamics of ``atoms`` (changed in place) with an atomlens model.

    Args:
        model_or_calc: an :class:`~atomlens.models.AtomisticModel`, a saved model folder, an
            ensemble folder or list of models (-> :class:`~atomlens.ensemble.EnsembleCalculator`,
            whose spread is logged), or an ASE calculator (e.g. an :class:`atomlens.Calculator`).
        atoms: ASE ``Atoms`` of one molecule or one periodic cell (positions in Angstrom).
        ensemble: ``"nve"`` (velocity Verlet), ``"langevin"`` (NVT, thermostat at
            ``temperature_K``) or ``"npt"`` (periodic cells: temperature and pressure
            controlled, the cell's volume moves; isotropic MTK barostat).
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
        compile: torch.compile the model's energy and forces: ``"auto"`` (small molecules),
            ``True`` or ``False`` (see :class:`Calculator`).
        pressure_bar: NPT target pressure (bar; 1.01325 bar = 1 atm).
        barostat_time_fs: NPT barostat time scale (fs; default 1000 time steps); the
            thermostat's is 100 time steps.
        max_temperature_K: stop with :class:`MDUnstableError` when the kinetic temperature
            exceeds this (K; default the larger of 2000 K and 5 x ``temperature_K``).
        max_drift_eV_per_atom: NVE only: stop when |E_tot - E_tot(0)| / n_atoms exceeds
            this (eV/atom; a stable run at 0.5 fs drifts by meV/atom).
        allow_unknown_elements: run with elements absent from the training data (warning).

    The settings and the first force call are checked before any output is opened; the
    outputs are written to temporary files and renamed at the end (or at a Ctrl-C), so an
    earlier run's files are replaced only by a complete run. A run stopped as unstable
    keeps what it wrote under ``NAME.unstable.SUFFIX``.

    Returns:
        :class:`MDLog` of the logged steps (step 0 included).
    """
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    _check_settings(
        atoms, ensemble, temperature_K, timestep_fs, steps, friction, interval, pressure_bar
    )
    check_stop_limits(max_temperature_K, max_drift_eV_per_atom)
    atoms.calc = _calculator(model_or_calc, device, dtype, compile, allow_unknown_elements)
    # the first force call validates atoms and model before anything is written
    atoms.get_forces()
    if max_temperature_K is None:
        max_temperature_K = max(2000.0, 5.0 * temperature_K)
    rng = np.random.default_rng(seed)
    # NVE conserves a zero angular momentum; Langevin's noise does not (only the centre of
    # mass is fixed), so its rotations are degrees of freedom the thermostat fills
    # no angular momentum to remove in a periodic cell
    # atoms held by constraints (FixAtoms, ...) have no free translation or rotation to
    # remove: their momenta come from the constraints alone, and the thermostat adds no
    # FixCom (it would move the fixed atoms with the centre of mass)
    held = held_by_constraints(atoms)
    rotation_removed = (
        ensemble == "nve"
        and initialize_velocities
        and len(atoms) > 2
        and not atoms.pbc.any()
        and not held
    )
    n_dof = degrees_of_freedom(atoms, rotation_removed)
    if initialize_velocities:
        draw_momenta(atoms, temperature_K, rng)  # (set_momenta applies the constraints)
        if not held:
            Stationary(atoms, preserve_temperature=False)
        if rotation_removed:
            ZeroRotation(atoms, preserve_temperature=False)
        drawn = kinetic_temperature(atoms, n_dof)
        if drawn > 0:  # exactly temperature_K over the degrees of freedom left
            atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature_K / drawn))
    dt = timestep_fs * ase_units.fs
    constraints = list(atoms.constraints)
    if ensemble == "nve":
        dyn = VelocityVerlet(atoms, dt)
    elif ensemble == "npt":
        from ase.md.nose_hoover_chain import IsotropicMTKNPT

        if constraints:
            raise ValueError("NPT (ASE's MTK integrator) does not support constraints")
        pdamp = (barostat_time_fs or 1000 * timestep_fs) * ase_units.fs
        dyn = IsotropicMTKNPT(
            atoms,
            dt,
            temperature_K=temperature_K,
            pressure_au=pressure_bar * ase_units.bar,
            tdamp=100 * dt,
            pdamp=pdamp,
        )
    else:
        # the thermostat's noise would move the centre of mass: fix it by a constraint
        # (ASE's fixcm=True option is deprecated as not sampling NVT exactly)
        if not held and not any(isinstance(c, FixCom) for c in constraints):
            atoms.set_constraint(constraints + [FixCom()])
        dyn = Langevin(
            atoms,
            dt,
            temperature_K=temperature_K,
            friction=friction / ase_units.fs,
            fixcm=False,
            rng=rng,
        )

    log = MDLog()
    periodic = bool(atoms.pbc.all())
    spread = "energy_std" in getattr(atoms.calc, "implemented_properties", ())
    # outputs are written to temporary files beside their names and renamed at the end, so
    # a failed run never truncates the results of an earlier one
    outputs = temporary_outputs((trajectory, logfile))
    stack = contextlib.ExitStack()
    writer = None
    if logfile is not None:
        handle = stack.enter_context(open(outputs[Path(logfile)], "w", newline=""))  # noqa: SIM115
        writer = csv.writer(handle)
        writer.writerow(
            LOG_COLUMNS + (("volume_A3",) if periodic else ()) + (SPREAD_COLUMNS if spread else ())
        )

    def record() -> None:
        epot = atoms.get_potential_energy()  # cached from the step's force call
        ekin = atoms.get_kinetic_energy()
        row = (dyn.nsteps * timestep_fs, epot, ekin, epot + ekin, kinetic_temperature(atoms, n_dof))
        for values, value in zip((log.time_fs, log.epot, log.ekin, log.etot, log.temperature), row):
            values.append(float(value))
        if periodic:
            log.volume.append(float(atoms.get_volume()))
            row = (*row, log.volume[-1])
        if spread:  # cached with the step's forces
            log.energy_std.append(float(atoms.calc.get_property("energy_std", atoms)))
            log.max_force_std.append(float(atoms.calc.get_property("max_force_std", atoms)))
            row = (*row, log.energy_std[-1], log.max_force_std[-1])
        if writer is not None:
            writer.writerow([f"{v:.10g}" for v in row])

    dyn.attach(record, interval=interval)
    bar = stack.enter_context(
        tqdm(total=steps, desc=f"{ensemble.upper()} MD", unit="step", leave=False, disable=None)
    )  # a bar on a terminal only
    dyn.attach(lambda: bar.update(1) if dyn.nsteps else None, interval=1)
    previous_threads = torch.get_num_threads()
    with published(outputs), stack:
        if trajectory is not None:
            dyn.attach(
                _trajectory_writer(outputs[Path(trajectory)], atoms, stack), interval=interval
            )
        # after the log and the trajectory: the frame that stops a run is in its files
        dyn.attach(
            _stability_check(
                dyn, atoms, ensemble, timestep_fs, max_temperature_K, max_drift_eV_per_atom, n_dof
            ),
            interval=1,
        )
        try:
            if threads:
                torch.set_num_threads(threads)
            dyn.run(steps)
        finally:
            torch.set_num_threads(previous_threads)
            if ensemble == "langevin":
                atoms.set_constraint(constraints)
    return log


class MDUnstableError(ValueError):
    """The dynamics left the sane range (temperature or energy drift): the time step is too
    long or the model is used outside its training range."""


def _check_settings(
    atoms, ensemble, temperature_K, timestep_fs, steps, friction, interval, pressure_bar=1.01325
):
    """Refuse settings that cannot give meaningful dynamics, naming the value."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, not {ensemble!r}")
    if ensemble == "npt" and not atoms.pbc.all():
        raise ValueError(
            "NPT needs a cell periodic in all three directions; the atoms have "
            f"pbc={atoms.pbc.tolist()}"
        )
    if len(atoms) < 2:
        why = (
            "a lone atom has no motion of its own once the centre-of-mass momentum is "
            "removed: repeat the cell (ase's atoms.repeat(2), a 2x2x2 supercell)"
            if atoms.pbc.any()
            else "a single atom has no interactions to follow"
        )
        raise ValueError(f"MD needs at least two atoms; the structure has {len(atoms)} ({why})")
    checks = (
        (temperature_K, "temperature", "K", lambda v: v >= 0, ">= 0"),
        (timestep_fs, "time step", "fs", lambda v: v > 0, "> 0"),
        (friction, "friction", "1/fs", lambda v: v >= 0, ">= 0"),
    )
    for value, name, unit, ok, rule in checks:
        if not (np.isfinite(value) and ok(value)):
            raise ValueError(f"the {name} must be finite and {rule} {unit}, not {value}")
    if steps < 0 or interval < 1:
        raise ValueError(f"steps must be >= 0 and interval >= 1 (got {steps}, {interval})")
    if not np.isfinite(pressure_bar):
        raise ValueError(f"the pressure must be finite (bar), not {pressure_bar}")
    if ensemble == "npt" and not temperature_K > 0:
        raise ValueError(
            f"NPT needs a temperature > 0 K (its Nose-Hoover thermostat divides by kT), "
            f"not {temperature_K}"
        )


def check_stop_limits(max_temperature_K: float | None, max_drift: float) -> None:
    """Refuse stop limits that are not positive (``None``: the default; ``inf``: no limit):
    a run would stop at its first step."""
    for value, name, unit in (
        (max_temperature_K, "max_temperature_K", "K"),
        (max_drift, "max_drift_eV_per_atom", "eV/atom"),
    ):
        if value is not None and not value > 0:  # NaN too
            raise ValueError(f"{name} must be > 0 {unit} (inf: no limit), not {value}")


def _stability_check(
    dyn, atoms, ensemble, timestep_fs, max_temperature_K, max_drift_eV_per_atom, n_dof=None
):
    """An observer that stops a run whose temperature or (NVE) energy drift leaves range.

    Langevin dynamics has no conserved energy (the thermostat exchanges heat), so only the
    temperature is checked there. Blown-up dynamics need not give NaN: atoms thrown beyond
    the cutoff feel no force and fly apart at a finite, huge temperature.
    """
    start = {}

    def check() -> None:
        temperature = kinetic_temperature(atoms, n_dof)  # as logged
        etot = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        start.setdefault("etot", etot)
        hint = (
            f"at step {dyn.nsteps} ({dyn.nsteps * timestep_fs:g} fs); shorten the time "
            f"step ({timestep_fs:g} fs now) or check that the model knows this "
            f"{'structure' if atoms.pbc.any() else 'molecule'}"
        )
        if not temperature <= max_temperature_K:
            raise MDUnstableError(
                f"the temperature reached {temperature:.4g} K, above the "
                f"limit of {max_temperature_K:g} K, {hint}"
            )
        drift = abs(etot - start["etot"]) / len(atoms)
        if ensemble == "nve" and not drift <= max_drift_eV_per_atom:
            raise MDUnstableError(
                f"the total energy drifted by {drift:.4g} eV/atom, above the "
                f"limit of {max_drift_eV_per_atom:g} eV/atom, {hint}"
            )

    return check


def temporary_outputs(paths) -> dict[Path, Path]:
    """{name: temporary file beside it} for the output ``paths`` (``None`` entries skipped),
    to write into and hand to :func:`published`; temporary files of killed runs are
    removed first."""
    from .fileio import recover_folder, temporary_name

    outputs = {}
    for path in paths:
        if path is None:
            continue
        if not str(path):
            raise ValueError("an output path is empty: give a file name, or None for no file")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(path)
        outputs[path] = temporary_name(path)
    return outputs


@contextlib.contextmanager
def published(outputs: dict[Path, Path]) -> Iterator[None]:
    """Rename the temporary ``outputs`` ({name: temporary file}) to their names when the
    block ends, or at a Ctrl-C; keep them as ``NAME.unstable.SUFFIX`` (and say so) when it
    stops with :class:`MDUnstableError`; delete them on any other error."""
    try:
        yield
    except KeyboardInterrupt:  # a clean stop: what was computed is kept
        _publish(outputs)
        raise
    except MDUnstableError as err:
        kept = _publish(outputs, tag=".unstable")
        where = f"; the run up to the stop is in {', '.join(map(str, kept))}" if kept else ""
        raise MDUnstableError(f"{err}{where}") from None
    except BaseException:
        for tmp in outputs.values():
            tmp.unlink(missing_ok=True)
        raise
    _publish(outputs)


def _publish(outputs: dict[Path, Path], tag: str = "") -> list[Path]:
    """Rename the temporary outputs to their names (``tag`` inserted before the suffix)."""
    done = []
    for path, tmp in outputs.items():
        if tmp.exists():
            final = path.with_name(f"{path.stem}{tag}{path.suffix}")
            os.replace(tmp, final)
            done.append(final)
    return done
