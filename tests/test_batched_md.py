"""Batched MD: many trajectories in one model call per step, equal to ASE's integrators."""

import csv
import logging

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read
from helpers import random_model

from atomlens import batched_md, calculator
from atomlens.batched_md import BatchedMD, run_batched_md
from atomlens.calculator import Calculator
from atomlens.md import MDUnstableError, kinetic_temperature

pytestmark = pytest.mark.usefixtures("one_thread")


def _systems():
    """Different molecules (and two replicas of one), rattled out of symmetry."""
    systems = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH3CH2OH"), molecule("C6H6")]
    for k, atoms in enumerate(systems):
        atoms.rattle(0.05, seed=k)
    return systems


def test_nve_equals_ase_velocity_verlet_trajectory_by_trajectory():
    from ase.md.verlet import VelocityVerlet

    model = random_model("schnet", seed=2)
    systems = _systems()
    md = BatchedMD(model, systems, timestep_fs=0.5, temperature_K=300, dtype="float64", seed=4)
    starts = [md.atoms(k) for k in range(len(systems))]  # the batched run's initial velocities
    md.run(30)
    for k, atoms in enumerate(starts):
        momenta = atoms.get_momenta()
        assert np.abs(momenta.sum(0)).max() < 1e-12  # zero momentum per trajectory
        atoms.calc = Calculator(model, dtype="float64")
        VelocityVerlet(atoms, 0.5 * units_fs()).run(30)
        ours = md.atoms(k)
        np.testing.assert_allclose(ours.positions, atoms.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours.get_momenta(), atoms.get_momenta(), rtol=0, atol=1e-10)
        assert ours.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)


def units_fs():
    from ase import units as ase_units

    return ase_units.fs


def test_nve_conserves_energy_per_trajectory():
    model = random_model("schnet", seed=3)
    logs = run_batched_md(
        model, _systems(), steps=200, interval=10, timestep_fs=0.25, dtype="float64", seed=1
    )
    for log, atoms in zip(logs, _systems()):
        drift = log.drift(len(atoms))
        assert drift["drift_eV_per_atom"] < 1e-4 and drift["std_eV_per_atom"] < 1e-4, drift
        assert np.std(log.epot) > 10 * np.std(log.etot)  # the energy moves between E_pot, E_kin


def test_langevin_holds_the_temperature():
    model = random_model("schnet", seed=5)
    replicas = [molecule("CH3CH2OH") for _ in range(8)]
    md = BatchedMD(
        model,
        replicas,
        ensemble="langevin",
        temperature_K=50.0,
        timestep_fs=0.25,
        friction=0.2,
        seed=7,
        dtype="float64",
    )
    logs = md.run(400, interval=5)
    late = np.array([log.temperature[20:] for log in logs])  # after 20 relaxation times
    assert md.temperatures().shape == (8,)
    assert abs(late.mean() - 50.0) < 0.08 * 50.0, late.mean()
    total = md.momenta.reshape(8, 9, 3).sum(1)
    assert torch.abs(total).max() < 1e-10  # the noise leaves the total momentum at zero


