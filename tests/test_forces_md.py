"""Forces are -dE/dR of the energy model; MD with a trained model conserves energy; MD17 and
ISO17 files feed the energy+force training path; the ``atomlens md`` command runs."""

import csv

import numpy as np
import pytest
import torch
from ase.build import molecule
from helpers import MODELS, random_model, random_rotation

import atomlens
from atomlens import units
from atomlens.cli import main
from atomlens.data import PackedDataset
from atomlens.data.dataset import dataset_from_atoms
from atomlens.md import run_md
from atomlens.models import load_model, save_model
from atomlens.training.config import TrainConfig
from atomlens.training.train import load_dataset, train

SMALL_SCHNET = {
    "representation": "schnet",
    "head_hidden": 16,
    "target": "energy",
    "representation_kwargs": {
        "n_atom_basis": 32,
        "n_interactions": 2,
        "n_filters": 32,
        "n_rbf": 20,
        "cutoff": 5.0,
    },
}


def _energy_and_forces(model, atoms):
    batch = dataset_from_atoms([atoms], targets=False).batch([0], model.cutoff, torch.float64)
    out = model(batch, forces=True)
    return out["energy"][0].detach(), out["forces"].detach()


def _aspirin_like():
    """Ethanol plus a displaced water: 12 atoms, some pairs beyond a 5 Angstrom cutoff."""
    atoms = molecule("CH3CH2OH") + molecule("H2O")
    atoms.positions[9:] += [3.5, 1.0, 0.5]
    atoms.rattle(0.05, seed=3)
    return atoms


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ forces = -grad E
@pytest.mark.parametrize("representation", MODELS)
def test_forces_are_minus_the_finite_difference_gradient(representation):
    model = random_model(representation, seed=1)
    atoms = _aspirin_like()
    _, forces = _energy_and_forces(model, atoms)
    # h = 1e-4 Angstrom: truncation error O(h^2) ~ 1e-8 eV/A; round-off of the ~ -6000 eV
    # total (large atom references) eps |E| / h ~ 1e-8 eV/A
    h = 1e-4
    numeric = torch.zeros_like(forces)
    for a in range(len(atoms)):
        for k in range(3):
            shifted = atoms.copy()
            shifted.positions[a, k] += h
            e_plus, _ = _energy_and_forces(model, shifted)
            shifted.positions[a, k] -= 2 * h
            e_minus, _ = _energy_and_forces(model, shifted)
            numeric[a, k] = -(e_plus - e_minus) / (2 * h)
    assert forces.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(forces, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("representation", MODELS)
def test_forces_rotate_with_the_molecule(representation):
    model = random_model(representation, seed=2)
    atoms = _aspirin_like()
    energy, forces = _energy_and_forces(model, atoms)
    rotation = random_rotation(seed=5)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rotation.numpy().T + [1.0, -2.0, 0.5]
    energy_r, forces_r = _energy_and_forces(model, moved)
    torch.testing.assert_close(energy_r, energy, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(forces_r, forces @ rotation.T, rtol=1e-9, atol=1e-10)
    # and the total force vanishes (translation invariance)
    torch.testing.assert_close(
        forces.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0
    )


# ------------------------------------------------------------------ energy conservation
@pytest.fixture(scope="module")
def xtb_ethanol():
    """200 GFN2-xTB frames of ethanol at 500 K (Langevin, one every 4 steps of 0.5 fs)."""
    from threadpoolctl import threadpool_limits

    from atomlens.data.sampling import make_calculator, relax, sample_md

    calc = make_calculator("gfn2")
    # xTB on one thread: on a busy machine its OpenMP barriers cost ~20x per step otherwise
    with threadpool_limits(1, user_api="openmp"):
        start = relax(molecule("CH3CH2OH"), calc, fmax=0.05)
        return sample_md(
            start, calc, temperature=500.0, n_frames=200, every=4, equilibration_fs=50.0, seed=1
        )


@pytest.fixture(scope="module")
def trained_ethanol(xtb_ethanol, tmp_path_factory):
    """A small SchNet trained on energies and forces for at most 30 s (about 100 epochs)."""
    out = tmp_path_factory.mktemp("ethanol")
    config = TrainConfig.from_dict(
        {
            "data": "sampled",
            "target": "energy",
            "forces": True,
            "rho": 0.01,
            "n_train": 160,
            "n_val": 40,
            "n_test": 0,
            "batch_size": 10,
            "lr": 2e-3,
            "lr_patience": 5,
            "max_epochs": 120,
            "max_minutes": 0.5,
            "out": str(out),
            "progress": False,
            "threads": 1,  # batches of 10 ethanols are too small to split over threads
            "model": SMALL_SCHNET,
        }
    )
    threads = torch.get_num_threads()
    try:
        train(config, data=xtb_ethanol)
    finally:
        torch.set_num_threads(threads)
    return out


def test_nve_md_with_a_trained_model_conserves_energy(xtb_ethanol, trained_ethanol):
    """1 ps of NVE at 0.5 fs (2000 steps) in float64, 300 K velocities on the model's minimum.

    The start is an xTB frame relaxed with the model (BFGS, fmax 0.05 eV/A), so a model
    trained for half a minute is not driven into regions its 160 frames never saw.
    Bound: |E_tot(end) - E_tot(0)| < 0.5 meV/atom and std(E_tot) < 0.25 meV/atom, while the
    potential energy swings with a std above 1 meV/atom (energy does flow between E_pot and
    E_kin). Measured over 3 training seeds x 2 start frames: drift 0.04-0.14 meV/atom, std
    0.016-0.036 meV/atom, E_pot std 3-5 meV/atom.
    """
    from ase.optimize import BFGS

    model = load_model(trained_ethanol / "model")
    atoms = xtb_ethanol.atoms(0)
    atoms.info.clear()
    atoms.arrays.pop("forces", None)
    atoms.calc = atomlens.Calculator(model, dtype="float64")
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    log = run_md(
        atoms.calc,
        atoms,
        ensemble="nve",
        temperature_K=300.0,
        timestep_fs=0.5,
        steps=2000,
        interval=5,
        seed=0,
    )
    n = len(atoms)
    drift = log.drift(n)
    assert len(log.etot) == 401 and log.time_fs[-1] == pytest.approx(1000.0)
    assert np.std(log.epot) / n > 1e-3  # the molecule really moves
    assert drift["drift_eV_per_atom"] < 5e-4, drift
    assert drift["std_eV_per_atom"] < 2.5e-4, drift
    assert 50.0 < np.mean(log.temperature) < 400.0


def test_langevin_md_writes_trajectory_and_log(tmp_path):
    model = random_model("schnet", seed=3)
    atoms = molecule("CH3CH2OH")
    calc = atomlens.Calculator(model)
    log = run_md(
        calc,
        atoms,
        ensemble="langevin",
        temperature_K=400.0,
        timestep_fs=0.5,
        steps=20,
        friction=0.02,
        trajectory=tmp_path / "md.traj",
        logfile=tmp_path / "md.csv",
        interval=5,
        seed=4,
    )
    from ase.io import read

    frames = read(tmp_path / "md.traj", index=":")
    assert len(frames) == 5 and len(log.time_fs) == 5
    np.testing.assert_allclose(frames[-1].positions, atoms.positions)
    assert frames[-1].get_potential_energy() == pytest.approx(log.epot[-1])
    rows = list(csv.DictReader((tmp_path / "md.csv").read_text().splitlines()))
    assert list(rows[0]) == ["time_fs", "epot_eV", "ekin_eV", "etot_eV", "temperature_K"]
    assert float(rows[-1]["time_fs"]) == pytest.approx(10.0)
    assert float(rows[2]["etot_eV"]) == pytest.approx(
        float(rows[2]["epot_eV"]) + float(rows[2]["ekin_eV"]), rel=1e-8
    )
    with pytest.raises(ValueError, match="ensemble"):
        run_md(calc, atoms, ensemble="nvt", steps=1)
    with pytest.raises(ValueError, match="periodic"):
        run_md(calc, atoms, ensemble="npt", steps=1)  # NPT needs a cell


def test_degrees_of_freedom_temperature_and_drift_written_out():
    """3n - 6, or 3n - 5 when the smallest moment of inertia is below 1e-8 of the largest;
    T = 2 E_kin / (n_dof k_B) with a given n_dof; drift and spread of E_tot per atom."""
    from ase import Atoms
    from ase import units as ase_units

    from atomlens.md import MDLog, degrees_of_freedom, kinetic_temperature

    def bent_h3(ratio):  # three H 0.5 A apart, the middle one off the line: I_min/I_max
        offset = np.sqrt(ratio * 0.75)  # (2/3) m d^2 / (m / 2) = ratio
        return Atoms("H3", positions=[[-0.5, 0, 0], [0, offset, 0], [0.5, 0, 0]])

    for ratio, n_dof in ((0.7e-8, 4), (1.4e-8, 3)):  # light atoms: I_max = 0.5 amu A^2
        atoms = bent_h3(ratio)
        inertia = atoms.get_moments_of_inertia()
        assert inertia.min() / inertia.max() == pytest.approx(ratio, rel=0.01)
        assert degrees_of_freedom(atoms, rotation_removed=True) == n_dof
    atoms = molecule("H2O")
    atoms.set_momenta(np.random.default_rng(0).normal(size=(3, 3)))
    expected = 2 * atoms.get_kinetic_energy() / (5 * ase_units.kB)
    assert kinetic_temperature(atoms, n_dof=5) == pytest.approx(expected, rel=1e-12)
    log = MDLog(etot=[1.0, 2.0, 4.0, 3.0])
    drift = log.drift(n_atoms=4)
    assert drift["drift_eV_per_atom"] == pytest.approx(0.5)  # |3 - 1| / 4
    assert drift["std_eV_per_atom"] == pytest.approx(np.std([1.0, 2.0, 4.0, 3.0]) / 4)


def test_md_starts_at_the_requested_temperature_and_langevin_holds_it():
    """The initial kinetic temperature is T over the degrees of freedom left (NVE: 3n - 6,
    both momenta zero; Langevin: 3n - 3), and Langevin keeps the mean kinetic temperature at T
    (measured 432, 400 and 401 K for 400 K with seeds 2, 3, 4; bound +-15 %)."""
    from atomlens.md import degrees_of_freedom, kinetic_temperature

    calc = atomlens.Calculator(random_model("schnet", seed=3))
    atoms = molecule("CH3CH2OH")
    assert degrees_of_freedom(atoms, rotation_removed=True) == 21
    assert degrees_of_freedom(molecule("CO2"), rotation_removed=True) == 4  # linear: 3n - 5
    assert degrees_of_freedom(molecule("N2"), rotation_removed=True) == 1  # the bond stretch
    assert degrees_of_freedom(molecule("N2")) == 3
    log = run_md(calc, atoms, ensemble="nve", temperature_K=500.0, steps=0, seed=1)
    assert log.temperature[0] == pytest.approx(500.0, rel=1e-9)
    momenta = atoms.get_momenta()
    np.testing.assert_allclose(momenta.sum(0), 0.0, atol=1e-12)
    relative = atoms.positions - atoms.get_center_of_mass()
    velocities = momenta / atoms.get_masses()[:, None]
    angular = (np.cross(relative, velocities) * atoms.get_masses()[:, None]).sum(0)
    np.testing.assert_allclose(angular, 0.0, atol=1e-10)
    assert kinetic_temperature(atoms, 21) == pytest.approx(500.0, rel=1e-9)

    atoms = molecule("CH3CH2OH")
    log = run_md(
        calc,
        atoms,
        ensemble="langevin",
        temperature_K=400.0,
        steps=1500,
        friction=0.05,
        timestep_fs=0.5,
        seed=2,
    )
    assert log.temperature[0] == pytest.approx(400.0, rel=1e-9)
    assert kinetic_temperature(atoms) == pytest.approx(log.temperature[-1])  # 3n - 3
    mean = np.mean(log.temperature[100:])
    assert 340.0 < mean < 460.0, mean


# ------------------------------------------------------------------ MD17 / ISO17 through training
def _teacher_frames(n_frames=40, seed=0):
    """Rattled water frames labelled by a random 'teacher' model (eV, eV/Angstrom)."""
    teacher = random_model("schnet", seed=7)
    rng = np.random.default_rng(seed)
    base = molecule("H2O")
    frames = []
    for _ in range(n_frames):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out = teacher.predict(atoms, forces=True)
        frames.append((atoms, float(out["energy"][0]), out["forces"]))
    return frames


def _md17_config(data, out, **overrides):
    return TrainConfig.from_dict(
        {
            "data": str(data),
            "target": "energy",
            "forces": True,
            "n_train": 20,
            "n_val": 10,
            "batch_size": 10,
            "max_epochs": 2,
            "out": str(out),
            "progress": False,
            "threads": 1,
            "model": SMALL_SCHNET,
            **overrides,
        }
    )


def test_md17_file_through_training(tmp_path):
    frames = _teacher_frames()
    kcal = 1.0 / units.KCAL_MOL_EV  # kcal/mol per eV
    path = tmp_path / "water.npz"
    np.savez(
        path,
        z=frames[0][0].numbers,
        R=np.stack([a.positions for a, _, _ in frames]),
        E=np.array([[e * kcal] for _, e, _ in frames]),
        F=np.stack([f * kcal for _, _, f in frames]),
    )  # no unit keys, like MD17 itself
    config = _md17_config(path, tmp_path / "run", energy_unit="kcal/mol", length_unit="Angstrom")
    data = load_dataset(config)
    np.testing.assert_allclose(data.targets["energy"], [e for _, e, _ in frames], rtol=1e-12)
    np.testing.assert_allclose(
        data.targets["forces"], np.concatenate([f for _, _, f in frames]), rtol=1e-10, atol=1e-12
    )
    assert data.units["energy"] == "eV" and data.units["forces"] == "eV/Angstrom"
    metrics = train(config)
    assert {"energy_mae", "forces_mae"} <= set(metrics) and metrics["unit"] == "eV"
    model = load_model(tmp_path / "run" / "model")
    assert model.config.unit == "eV"
    # energies of the model are in eV: near the teacher's, far from the kcal/mol numbers
    pred = model.predict(frames[0][0])["energy"][0]
    assert abs(pred - frames[0][1]) < 5.0 < abs(pred - frames[0][1] * kcal)


def test_iso17_file_through_training(tmp_path):
    from atomlens.data.sources import write_iso17

    frames = _teacher_frames()
    dataset = PackedDataset.from_structures(
        [(a.numbers, a.positions) for a, _, _ in frames],
        {"energy": [e for _, e, _ in frames], "forces": [f for _, _, f in frames]},
        {"energy": "eV", "forces": "eV/Angstrom"},
    )
    path = write_iso17(tmp_path / "reference.db", dataset)
    config = _md17_config(path, tmp_path / "run")
    data = load_dataset(config)
    np.testing.assert_allclose(data.targets["energy"], dataset.targets["energy"], rtol=1e-12)
    np.testing.assert_allclose(data.targets["forces"], dataset.targets["forces"], rtol=1e-12)
    metrics = train(config)
    assert np.isfinite(metrics["forces_mae"])
    # the saved test predictions hold the forces the metric was computed from (for the
    # committee's force errors of an ensemble), the atoms in the structures' order
    with np.load(tmp_path / "run" / "test_predictions.npz") as saved:
        n = saved["n_atoms"]
        assert n.sum() == len(saved["forces_predicted"]) == len(saved["forces_reference"])
        atoms = data.atom_index(saved["indices"])
        np.testing.assert_array_equal(saved["forces_reference"], data.targets["forces"][atoms])
        np.testing.assert_allclose(
            np.abs(saved["forces_predicted"] - saved["forces_reference"]).mean(),
            metrics["forces_mae"],
            rtol=1e-6,
        )


# ------------------------------------------------------------------ CLI
def test_md_command(tmp_path, capsys):
    model = random_model("schnet", seed=4).float()
    save_model(model, tmp_path / "model")
    molecule("CH3CH2OH").write(tmp_path / "ethanol.xyz")
    code = main(
        [
            "md",
            str(tmp_path / "model"),
            str(tmp_path / "ethanol.xyz"),
            "--steps",
            "10",
            "--timestep",
            "0.5",
            "--interval",
            "5",
            "--ensemble",
            "nve",
            "--float64",
            "--out",
            str(tmp_path / "md.extxyz"),
            "--log",
            str(tmp_path / "md.csv"),
        ]
    )
    assert code == 0
    assert "E_tot drift" in capsys.readouterr().out
    from ase.io import read

    frames = read(tmp_path / "md.extxyz", index=":")
    assert len(frames) == 3 and "forces" in frames[-1].calc.results
    assert len((tmp_path / "md.csv").read_text().splitlines()) == 4
    # --compile runs the same trajectory (same seed) through the compiled calculator
    assert (
        main(
            [
                "md",
                str(tmp_path / "model"),
                str(tmp_path / "ethanol.xyz"),
                "--steps",
                "10",
                "--timestep",
                "0.5",
                "--interval",
                "5",
                "--ensemble",
                "nve",
                "--float64",
                "--compile",
                "--out",
                str(tmp_path / "compiled.traj"),
                "--log",
                str(tmp_path / "compiled.csv"),
            ]
        )
        == 0
    )
    eager, compiled = (
        np.loadtxt(tmp_path / name, delimiter=",", skiprows=1)
        for name in ("md.csv", "compiled.csv")
    )
    np.testing.assert_allclose(compiled, eager, rtol=1e-8, atol=1e-9)
    assert main(["md", str(tmp_path / "model"), str(tmp_path / "missing.xyz")]) == 2
    # a thermostatted run reports its temperature, not an energy drift
    run = tmp_path / "runs" / "nvt.traj"
    args = [
        "md",
        str(tmp_path / "model"),
        str(tmp_path / "ethanol.xyz"),
        "--steps",
        "4",
        "--interval",
        "2",
        "--ensemble",
        "langevin",
        "--out",
        str(run),
    ]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "E_tot drift" not in printed and "thermostat 300 K" in printed
    assert (tmp_path / "runs" / "nvt.csv").is_file()


@pytest.mark.parametrize("ensemble", ["nve", "langevin"])
def test_md_with_fixed_atoms_keeps_them_and_counts_what_is_left(tmp_path, ensemble):
    """FixAtoms: the fixed atoms stay where they are in both ensembles (Langevin had added
    FixCom, which moved them with the centre of mass), the degrees of freedom are 3n minus
    the fixed atoms' (as ASE's get_temperature: NVE had started at 420 K for 300 K), the
    run starts at the requested temperature and Langevin holds it (it had held 159 K for
    300 K); the atoms' constraints are as before the run."""
    from ase.constraints import FixAtoms

    from atomlens.md import degrees_of_freedom

    model = random_model("schnet", seed=3)
    atoms = molecule("CH3CH2OH")
    fixed = [0, 1, 2, 3]
    atoms.set_constraint(FixAtoms(indices=fixed))
    start = atoms.positions[fixed].copy()
    assert degrees_of_freedom(atoms, rotation_removed=True) == 3 * 9 - 12
    steps = 400 if ensemble == "langevin" else 20
    log = run_md(
        model,
        atoms,
        ensemble=ensemble,
        temperature_K=300.0,
        steps=steps,
        friction=0.05,
        seed=5,
        compile=False,
        dtype="float64",
    )
    np.testing.assert_array_equal(atoms.positions[fixed], start)
    assert not atoms.get_momenta()[fixed].any()
    assert [type(c).__name__ for c in atoms.constraints] == ["FixAtoms"]
    assert log.temperature[0] == pytest.approx(300.0, rel=1e-9)
    assert log.temperature[-1] == pytest.approx(atoms.get_temperature(), rel=1e-9)
    if ensemble == "langevin":
        held = np.mean(log.temperature[100:])
        assert 230.0 < held < 370.0, held


def test_the_frame_that_stops_a_run_is_in_its_files(tmp_path):
    """The stability check runs after the log and the trajectory: the frame that stopped
    the run is the last one kept in NAME.unstable.SUFFIX (it was missing)."""
    from atomlens.md import MDUnstableError

    model = random_model("schnet", seed=3)
    trajectory, logfile = tmp_path / "md.traj", tmp_path / "md.csv"
    with pytest.raises(MDUnstableError, match="above the limit of 299 K"):
        run_md(
            model,
            molecule("CH3CH2OH"),
            temperature_K=300.0,
            steps=5,
            trajectory=trajectory,
            logfile=logfile,
            max_temperature_K=299.0,
            compile=False,
        )
    from ase.io import read

    assert len(read(tmp_path / "md.unstable.traj", index=":")) == 1
    rows = list(csv.DictReader((tmp_path / "md.unstable.csv").read_text().splitlines()))
    assert len(rows) == 1 and float(rows[0]["temperature_K"]) == pytest.approx(300.0)
