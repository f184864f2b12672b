"""Periodic cells end to end: data with cells and stress -> training -> calculator -> MD, relax.

The reference is ASE's EMT potential for copper (a real many-body potential with energies,
forces and stress for periodic cells, fast enough for a test). A small SchNet is trained on
energies, forces and stress of strained, rattled fcc cells through the command line, then
used for a cell relaxation, NVE dynamics (energy conservation across Verlet-list rebuilds)
and NPT dynamics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.filters import FrechetCellFilter
from ase.io import read, write
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import atomlens
from atomlens.cli import main
from atomlens.data.sources import read_any
from atomlens.md import draw_momenta, run_md


def copper_frames(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=rng.uniform(3.50, 3.72), cubic=True)
        strain = np.eye(3) + rng.normal(scale=0.015, size=(3, 3))
        atoms.set_cell(atoms.cell.array @ (strain + strain.T) / 2, scale_atoms=True)
        atoms.rattle(0.06, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        results = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def copper(tmp_path_factory):
    """(folder, model) trained by ``atomlens train`` on EMT copper with forces and stress."""
    folder = tmp_path_factory.mktemp("copper")
    write(folder / "cu.extxyz", copper_frames(80), format="extxyz")
    config = {
        "data": str(folder / "cu.extxyz"),
        "target": "energy",
        "energy_unit": "eV",
        "length_unit": "Angstrom",
        "forces": True,
        "rho": 0.1,
        "stress": True,
        "stress_weight": 100.0,
        "n_train": 64,
        "n_val": 8,
        "n_test": 8,
        "batch_size": 8,
        "lr": 5e-3,
        "lr_patience": 5,
        "max_epochs": 40,
        "threads": 1,
        "progress": False,
        "out": str(folder / "run"),
        "model": {
            "representation": "schnet",
            "head_hidden": 16,
            "representation_kwargs": {
                "n_atom_basis": 24,
                "n_interactions": 2,
                "n_filters": 24,
                "n_rbf": 16,
                "cutoff": 4.0,
            },
        },
    }
    (folder / "cu.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(folder / "cu.yaml")]) == 0
    return folder, atomlens.load_model(folder / "run", dtype=torch.float64)


def test_extxyz_cells_and_stress_are_read(tmp_path):
    frames = copper_frames(3)
    write(tmp_path / "cu.extxyz", frames, format="extxyz")
    data = read_any(tmp_path / "cu.extxyz", energy_unit="eV", length_unit="Angstrom")
    assert data.units["stress"] == "eV/Angstrom^3"
    assert data.per_atom == {"forces"}
    np.testing.assert_allclose(data.cell, [f.cell.array for f in frames])
    np.testing.assert_allclose(data.targets["stress"][1], frames[1].get_stress(voigt=False))
    data.save(tmp_path / "packed")
    back = read_any(tmp_path / "packed")
    np.testing.assert_array_equal(back.pbc, data.pbc)
    assert back.per_atom == {"forces"}
    # one structure of single atoms is not mistaken for per-atom data
    assert not back.is_per_atom("energy")


def test_training_on_energies_forces_and_stress(copper):
    folder, model = copper
    metrics = yaml.safe_load((folder / "run" / "metrics.json").read_text())
    # EMT copper spans ~1 eV/atom of strain energy; a useful model is far below that
    assert metrics["energy_mae"] / 4 < 0.05
    assert metrics["stress_mae"] < 0.01  # eV/Angstrom^3 (1.6 GPa)
    frames = copper_frames(4, seed=9)
    out = model.predict(frames, forces=True, stress=True)
    reference = np.array([f.get_stress(voigt=False) for f in frames])
    baseline = np.abs(reference - reference.mean(0)).mean()
    assert np.abs(out["stress"] - reference).mean() < 0.5 * baseline
    assert model.metadata["periodic"] is True  # (export refuses it unless --molecules)


def test_cell_relaxation_converges(copper):
    _, model = copper
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = atomlens.Calculator(model)
    optimizer = BFGS(FrechetCellFilter(atoms), logfile=None)
    # the filter's cell "forces" are -V sigma / n_atoms: fmax 0.005 eV/Angstrom holds the
    # stress below 4 * 0.005 / 46 = 4.3e-4 eV/Angstrom^3 (0.07 GPa); fmax 0.01 allowed 0.14
    assert optimizer.run(fmax=0.005, steps=400)
    assert np.abs(atoms.get_stress()).max() < 0.01 / 160.2 * 10  # below 0.1 GPa
    assert 3.45 < atoms.cell.lengths()[0] < 3.75  # EMT's copper: 3.59 Angstrom


def test_nve_conserves_energy_across_verlet_list_rebuilds(copper):
    _, model = copper
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    calc = atomlens.Calculator(model, skin=0.15)
    atoms.calc = calc
    draw_momenta(atoms, 600, np.random.default_rng(0))
    Stationary(atoms)
    energies = []
    dyn = VelocityVerlet(atoms, 2.0 * units.fs)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=5)
    dyn.run(300)
    energies = np.asarray(energies)
    assert calc._neighbors.builds > 2  # the list was rebuilt during the run
    kinetic = atoms.get_kinetic_energy()
    assert np.abs(energies - energies[0]).max() < 0.02 * kinetic


def test_npt_dynamics_moves_the_volume_and_writes_it(copper, tmp_path):
    folder, _ = copper
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat((2, 2, 2))
    log = run_md(
        folder / "run",
        atoms,
        ensemble="npt",
        temperature_K=300,
        timestep_fs=2.0,
        steps=200,
        pressure_bar=0.0,
        barostat_time_fs=200.0,
        dtype="float64",
        logfile=tmp_path / "npt.csv",
        interval=10,
    )
    assert len(log.volume) == 21
    assert np.ptp(log.volume) > 0.05  # the barostat moved the cell
    assert 0.85 < log.volume[-1] / log.volume[0] < 1.15
    header = (tmp_path / "npt.csv").read_text().splitlines()[0]
    assert header.endswith("volume_A3")
    np.testing.assert_array_equal(log.arrays()["volume_A3"], log.volume)


def test_npt_refuses_molecules():
    from ase.build import molecule

    with pytest.raises(ValueError, match="periodic"):
        run_md(object(), molecule("H2O"), ensemble="npt", steps=1)


def test_cli_predict_stress_of_the_periodic_structures(copper, tmp_path, capsys):
    """``predict --stress``: the model's stress (Voigt, eV/Angstrom^3) printed and written
    under atomlens_stress for periodic structures, none for a molecule beside them; a file
    of molecules only is refused; an ensemble gives the members' mean and spread."""
    from ase.build import molecule
    from ase.stress import full_3x3_to_voigt_6_stress

    from atomlens.ensemble import predict_ensemble

    folder, model = copper
    frames = copper_frames(2, seed=7)
    water = molecule("H2O")
    write(tmp_path / "mixed.extxyz", [*frames, water])
    out = tmp_path / "pred.extxyz"
    argv = ["predict", str(folder / "run"), str(tmp_path / "mixed.extxyz")]
    assert main([*argv, "--stress", "--allow-unknown-elements", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("stress (eV/Angstrom^3, xx yy zz yz xz xy)") == 2
    written = read(out, ":")
    for atoms in frames:
        atoms.calc = None
    expected = model.predict(frames, stress=True)["stress"]
    for k in range(2):
        voigt = full_3x3_to_voigt_6_stress(expected[k])
        np.testing.assert_allclose(written[k].info["atomlens_stress"], voigt, atol=2e-6)
    assert "atomlens_stress" not in written[2].info  # the molecule: no cell, no stress
    write(tmp_path / "water.xyz", water)
    capsys.readouterr()
    assert main(["predict", str(folder / "run"), str(tmp_path / "water.xyz"), "--stress"]) == 2
    assert "none of the structures" in capsys.readouterr().err
    both = predict_ensemble([model, model], frames, stress=True)
    np.testing.assert_allclose(both["stress"], expected, rtol=1e-6)
    assert np.abs(both["stress_std"]).max() == 0.0


def test_cli_md_npt_and_predict_keep_the_cell(copper, tmp_path):
    folder, model = copper
    start = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    write(tmp_path / "start.extxyz", start)
    assert (
        main(
            [
                "md",
                str(folder / "run"),
                str(tmp_path / "start.extxyz"),
                "--ensemble",
                "npt",
                "--steps",
                "20",
                "--timestep",
                "2",
                "--temperature",
                "300",
                "--out",
                str(tmp_path / "npt.traj"),
                "--log",
                str(tmp_path / "npt.csv"),
            ]
        )
        == 0
    )
    frames = read(tmp_path / "npt.traj", ":")
    assert frames[-1].pbc.all() and frames[-1].get_volume() > 0
    # predict: the periodic cell is kept, so the energy is the bulk's, not a cluster's
    assert main(["predict", str(folder / "run"), str(tmp_path / "start.extxyz")]) == 0
    bulk_energy = model.predict(start)["energy"][0]
    cluster = start.copy()
    cluster.pbc = False
    assert abs(model.predict(cluster)["energy"][0] - bulk_energy) > 0.1


def test_apply_strain_deforms_positions_shifts_and_cell_alike():
    """r -> r (1 + eps), shifts and cell rows likewise, eps the symmetric part of the strain;
    the pair layout is kept."""
    from atomlens.data.batch import Pairs
    from atomlens.nn.geometry import apply_strain

    generator = torch.Generator().manual_seed(0)
    strain = 0.1 * torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    eps = 0.5 * (strain + strain.transpose(1, 2))
    positions = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    structure = torch.tensor([0, 0, 1, 1, 1])
    cell = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    shifts = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    pairs = Pairs(torch.tensor([0, 1, 2, 4]), torch.tensor([1, 0, 3, 2]), shifts, False)
    new_positions, new_pairs, new_cell = apply_strain(positions, pairs, cell, structure, strain)
    one = torch.eye(3, dtype=torch.float64)
    for a in range(5):
        expected = positions[a] @ (one + eps[structure[a]])
        assert torch.allclose(new_positions[a], expected)
    for p in range(4):
        expected = shifts[p] @ (one + eps[structure[pairs.i[p]]])
        assert torch.allclose(new_pairs.shifts[p], expected)
    assert torch.allclose(new_cell, cell @ (one + eps))
    assert new_pairs.symmetric is False and torch.equal(new_pairs.j, pairs.j)


def test_stress_of_a_batch_without_pbc_flags_follows_its_cell():
    """A Batch built by hand with cells but no pbc flags: a structure with a cell volume is
    periodic, and its stress is the one computed with the flags."""
    import dataclasses

    from helpers import random_model

    model = random_model("schnet")
    crystal = bulk("C", "diamond", a=3.57).repeat(2)
    crystal.rattle(0.05, seed=0)
    batch = model.batch_from_atoms([crystal])
    reference = model(batch, stress=True)["stress"]
    assert float(reference.abs().max()) > 1e-4
    bare = dataclasses.replace(batch, pbc=None)
    torch.testing.assert_close(model(bare, stress=True)["stress"], reference)


def test_an_ensemble_with_stress_reports_the_committees_stress(copper, tmp_path, capsys):
    """Two members trained on energies, forces and stress: ensemble.json and ``atomlens
    evaluate`` of the folder give the stress errors of the members' mean, computed here from
    the members' own stress predictions."""
    import json

    folder, _ = copper
    config = yaml.safe_load((folder / "cu.yaml").read_text())
    config.update(max_epochs=2, out=str(tmp_path / "ens"))
    (tmp_path / "ens.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "ens.yaml"), "--ensemble", "2"]) == 0
    committee = json.loads((tmp_path / "ens" / "ensemble.json").read_text())["committee"]
    members = [atomlens.load_model(tmp_path / "ens" / f"model_{k}") for k in (0, 1)]
    split = np.load(tmp_path / "ens" / "model_0" / "model" / "split.npz")
    frames = read(folder / "cu.extxyz", ":")
    test = [frames[i] for i in np.sort(split["test"])]
    predicted = np.stack([m.predict(test, stress=True)["stress"] for m in members])
    reference = np.stack([f.get_stress(voigt=False) for f in test])
    assert predicted.shape == (2, *reference.shape)
    atol = 1e-5  # float32 models, batched in another order
    np.testing.assert_allclose(
        committee["stress_mae"], np.abs(predicted.mean(0) - reference).mean(), atol=atol
    )
    np.testing.assert_allclose(
        committee["member_stress_mae"], np.abs(predicted - reference).mean((1, 2, 3)), atol=atol
    )
    np.testing.assert_allclose(committee["stress_spread_mean"], predicted.std(0).mean(), atol=atol)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ens"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(scored["stress_mae"], committee["stress_mae"], atol=atol)
    assert main(["evaluate", str(tmp_path / "ens")]) == 0
    assert "STRESS SPREAD" in capsys.readouterr().out


def _copper_model():
    from helpers import random_model

    model = random_model("schnet", seed=4)
    model.atomref[29] = -50.0
    return model


def test_a_cell_that_turns_nan_in_a_run_is_an_error_not_a_crash():
    """The cell is checked at every neighbour-list build, not only when a structure is first
    seen: a NaN or inf cell on a later call (a blown-up NPT step) reached vesin, which
    killed the process (SIGFPE); now DataError. Also the list builder itself."""
    from atomlens.data.dataset import DataError
    from atomlens.data.neighbors import periodic_pairs

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = atomlens.Calculator(
        _copper_model(), compile=False, dtype="float64", allow_unknown_elements=True
    )
    atoms.get_forces()
    for bad in (float("nan"), float("inf")):
        broken = atoms.cell.array.copy()
        broken[0, 0] = bad
        atoms.set_cell(broken)
        with pytest.raises(DataError, match=r"non-finite \(NaN/inf\)"):
            atoms.get_forces()
        with pytest.raises(DataError, match=r"non-finite \(NaN/inf\)"):
            periodic_pairs(atoms.positions, broken, np.ones(3, bool), 5.0)


def test_the_eager_fallback_builds_the_pairs_of_each_new_structure(monkeypatch):
    """compile="auto" whose compiled function fails at its first call (no C++ compiler,
    an Inductor error) falls back to eager code, which had kept the previous structure's
    pairs for the next structure (Si8 after Si2: six atoms without neighbours)."""
    import warnings

    from atomlens import calculator

    def failing(function, device, mode=None):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(calculator, "compile_fixed_shapes", failing)
    monkeypatch.setattr(calculator, "auto_compile_enabled", lambda: True)
    model = _copper_model()
    calc = atomlens.Calculator(model, dtype="float64", allow_unknown_elements=True)
    eager = atomlens.Calculator(model, dtype="float64", compile=False, allow_unknown_elements=True)
    second = bulk("Cu", "fcc", a=3.6, cubic=True)
    second.rattle(0.05, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for atoms in (bulk("Cu", "fcc", a=3.6), second):
            ours, reference = atoms.copy(), atoms.copy()
            ours.calc, reference.calc = calc, eager
            assert ours.get_potential_energy() == pytest.approx(
                reference.get_potential_energy(), abs=1e-10
            )
            np.testing.assert_allclose(ours.get_forces(), reference.get_forces(), atol=1e-10)


def test_slabs_with_a_zero_vector_along_their_open_direction():
    """ASE's slabs, sheets and tubes leave the cell vector of a direction that is not
    periodic zero: they are accepted (they were refused as cells without volume) and give
    the energy of the same slab with vacuum in its cell; a stress of such a cell, per
    volume, is refused with what to do; periodic vectors that span nothing still are."""
    from ase.build import fcc111

    from atomlens.data.dataset import DataError, dataset_from_atoms

    model = _copper_model().double()
    slab = fcc111("Cu", (2, 2, 3))
    assert not slab.cell.array[2].any() and slab.pbc.tolist() == [True, True, False]
    vacuum = slab.copy()
    vacuum.cell[2] = [0.0, 0.0, 30.0]
    energies = []
    for atoms in (slab, vacuum):
        atoms.calc = atomlens.Calculator(model, compile=False, allow_unknown_elements=True)
        energies.append(atoms.get_potential_energy())
    assert energies[0] == pytest.approx(energies[1], abs=1e-10)
    with pytest.raises(DataError, match="its cell has no volume"):
        model.predict(slab, stress=True, allow_unknown_elements=True)
    labelled = slab.copy()
    labelled.calc = SinglePointCalculator(
        labelled, energy=-1.0, forces=np.zeros((len(slab), 3)), stress=np.zeros(6)
    )
    with pytest.raises(DataError, match="has a stress but its cell has no volume"):
        dataset_from_atoms([labelled], energy_unit="eV", length_unit="Angstrom")
    flat = slab.copy()
    flat.cell[1] = 2.0 * flat.cell[0]  # the two periodic vectors in one line
    with pytest.raises(DataError, match="span no area"):
        dataset_from_atoms([flat], targets=False)


def test_forces_and_stress_come_together_for_periodic_cells(copper):
    """One model call gives both for a cell periodic in three directions: ASE's NPT asks
    for them in separate calls, and each had replaced the other (51 model calls for 10
    steps, now 11)."""
    calls = []
    calc = atomlens.Calculator(copper[1], compile=False)
    original = calc.calculate
    calc.calculate = lambda *a, **k: calls.append(1) or original(*a, **k)
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True)
    atoms.calc = calc
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    assert len(calls) == 1 and forces.shape == (4, 3) and stress.shape == (6,)
    run_md(calc, atoms, ensemble="npt", temperature_K=300.0, steps=10, seed=0)
    assert len(calls) <= 1 + 11