def test_langevin_step_is_baoab_written_out():
    """One Langevin step against BAOAB by hand (numpy, ASE's units), with the same noise."""
    from ase import units as ase_units

    model = random_model("schnet", seed=6)
    systems = _systems()
    temperature, timestep, friction = 400.0, 0.5, 0.05
    md = BatchedMD(
        model,
        systems,
        ensemble="langevin",
        temperature_K=temperature,
        timestep_fs=timestep,
        friction=friction,
        seed=3,
        dtype="float64",
    )
    x, p = md.positions.numpy().copy(), md.momenta.numpy().copy()
    m, force = md.masses.numpy().copy(), md.forces.numpy().copy()
    generator = torch.Generator().set_state(md.generator.get_state())
    xi = torch.randn(p.shape, generator=generator, dtype=torch.float64).numpy()
    md.step()

    dt = timestep * ase_units.fs
    c1 = np.exp(-friction * timestep)  # gamma in 1/fs times the step in fs
    p = p + 0.5 * dt * force  # B
    x = x + 0.5 * dt * p / m  # A
    p = c1 * p + np.sqrt((1 - c1**2) * m * ase_units.kB * temperature) * xi  # O
    for a, b in zip(md.offsets[:-1], md.offsets[1:]):  # zero momentum per trajectory
        p[a:b] -= m[a:b] * p[a:b].sum(0) / m[a:b].sum()
    x = x + 0.5 * dt * p / m  # A
    new_force = np.concatenate(
        [
            Calculator(model, dtype="float64").get_forces(_with_positions(atoms, x[a:b]))
            for atoms, a, b in zip(systems, md.offsets[:-1], md.offsets[1:])
        ]
    )
    p = p + 0.5 * dt * new_force  # B
    np.testing.assert_allclose(md.positions.numpy(), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(md.forces.numpy(), new_force, rtol=0, atol=1e-10)
    np.testing.assert_allclose(md.momenta.numpy(), p, rtol=0, atol=1e-12)
    assert md.nsteps == 1


def _with_positions(atoms, positions):
    atoms = atoms.copy()
    atoms.positions = positions
    return atoms


def test_temperatures_and_kinetic_energies_written_out():
    from ase import units as ase_units

    md = BatchedMD(random_model("schnet", seed=1), _systems(), temperature_K=300, dtype="float64")
    p, m = md.momenta.numpy(), md.masses.numpy()
    for k, (a, b) in enumerate(zip(md.offsets[:-1], md.offsets[1:])):
        ekin = float((p[a:b] ** 2 / (2 * m[a:b])).sum())
        assert float(md.kinetic_energies()[k]) == pytest.approx(ekin, rel=1e-12)
        n_dof = 3 * (b - a) - 6  # NVE from drawn velocities: no rotation (none linear here)
        assert float(md.temperatures()[k]) == pytest.approx(
            2 * ekin / (n_dof * ase_units.kB), rel=1e-12
        )


@pytest.mark.parametrize("ensemble", ["nve", "langevin"])
def test_starting_temperature_and_its_degrees_of_freedom_are_the_serial_runs(ensemble):
    """Each trajectory starts at exactly the asked temperature, counted over the degrees of
    freedom a single run counts (NVE from drawn velocities: no momentum, no angular
    momentum, 3n - 6, 3n - 5 for linear CO2; Langevin: 3n - 3), and the batched run's
    temperatures are run_md's for the same atoms (it had started NVE runs at ~335 K as 3n - 3
    counts them, 383 K as 3n - 6 does)."""
    from ase.build import molecule

    from atomlens.md import degrees_of_freedom, run_md

    model = random_model("schnet", seed=1)
    systems = [*_systems(), molecule("CO2")]
    md = BatchedMD(
        model, systems, temperature_K=300, dtype="float64", ensemble=ensemble, friction=0.01
    )
    nve = ensemble == "nve"
    expected = [3 * len(a) - (5 if a.get_chemical_formula() == "CO2" else 6) for a in systems]
    expected = expected if nve else [3 * len(a) - 3 for a in systems]
    assert md.n_dof.tolist() == expected
    torch.testing.assert_close(md.temperatures(), torch.full((5,), 300.0, dtype=torch.float64))
    for k in range(md.n_structures):
        atoms = md.atoms(k)
        if nve:
            assert np.abs(atoms.get_angular_momentum()).max() < 1e-10
        assert kinetic_temperature(atoms, degrees_of_freedom(atoms, nve)) == pytest.approx(300)
    serial = run_md(
        model,
        systems[0].copy(),
        steps=0,
        temperature_K=300,
        ensemble=ensemble,
        seed=0,
        dtype="float64",
    )
    assert serial.temperature[0] == pytest.approx(300)


def test_kinetic_temperature_matches_the_serial_definition():
    from atomlens.md import degrees_of_freedom

    model = random_model("schnet", seed=1)
    md = BatchedMD(model, _systems(), temperature_K=300, dtype="float64")
    md.run(5)
    for k in range(md.n_structures):
        atoms = md.atoms(k)
        assert float(md.temperatures()[k]) == pytest.approx(
            kinetic_temperature(atoms, degrees_of_freedom(atoms, True)), rel=1e-12
        )


def test_fixed_shapes_equal_the_eager_path(monkeypatch):
    """All intra-molecular pairs (benzene's reach past the 5 A cutoff) traced by dynamo."""
    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")  # tracing without codegen
    model = random_model("schnet", seed=2)
    systems = _systems()
    eager = BatchedMD(model, systems, dtype="float64", seed=3)
    fixed = BatchedMD(model, systems, dtype="float64", seed=3, compile=True)
    eager.run(5)
    fixed.run(5)
    torch.testing.assert_close(fixed.positions, eager.positions, rtol=0, atol=1e-10)
    torch.testing.assert_close(fixed.forces, eager.forces, rtol=0, atol=1e-9)


def test_compiled_verlet_list_equals_the_eager_path(monkeypatch, caplog):
    """The compiled path's padded Verlet list: fewer pairs than all intra-molecular ones (C60
    spans 7 A, the cutoff is 5 A), rebuilt when atoms move skin / 2, grown (and compiled
    again) when outgrown, and the same trajectories as the eager path throughout."""
    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(batched_md, "PAIR_CAPACITY_HEADROOM", 1.0)  # outgrown at once
    monkeypatch.setattr(calculator, "PAIR_CAPACITY_STEP", 1)
    model = random_model("schnet", seed=2)
    systems = [molecule("C60"), molecule("CH3CH2OH")]
    for k, atoms in enumerate(systems):
        atoms.rattle(0.05, seed=k)
    options = {
        "dtype": "float64",
        "seed": 3,
        "temperature_K": 3000.0,
        "timestep_fs": 1.0,
        "skin": 0.05,
    }
    eager = BatchedMD(model, systems, compile=False, **options)
    with caplog.at_level("INFO", logger="atomlens"):
        fixed = BatchedMD(model, systems, compile=True, **options)
        eager.run(40)
        fixed.run(40)
    torch.testing.assert_close(fixed.positions, eager.positions, rtol=0, atol=1e-9)
    torch.testing.assert_close(fixed.forces, eager.forces, rtol=0, atol=1e-8)
    torch.testing.assert_close(fixed.energies, eager.energies, rtol=0, atol=1e-9)
    n_all = 60 * 59 // 2 + 9 * 8 // 2
    i, _, shifts = fixed._padded
    assert len(i) == fixed._capacity < n_all  # C60's far pairs are not listed
    assert fixed.pair_builds > 3  # atoms moved skin / 2 several times
    listed = int((shifts == 0).all(1).sum())  # the others are padding, 50 A away
    assert 0 < listed < len(i)  # listed pairs, and padding after them
    assert torch.all(shifts[listed:, 0] == batched_md.PADDING_DISTANCE * model.cutoff)
    assert torch.all(shifts[:listed] == 0)
    a, b = i[:listed], fixed._padded[1][:listed]
    d = (fixed.positions[a] - fixed.positions[b]).norm(dim=1)
    beyond = (d > model.cutoff) & (d < model.cutoff + fixed.skin)
    assert beyond.any()  # pairs in the skin are listed and weigh exactly nothing
    assert "compiling again" in caplog.text  # the list outgrew its first capacity


def test_an_ensemble_follows_the_ensemble_calculator_with_its_spread(tmp_path):
    """An ensemble (two SchNets of different cutoffs and a DTNN, passed as an ensemble folder)
    integrates the members' mean force: 20 NVE steps equal ASE's VelocityVerlet with
    atomlens.EnsembleCalculator, trajectory by trajectory, with the same spread."""
    import json

    from ase.md.verlet import VelocityVerlet

    from atomlens.ensemble import EnsembleCalculator
    from atomlens.models import save_model

    members = [
        random_model("schnet", seed=1),
        random_model("schnet", seed=2, representation_kwargs={"cutoff": 4.0}),
        random_model("dtnn", seed=3),
    ]
    folder = tmp_path / "ens"
    for k, member in enumerate(members):
        save_model(member, folder / f"m{k}")
    (folder / "ensemble.json").write_text(json.dumps({"members": ["m0", "m1", "m2"]}))
    systems = [molecule("CH3CH2OH"), molecule("C6H6")]
    md = BatchedMD(folder, systems, dtype="float64", seed=4, compile=False)
    assert len(md.models) == 3 and md.cutoff == 6.0  # the DTNN's, the largest
    starts = [md.atoms(k) for k in range(len(systems))]
    logs = md.run(20, interval=20)
    for k, atoms in enumerate(starts):
        atoms.calc = EnsembleCalculator(members, dtype="float64", compile=False)
        VelocityVerlet(atoms, 0.5 * units_fs()).run(20)
        ours = md.atoms(k)
        np.testing.assert_allclose(ours.positions, atoms.positions, rtol=0, atol=1e-10)
        np.testing.assert_allclose(ours.get_momenta(), atoms.get_momenta(), rtol=0, atol=1e-10)
        assert ours.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        results = atoms.calc.results
        assert logs[k].energy_std[-1] == pytest.approx(results["energy_std"], rel=1e-9)
        assert logs[k].max_force_std[-1] == pytest.approx(results["max_force_std"], rel=1e-9)
    fourth = random_model("schnet", seed=5)
    mixed = BatchedMD([folder, fourth], systems, dtype="float64", compile=False)
    assert len(mixed.models) == 4  # an ensemble folder in a list: its members
    # a member counted twice: by path, as an object, or as a folder and the model saved there
    for twice in ([folder, folder / "m0"], [members[0], members[0]], [folder, members[0]]):
        with pytest.raises(ValueError, match="given twice"):
            BatchedMD(twice, systems, compile=False)
    single = BatchedMD(members[0], systems, dtype="float64", seed=4, compile=False)
    assert single.energy_std is None and not single.run(1)[0].energy_std


def test_an_ensemble_compiled_equals_its_eager_path(monkeypatch):
    """The compiled ensemble (every member in one traced function, on the padded Verlet
    list of the largest cutoff) gives the eager ensemble's trajectories and spread."""
    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")
    members = [
        random_model("schnet", seed=1),
        random_model("schnet", seed=2, representation_kwargs={"cutoff": 4.0}),
    ]
    systems = [molecule("C60"), molecule("CH3CH2OH")]
    eager = BatchedMD(members, systems, dtype="float64", seed=3, compile=False)
    fixed = BatchedMD(members, systems, dtype="float64", seed=3, compile=True)
    assert fixed.compiled is not None and fixed._listed
    eager.run(10)
    fixed.run(10)
    torch.testing.assert_close(fixed.positions, eager.positions, rtol=0, atol=1e-10)
    torch.testing.assert_close(fixed.forces, eager.forces, rtol=0, atol=1e-9)
    torch.testing.assert_close(fixed.energy_std, eager.energy_std, rtol=0, atol=1e-9)
    torch.testing.assert_close(fixed.max_force_std, eager.max_force_std, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="different things"):
        BatchedMD([members[0], random_model("schnet", target="U0")], systems)


def test_compiled_all_pairs_without_a_cutoff(monkeypatch):
    """A model without a cutoff keeps every intra-molecular pair on the compiled path."""
    from helpers import SMALL_MODELS

    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")
    kwargs = {**SMALL_MODELS["schnet"], "cutoff": None}
    model = random_model("schnet", seed=2, representation_kwargs=kwargs)
    systems = _systems()
    eager = BatchedMD(model, systems, dtype="float64", seed=3, compile=False)
    fixed = BatchedMD(model, systems, dtype="float64", seed=3, compile=True)
    assert fixed.compiled is not None and fixed._padded is None  # no Verlet list
    eager.run(5)
    fixed.run(5)
    torch.testing.assert_close(fixed.positions, eager.positions, rtol=0, atol=1e-10)
    torch.testing.assert_close(fixed.forces, eager.forces, rtol=0, atol=1e-9)


def test_a_failed_later_compile_falls_back_to_eager(monkeypatch):
    """compile="auto": a compile that fails mid-run (the pair list outgrew its capacity)
    warns and goes on eagerly from there; compile=True raises."""
    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")
    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    model = random_model("schnet", seed=2)
    systems = [molecule("C60")]
    eager = BatchedMD(model, systems, dtype="float64", seed=3, compile=False)
    auto = BatchedMD(model, systems, dtype="float64", seed=3)
    assert auto.compiled is not None

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    auto.compiled = broken
    with pytest.warns(UserWarning, match="running the eager model from step 0"):
        auto.run(3)
    assert auto.compiled is None
    eager.run(3)
    torch.testing.assert_close(auto.positions, eager.positions, rtol=0, atol=1e-10)
    strict = BatchedMD(model, systems, dtype="float64", seed=3, compile=True)
    strict.compiled = broken
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        strict.run(1)


def test_bad_skin_is_refused():
    with pytest.raises(ValueError, match="skin must be a finite number >= 0"):
        BatchedMD(random_model("schnet"), [molecule("H2O")], skin=float("nan"))


def test_auto_compile_by_default_with_a_fallback(monkeypatch, caplog):
    """compile="auto" (the default) compiles molecules of up to 64 atoms and says so,
    runs a larger one (or ATOMLENS_COMPILE=0) eagerly, and falls back to the eager path with
    a warning when compiling fails; compile=True then raises."""
    import logging

    monkeypatch.setattr(batched_md, "COMPILE_BACKEND", "eager")  # tracing without codegen
    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    model = random_model("schnet", seed=2)
    systems = _systems()
    eager = BatchedMD(model, systems, dtype="float64", seed=3, compile=False)
    with caplog.at_level(logging.INFO, logger="atomlens"):
        auto = BatchedMD(model, systems, dtype="float64", seed=3)
    assert auto.compiled is not None
    assert "compiling energy and forces for 4 trajectories (33 atoms" in caplog.text
    torch.testing.assert_close(auto.forces, eager.forces, rtol=0, atol=1e-9)

    large = molecule("C60")  # 60 atoms: compiled; 65: eager
    assert BatchedMD(model, [large], seed=3).compiled is not None
    larger = large + molecule("CH4")
    larger.positions[60:] += 20.0
    assert BatchedMD(model, [larger], seed=3).compiled is None
    monkeypatch.setenv("ATOMLENS_COMPILE", "0")
    assert BatchedMD(model, systems, seed=3).compiled is None
    monkeypatch.setenv("ATOMLENS_COMPILE", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="compiling failed"):
        fallback = BatchedMD(model, systems, dtype="float64", seed=3)
    assert fallback.compiled is None
    torch.testing.assert_close(fallback.forces, eager.forces, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        BatchedMD(model, systems, dtype="float64", seed=3, compile=True)


def test_reduce_overhead_mode_runs_on_the_cpu(capfd, caplog):
    """The CUDA-graph mode's code path, compiled by Inductor without graphs on the CPU: the
    eager forces, and no torch warning that it skipped them (atomlens says it, at info)."""
    model = random_model("schnet", seed=2)
    systems = [molecule("H2O"), molecule("NH3")]
    eager = BatchedMD(model, systems, dtype="float64", seed=3)
    with caplog.at_level(logging.INFO, logger="atomlens"):
        compiled = BatchedMD(model, systems, dtype="float64", seed=3, compile="reduce-overhead")
        eager.run(2)
        compiled.run(2)
    torch.testing.assert_close(compiled.forces, eager.forces, rtol=0, atol=1e-9)
    assert "cudagraphs" not in capfd.readouterr().err
    assert "no CUDA graphs on the CPU" in caplog.text


def test_outputs_one_trajectory_and_log_per_run(tmp_path):
    model = random_model("schnet", seed=2)
    systems = _systems()[:2]
    trajectories = [tmp_path / "a.traj", tmp_path / "b.xyz"]
    logfiles = [tmp_path / "a.csv", tmp_path / "b.csv"]
    md = BatchedMD(model, systems, ensemble="langevin")
    logs = md.run(6, trajectories=trajectories, logfiles=logfiles, interval=3)
    final = md.forces.numpy()
    for k, (traj, logfile) in enumerate(zip(trajectories, logfiles)):
        frames = read(traj, index=":")
        assert len(frames) == 3 and len(frames[0]) == len(systems[k])
        assert frames[-1].get_potential_energy() == pytest.approx(logs[k].epot[-1], rel=1e-6)
        a, b = md.offsets[k : k + 2]
        np.testing.assert_allclose(frames[-1].get_forces(), final[a:b], rtol=0, atol=1e-5)
        rows = list(csv.DictReader(logfile.open()))
        assert [float(r["time_fs"]) for r in rows] == [0.0, 1.5, 3.0]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_run_batched_md_passes_its_settings():
    model = random_model("schnet", seed=2)
    logs = run_batched_md(model, _systems()[:2], steps=4, interval=2, timestep_fs=0.25)
    assert [len(log.time_fs) for log in logs] == [3, 3]
    assert logs[0].time_fs == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("compile", [False, True])
def test_a_blown_up_trajectory_is_named(tmp_path, compile):
    """Non-finite positions stop the run with the trajectory's number, eagerly and on the
    compiled path (whose kernels do not bounds-check rows: NaN never reaches them); what
    was written is kept as NAME.unstable.SUFFIX, as single-trajectory MD does."""
    model = random_model("schnet", seed=2)
    md = BatchedMD(model, [molecule("H2O"), molecule("NH3")], dtype="float64", compile=compile)
    md.run(2)
    md.positions[4, 0] = float("nan")  # an atom of the second trajectory (NH3)
    with pytest.raises(MDUnstableError, match=r"trajectories \[1\] are not finite at step 2"):
        md.run(1)
    md.positions[4, 0] = 0.3
    md.run(1)  # finite again: runs on
    outputs = [tmp_path / "a.traj", tmp_path / "b.xyz", tmp_path / "a.csv", tmp_path / "b.csv"]
    md.positions[4, 0] = float("inf")
    with pytest.raises(MDUnstableError, match=r"the run up to the stop is in .*a\.unstable\.traj"):
        md.run(3, trajectories=outputs[:2], logfiles=outputs[2:])
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["a.unstable.csv", "a.unstable.traj", "b.unstable.csv", "b.unstable.xyz"]
    assert len(read(tmp_path / "a.unstable.traj", index=":")) == 1  # the step-0 frame


def test_too_hot_or_drifting_trajectories_stop_the_run_as_single_md_does(tmp_path, capsys):
    """--max-temperature and (NVE) --max-drift stop several trajectories at once too (they
    were ignored: a replica reached 381 K under a 320 K limit and the run exited 0), naming
    them, with the outputs kept as NAME.unstable.SUFFIX; Langevin has no drift check."""
    from atomlens.cli import main
    from atomlens.models import save_model

    model = random_model("schnet", seed=2)
    systems = [molecule("H2O"), molecule("NH3")]
    md = BatchedMD(model, systems, dtype="float64", seed=3, temperature_K=300)
    with pytest.raises(MDUnstableError, match=r"trajectories \[0, 1\] exceed the temperature "):
        md.run(5, max_temperature_K=100.0)
    md = BatchedMD(model, systems, dtype="float64", seed=3, temperature_K=300)
    with pytest.raises(MDUnstableError, match=r"drifted beyond the limit of 1e-12 eV/atom"):
        md.run(5, max_drift_eV_per_atom=1e-12)
    langevin = BatchedMD(model, systems, ensemble="langevin", dtype="float64", seed=3)
    langevin.run(5, max_drift_eV_per_atom=1e-12)  # no conserved energy: not checked
    assert BatchedMD(model, systems, seed=3).run(5)  # the defaults: a stable run goes on

    folder = save_model(random_model("schnet", seed=2).float(), tmp_path / "model")
    structure = tmp_path / "w.xyz"
    systems[0].write(structure)
    argv = ["md", str(folder), str(structure), "--replicas", "2", "--steps", "6"]
    argv += ["--interval", "2", "--out", str(tmp_path / "md.traj"), "--no-compile"]
    assert main([*argv, "--max-temperature", "100"]) == 2
    assert "exceed the temperature limit of 100 K" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("md*")) == [
        "md.0.unstable.csv",
        "md.0.unstable.traj",
        "md.1.unstable.csv",
        "md.1.unstable.traj",
    ]
    assert main([*argv, "--out", str(tmp_path / "x.csv")]) == 2  # logs = trajectories
    assert "the logs and the trajectories would be the same files" in capsys.readouterr().err
    assert main([*argv, "--ensemble", "langevin"]) == 0
    printed = capsys.readouterr().out
    assert "+-" in printed and "E_tot drift" not in printed  # Langevin: T +- its spread


def test_md_of_a_file_of_several_frames_says_it_runs_the_first(tmp_path, capsys):
    """``--index 0`` is the default: a file of several molecules ran its first alone, without
    a word; it says so and how to run them all (one frame: nothing said)."""
    from ase.io import write

    from atomlens.cli import main
    from atomlens.models import save_model

    folder = save_model(random_model("schnet", seed=4).float(), tmp_path / "model")
    write(tmp_path / "three.xyz", [molecule("H2O"), molecule("NH3"), molecule("CH4")])
    molecule("H2O").write(tmp_path / "one.xyz")
    argv = ["md", str(folder), "--steps", "2", "--no-compile"]
    assert main([*argv, str(tmp_path / "three.xyz"), "--out", str(tmp_path / "a.traj")]) == 0
    assert "running its first frame (--index 0, the default)" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "one.xyz"), "--out", str(tmp_path / "b.traj")]) == 0
    assert "first frame" not in capsys.readouterr().err
    every = [*argv, str(tmp_path / "three.xyz"), "--index", ":", "--out", str(tmp_path / "c.traj")]
    assert main(every) == 0
    assert "3 trajectories" in capsys.readouterr().out
    fewer = [*argv, str(tmp_path / "three.xyz"), "--index", ":2", "--out", str(tmp_path / "c.traj")]
    assert main(fewer) == 0  # the third trajectory's files of the run before stay: said so
    assert "2 file(s) of an earlier run with more trajectories" in capsys.readouterr().err


