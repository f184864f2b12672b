"""``atomlens md``: molecular dynamics with a trained model (a thin layer over :mod:`atomlens.md`
and :mod:`atomlens.batched_md`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..fileio import check_outputs
from ._common import add_device, check_numbers, resolve_device


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "md",
        help="molecular dynamics with a trained energy model (ASE integrators)",
        description="Run NVE (velocity Verlet), Langevin (NVT) or, for periodic cells, NPT "
        "(isotropic MTK barostat) dynamics with a trained atomlens model; write a "
        "trajectory and a CSV energy log.",
    )
    p.add_argument(
        "model",
        help="model folder (or the training output folder), or an "
        "ensemble folder (logs the members' spread)",
    )
    p.add_argument(
        "structure", help="start structure: any ASE-readable file (xyz, extxyz, db, traj, ...)"
    )
    p.add_argument(
        "--index",
        default="0",
        help="which frame(s) of the structure file (ASE syntax, default 0: the first; "
        "':' or a slice runs several frames as a batch of trajectories)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="independent trajectories per structure (different initial "
        "velocities), all advanced by one model call per step (molecules)",
    )
    p.add_argument(
        "--ensemble",
        choices=["nve", "langevin", "npt"],
        default="nve",
        help="nve, langevin (NVT) or npt (periodic cells only)",
    )
    p.add_argument(
        "--pressure",
        type=float,
        help="NPT pressure, bar (default 1.01325 = 1 atm; npt only)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=300.0,
        help="initial Maxwell-Boltzmann and thermostat temperature, K (default 300)",
    )
    p.add_argument("--steps", type=int, default=1000, help="number of MD steps (default 1000)")
    p.add_argument("--timestep", type=float, default=0.5, help="time step, fs (default 0.5)")
    p.add_argument(
        "--friction", type=float, help="Langevin friction, 1/fs (default 0.01; langevin only)"
    )
    p.add_argument(
        "--interval",
        type=int,
        default=10,
        help="write trajectory frames and log rows every n steps (default 10)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of velocities and Langevin noise")
    p.add_argument(
        "--out",
        default="md.traj",
        help="trajectory: .traj (ASE) or extxyz for other suffixes (default md.traj)",
    )
    p.add_argument(
        "--log",
        help="CSV log of time_fs, epot_eV, ekin_eV, etot_eV, temperature_K "
        "(+ volume_A3 for cells, energy_std_eV, max_force_std_eV_A for an "
        "ensemble); default: beside the trajectory, OUT with the suffix .csv",
    )
    p.add_argument(
        "--max-temperature",
        type=float,
        default=None,
        help="stop (exit 2) when the temperature exceeds this, K (default: the "
        "larger of 2000 K and 5 x --temperature; inf: no limit)",
    )
    p.add_argument(
        "--max-drift",
        type=float,
        default=None,
        help="NVE: stop (exit 2) when the total energy drifts by more than this, "
        "eV/atom (default 0.1; inf: no limit); Langevin has no conserved energy",
    )
    p.add_argument(
        "--allow-unknown-elements",
        action="store_true",
        help="run with elements the model was not trained on (a warning)",
    )
    add_device(p)
    p.add_argument("--float64", action="store_true", help="run the model in float64")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1: one molecule's tensors are too small to split)",
    )
    compiled = p.add_mutually_exclusive_group()
    compiled.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const=True,
        default="auto",
        help="torch.compile energy+forces for any structure (default: "
        "periodic cells and molecules of up to 64 atoms, with --replicas too; "
        "several times the steps/s after a one-off compile, cached on disk)",
    )
    compiled.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        help="never compile (the eager model)",
    )
    p.set_defaults(func=run)


#: the range of each numeric option (:func:`check_numbers`; inf turns the stop limits off)
OPTION_RANGES = {
    "--temperature": ">= 0",
    "--pressure": "",
    "--steps": ">= 0",
    "--timestep": "> 0",
    "--friction": ">= 0",
    "--interval": ">= 1",
    "--seed": ">= 0",
    "--max-temperature": "> 0",
    "--max-drift": "> 0",
}
#: options that only one ensemble reads, with their defaults
ENSEMBLE_OPTIONS = {
    "friction": ("langevin", 0.01),
    "pressure": ("npt", 1.01325),
    "max_drift": ("nve", 0.1),
}


def run(args) -> int:
    from ..data.sources.open import open_structures
    from ..md import run_md

    for option, (ensemble, default) in ENSEMBLE_OPTIONS.items():
        if getattr(args, option) is not None and args.ensemble != ensemble:
            raise ValueError(
                f"--{option.replace('_', '-')} applies to --ensemble {ensemble}, not "
                f"{args.ensemble}: drop it or change the ensemble"
            )
        if getattr(args, option) is None:
            setattr(args, option, default)
    check_numbers(args, OPTION_RANGES, infinite=("--max-temperature", "--max-drift"))
    if args.ensemble == "npt" and not args.temperature > 0:
        raise ValueError(
            f"--temperature must be > 0 with --ensemble npt (its Nose-Hoover thermostat "
            f"divides by kT), not {args.temperature}"
        )
    frames = open_structures(args.structure, args.index)  # checked, the file named
    if args.index == "0" and _has_more_frames(args.structure):
        print(
            f"{args.structure}: running its first frame (--index 0, the default); "
            f"--index : runs every frame, as a batch",
            file=sys.stderr,
        )
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, not {args.replicas}")
    model = args.model  # a folder, read once: where the elements are checked, that model
    if not args.allow_unknown_elements:  # allowed: the calculators warn, once
        from ..ensemble import is_ensemble_folder, load_ensemble
        from ..models.guards import refuse_unknown_elements

        models = load_ensemble(args.model)
        refuse_unknown_elements(models, frames, args.structure)
        model = models if is_ensemble_folder(args.model) else models[0]
    if len(frames) * args.replicas > 1:
        return run_batched(args, frames, model)
    atoms = frames[0]
    atoms.calc = None
    log_path = Path(args.log) if args.log else Path(args.out).with_suffix(".csv")
    if log_path == Path(args.out):
        raise ValueError(f"{log_path}: the log and the trajectory would be one file")
    check_outputs({"--out": args.out, "--log": log_path}, [args.model, args.structure])
    # an earlier run's files are replaced only when this run completes (run_md writes to
    # temporary files and renames them at the end)
    args.log = str(log_path)
    log = run_md(
        model,
        atoms,
        ensemble=args.ensemble,
        temperature_K=args.temperature,
        timestep_fs=args.timestep,
        steps=args.steps,
        friction=args.friction,
        trajectory=args.out,
        logfile=args.log,
        interval=args.interval,
        seed=args.seed,
        device=resolve_device(args.device),
        dtype="float64" if args.float64 else None,
        compile=args.compile,
        max_temperature_K=args.max_temperature,
        max_drift_eV_per_atom=args.max_drift,
        allow_unknown_elements=args.allow_unknown_elements,
        pressure_bar=args.pressure,
        threads=args.threads or 1,
    )
    print(
        f"{args.ensemble.upper()} MD of {atoms.get_chemical_formula()}: {args.steps} steps of "
        f"{args.timestep} fs ({args.steps * args.timestep / 1000:.3g} ps)"
    )
    temperature = np.asarray(log.temperature)
    if args.ensemble == "nve":  # E_tot is conserved only without a thermostat
        drift = log.drift(len(atoms))
        print(
            f"  mean T = {temperature.mean():.1f} K; E_tot drift "
            f"{drift['drift_eV_per_atom'] * 1000:.3f} meV/atom, std "
            f"{drift['std_eV_per_atom'] * 1000:.3f} meV/atom"
        )
    else:
        print(
            f"  T = {temperature.mean():.1f} +- {temperature.std():.1f} K (thermostat "
            f"{args.temperature:g} K; E_tot is not conserved under a thermostat)"
        )
    if log.volume:
        print(
            f"  volume {log.volume[0]:.2f} -> {log.volume[-1]:.2f} Angstrom^3 (mean "
            f"{sum(log.volume) / len(log.volume):.2f})"
        )
    if log.energy_std:
        print(
            f"  ensemble spread: energy std up to {max(log.energy_std) * 1000:.1f} meV, "
            f"largest atomic force std {max(log.max_force_std):.3f} eV/Angstrom"
        )
    print(f"  trajectory: {Path(args.out)}  log: {log_path}")
    return 0


def _earlier_numbered(path: str, n: int) -> list[Path]:
    """Files ``stem.K.suffix`` with K >= n: trajectories or logs this run does not write."""
    path = Path(path)
    found = []
    for candidate in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        middle = candidate.name[len(path.stem) + 1 : len(candidate.name) - len(path.suffix)]
        if middle.isdigit() and int(middle) >= n:
            found.append(candidate)
    return sorted(found)


def _has_more_frames(path: str) -> bool:
    """Whether a structure file holds a second frame (reads two frames at most)."""
    import itertools

    import ase.io

    try:
        return len(list(itertools.islice(ase.io.iread(path, index=":"), 2))) > 1
    except Exception:  # noqa: BLE001 (a format ASE cannot stream: say nothing)
        return False


def numbered(path: str, k: int, n: int) -> Path:
    """``md.traj`` -> ``md.3.traj`` for trajectory 3 of several (zero-padded to n's width)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{k:0{len(str(n - 1))}d}{path.suffix}")


def run_batched(args, frames, model) -> int:
    """Several trajectories (frames x replicas) through :class:`atomlens.batched_md.BatchedMD`
    (``model``: the folder, or the model or ensemble members read from it)."""
    from ..batched_md import run_batched_md

    if any(atoms.pbc.any() for atoms in frames) or args.ensemble == "npt":
        raise ValueError(
            "several trajectories at once (--replicas, several frames) are for "
            "molecules in NVE or Langevin; run periodic cells one at a time"
        )
    if args.log is None:
        args.log = str(Path(args.out).with_suffix(".csv"))
    systems = [atoms for atoms in frames for _ in range(args.replicas)]
    n = len(systems)
    trajectories = [numbered(args.out, k, n) for k in range(n)]
    logfiles = [numbered(args.log, k, n) for k in range(n)]
    if set(trajectories) & set(logfiles):
        raise ValueError(f"{args.log}: the logs and the trajectories would be the same files")
    outputs = {f"--out ({path.name})": path for path in trajectories}
    outputs |= {f"--log ({path.name})": path for path in logfiles}
    check_outputs(outputs, [args.model, args.structure])
    stale = _earlier_numbered(args.out, n) + _earlier_numbered(args.log, n)
    if stale:  # an earlier run with more trajectories: its extra files stay, said so
        print(
            f"note: {len(stale)} file(s) of an earlier run with more trajectories stay beside "
            f"this run's, e.g. {stale[0]}",
            file=sys.stderr,
        )
    logs = run_batched_md(
        model,
        systems,
        steps=args.steps,
        trajectories=trajectories,
        logfiles=logfiles,
        interval=args.interval,
        ensemble=args.ensemble,
        temperature_K=args.temperature,
        timestep_fs=args.timestep,
        friction=args.friction,
        seed=args.seed,
        device=resolve_device(args.device),
        dtype="float64" if args.float64 else None,
        compile=args.compile,
        allow_unknown_elements=args.allow_unknown_elements,
        max_temperature_K=args.max_temperature,
        max_drift_eV_per_atom=args.max_drift,
    )
    print(
        f"{args.ensemble.upper()} MD of {n} trajectories ({len(frames)} structures x "
        f"{args.replicas} replicas): {args.steps} steps of {args.timestep} fs"
    )
    for k, (atoms, log) in enumerate(zip(systems, logs)):
        temperature = np.asarray(log.temperature)
        if args.ensemble == "nve":  # E_tot is conserved only without a thermostat
            drift = log.drift(len(atoms))
            state = (
                f"mean T = {temperature.mean():.1f} K; E_tot drift "
                f"{drift['drift_eV_per_atom'] * 1000:.3f} meV/atom"
            )
        else:
            state = f"T = {temperature.mean():.1f} +- {temperature.std():.1f} K"
        print(f"  {k}: {atoms.get_chemical_formula()} {state} -> {trajectories[k]}, {logfiles[k]}")
        if log.energy_std:  # an ensemble: the members' spread along the trajectory
            print(
                f"     ensemble spread: energy std up to {max(log.energy_std) * 1000:.1f} meV, "
                f"largest atomic force std {max(log.max_force_std):.3f} eV/Angstrom"
            )
    return 0