def test_elements_beyond_the_model_are_refused():
    """Z > max_z would be an unchecked gather in the compiled step: refused up front."""
    from ase import Atoms

    from atomlens.data.dataset import DataError

    model = random_model("schnet")
    heavy = Atoms(numbers=[model.config.max_z + 1, 1], positions=[[0, 0, 0], [1.6, 0, 0]])
    with pytest.raises(DataError, match="beyond the model's max_z"):
        BatchedMD(model, [molecule("H2O"), heavy])
    model.metadata = {"elements": [1, 6, 8]}  # as a trained model records them
    with pytest.raises(DataError, match=r"BatchedMD: element\(s\) N never seen in training"):
        BatchedMD(model, [molecule("H2O"), molecule("NH3")], compile=False)
    with pytest.warns(UserWarning, match="never seen in training"):
        BatchedMD(model, [molecule("NH3")], compile=False, allow_unknown_elements=True)


def test_bad_input_is_named():
    model = random_model("schnet")
    with pytest.raises(ValueError, match="ensemble"):
        BatchedMD(model, _systems(), ensemble="npt")
    periodic = molecule("H2O")
    periodic.pbc = True
    with pytest.raises(Exception, match="structure 0.*periodic"):
        BatchedMD(model, [periodic])
    with pytest.raises(ValueError, match="1 files for 4 trajectories"):
        BatchedMD(model, _systems()).run(1, logfiles=["x.csv"])


def test_md_command_with_replicas(tmp_path, capsys):
    from atomlens.cli import main
    from atomlens.models import save_model

    save_model(random_model("schnet", seed=4).float(), tmp_path / "model")
    molecule("CH3CH2OH").write(tmp_path / "ethanol.xyz")
    code = main(
        [
            "md",
            str(tmp_path / "model"),
            str(tmp_path / "ethanol.xyz"),
            "--steps",
            "4",
            "--interval",
            "2",
            "--replicas",
            "3",
            "--ensemble",
            "langevin",
            "--out",
            str(tmp_path / "md.traj"),
            "--log",
            str(tmp_path / "md.csv"),
        ]
    )
    assert code == 0
    assert "3 trajectories" in capsys.readouterr().out
    finals = [read(tmp_path / f"md.{k}.traj", index=-1) for k in range(3)]
    assert all(len((tmp_path / f"md.{k}.csv").read_text().splitlines()) == 4 for k in range(3))
    # replicas start alike and part: different velocities, different paths
    assert np.abs(finals[0].positions - finals[1].positions).max() > 1e-4
    assert (
        main(["md", str(tmp_path / "model"), str(tmp_path / "ethanol.xyz"), "--replicas", "0"]) == 2
    )
    capsys.readouterr()
    # an option the ensemble does not read is an error, not silently ignored
    for extra in (["--friction", "0.02"], ["--ensemble", "langevin", "--pressure", "5"]):
        assert main(["md", str(tmp_path / "model"), str(tmp_path / "ethanol.xyz"), *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    hint = ": drop it or change the ensemble"
    assert err == [
        f"atomlens md: error: --friction applies to --ensemble langevin, not nve{hint}",
        f"atomlens md: error: --pressure applies to --ensemble npt, not langevin{hint}",
    ]


def test_predict_in_chunks_equals_one_call():
    from atomlens.models.inference import predict_in_chunks

    model = random_model("schnet", seed=1)
    frames = _systems() + _systems()[:3]
    whole = model.predict(frames, forces=True)
    chunked = predict_in_chunks(model.predict, frames, chunk=3, forces=True)
    assert set(chunked) == set(whole)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="--chunk"):
        predict_in_chunks(model.predict, frames, chunk=0)


def test_compiled_step_calls_the_cpp_convolution_and_equals_plain_pytorch():
    """The compiled energy-and-forces step calls the hand-written tabulated convolution and
    its backward as operators (Inductor's code between them), and gives the forces of the
    plain PyTorch formulas (fused kernels off, no compile)."""
    from atomlens.nn import kernels

    model = random_model("schnet", seed=2)
    systems = _systems()
    kernels.set_fused(False)
    try:
        plain = BatchedMD(model, systems, dtype="float64", seed=3, compile=False)
    finally:
        kernels.set_fused(True)
    fixed = BatchedMD(model, systems, dtype="float64", seed=3, compile=True)
    with torch.profiler.profile() as profile:
        energies, forces = fixed.energy_and_forces()
    called = {event.key for event in profile.key_averages()}
    assert {"atomlens::tabulated_cfconv", "atomlens::tabulated_cfconv_backward"} <= called
    torch.testing.assert_close(forces, plain.forces, rtol=0, atol=1e-10)
    torch.testing.assert_close(energies, plain.energies, rtol=1e-12, atol=1e-10)


def test_isotopes_reach_the_outputs_as_integrated(tmp_path):
    """Masses of the start structures (D2O) drive the integrator and reach every output:
    ``atoms(k)`` and the trajectory frames carry them, so their kinetic energy is the run's
    (with the elements' default masses a frame paired D momenta with H masses)."""
    model = random_model("schnet", seed=2)
    heavy = molecule("H2O")
    heavy.set_masses([16.0, 2.014, 2.014])
    md = BatchedMD(model, [heavy, molecule("H2O")], dtype="float64", compile=False)
    md.run(3, trajectories=[tmp_path / "d2o.traj", tmp_path / "d2o_b.xyz"])
    np.testing.assert_allclose(md.atoms(0).get_masses(), [16.0, 2.014, 2.014])
    kinetic = md.kinetic_energies().numpy()
    for k, path in enumerate((tmp_path / "d2o.traj", tmp_path / "d2o_b.xyz")):
        frame = read(path, index=-1)
        assert frame.get_kinetic_energy() == pytest.approx(kinetic[k], rel=1e-6)  # (files)
        assert md.atoms(k).get_kinetic_energy() == pytest.approx(kinetic[k], rel=1e-12)


def test_constraints_other_than_fixcom_are_refused():
    """Batched MD integrates free atoms: a structure with FixAtoms is refused with what to
    do instead (it had moved the fixed atoms); FixCom, which its integrators honour, not."""
    from ase.constraints import FixAtoms, FixCom

    from atomlens.data.dataset import DataError

    model = random_model("schnet", seed=2)
    held = molecule("CH3CH2OH")
    held.set_constraint(FixAtoms(indices=[0, 1]))
    with pytest.raises(DataError, match=r"structure 1 carries constraints \(FixAtoms\).*run_md"):
        BatchedMD(model, [molecule("H2O"), held], compile=False)
    centred = molecule("CH3CH2OH")
    centred.set_constraint(FixCom())
    BatchedMD(model, [centred], ensemble="langevin", compile=False).run(2)


@pytest.mark.parametrize("ensemble", ["nve", "langevin"])
def test_an_interrupted_step_leaves_the_state_as_before_it(monkeypatch, ensemble):
    """A Ctrl-C during a step's model call restores the positions, momenta and (Langevin)
    the noise generator: running on gives the uninterrupted run to the last bit (a half
    step had stayed: 0.02 Angstrom off after 20 more steps)."""
    model = random_model("schnet", seed=2)
    runs = [BatchedMD(model, _systems()[:2], ensemble=ensemble, compile=False) for _ in range(2)]
    for md in runs:
        md.run(5)
    interrupted = runs[1]
    before = (interrupted.positions.clone(), interrupted.momenta.clone())
    original = interrupted.energy_and_forces

    def stopped():
        raise KeyboardInterrupt

    monkeypatch.setattr(interrupted, "energy_and_forces", stopped)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(3)
    monkeypatch.setattr(interrupted, "energy_and_forces", original)
    assert interrupted.nsteps == 5
    assert torch.equal(interrupted.positions, before[0])
    assert torch.equal(interrupted.momenta, before[1])
    for md in runs:
        md.run(10)
    assert torch.equal(runs[0].positions, runs[1].positions)
    assert torch.equal(runs[0].momenta, runs[1].momenta)


def test_extxyz_trajectories_state_their_units_and_outputs_are_distinct(tmp_path):
    """Batched extxyz trajectories say eV and Angstrom, as single MD's do, so they read back
    as data; one file named for two outputs is refused before anything is written."""
    from atomlens.data.sources.ase_files import read_ase

    model = random_model("schnet", seed=2)
    md = BatchedMD(model, _systems()[:2], compile=False)
    paths = [tmp_path / "a.xyz", tmp_path / "b.xyz"]
    md.run(2, trajectories=paths)
    assert len(read_ase(paths[0])) == 3
    with pytest.raises(ValueError, match=r"one file for two outputs: .*a\.xyz"):
        md.run(1, trajectories=[paths[0], paths[0]])
    with pytest.raises(ValueError, match="one file for two outputs"):
        md.run(1, trajectories=paths, logfiles=[paths[1], tmp_path / "c.csv"])
    assert md.nsteps == 2


def test_a_gpu_that_torch_does_not_see_is_a_clear_error(tmp_path, monkeypatch):
    """device="cuda" where torch sees no GPU: atomlens's one-line ValueError from the
    calculator, batched MD and load_model (torch's was an AssertionError at the transfer)."""
    import atomlens
    from atomlens.models.io import load_model, save_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = random_model("schnet")
    folder = save_model(model, tmp_path / "m")
    for make in (
        lambda: atomlens.Calculator(model, device="cuda"),
        lambda: BatchedMD(model, [molecule("H2O")], device="cuda:0"),
        lambda: load_model(folder, device="cuda"),
    ):
        with pytest.raises(ValueError, match="sees no CUDA GPU here"):
            make()
    with pytest.raises(ValueError, match="atomlens runs on 'cpu' or 'cuda"):
        atomlens.Calculator(model, device="gpu")
