"""Bad or ambiguous input data: refused with a DataError naming the source and the frame,
never read as something else (stale calculator results, values cut or reshaped to fit,
units guessed, cells or rows dropped)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from atomlens.data.dataset import DataError, dataset_from_atoms
from atomlens.data.sources.ase_files import read_any, read_ase
from atomlens.data.sources.iso17 import is_iso17_db, read_iso17, write_iso17
from atomlens.data.sources.md17 import read_md17, write_md17


def _copper(seed: int) -> Atoms:
    atoms = bulk("Cu", cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def _water(n: int = 3) -> list[Atoms]:
    frames = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.positions[0, 0] += 0.01 * k
        frames.append(atoms)
    return frames


# ---------------------------------------------------------------- calculator results
def test_a_calculator_shared_by_frames_is_refused_not_read_as_stale_values():
    calc, frames = EMT(), []
    for k in range(3):
        atoms = _copper(k)
        atoms.calc = calc
        atoms.get_potential_energy()
        frames.append(atoms)
    with pytest.raises(DataError, match=r"<atoms>: frame 0: the calculator's 'energy' belongs"):
        dataset_from_atoms(frames, energy_unit="eV")
    # each frame with its own results: the true energies
    truth = []
    for atoms in frames:
        atoms.calc = EMT()
        truth.append(atoms.get_potential_energy())
    data = dataset_from_atoms(frames, energy_unit="eV")
    np.testing.assert_allclose(data.targets["energy"], truth)
    assert len(set(np.round(truth, 6))) == 3


def test_atoms_moved_after_the_calculation_are_refused():
    atoms = _copper(0)
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=np.zeros((4, 3)))
    assert dataset_from_atoms([atoms], energy_unit="eV").targets["energy"][0] == 1.0
    atoms.positions[0] += 0.1
    with pytest.raises(DataError, match=r"frame 0.*belongs to other atoms.*positions"):
        dataset_from_atoms([atoms], source="moved.xyz", energy_unit="eV")
    # the geometry alone reads no results
    assert dataset_from_atoms([atoms], targets=False).targets == {}


def test_results_written_by_ase_files_still_belong_to_their_frames(tmp_path):
    import ase.io

    frames = []
    for k in range(2):
        atoms = _copper(k)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces(),
            stress=atoms.get_stress(),
        )
        frames.append(atoms)
    for name in ("cu.extxyz", "cu.db", "cu.traj"):
        ase.io.write(tmp_path / name, frames)
        data = read_ase(tmp_path / name, energy_unit="eV")
        np.testing.assert_allclose(
            data.targets["energy"], [a.get_potential_energy() for a in frames], rtol=1e-10
        )
        assert data.targets["forces"].shape == (8, 3) and data.targets["stress"].shape == (2, 3, 3)


# ---------------------------------------------------------------- shapes and values
@pytest.mark.parametrize("shape", [(3, 2), (3,), (3, 3, 1), (2, 3), (4, 3)])
def test_forces_of_the_wrong_shape_name_the_frame(shape):
    frames = _water(4)
    for k, atoms in enumerate(frames):
        atoms.arrays["forces"] = np.ones((3, 3) if k != 2 else shape)
    with pytest.raises(DataError, match=r"water\.xyz: frame 2: 'forces' must be .*\(3, 3\)"):
        dataset_from_atoms(frames, source="water.xyz", energy_unit="eV")


@pytest.mark.parametrize("shape", [(3, 2), (3,), (3, 3, 1)])
def test_forces_of_one_wrong_shape_for_all_frames_are_refused(shape):
    frames = _water(3)
    for atoms in frames:
        atoms.arrays["forces"] = np.ones(shape)
    with pytest.raises(DataError, match=r"frame 0: 'forces' must be"):
        dataset_from_atoms(frames, energy_unit="eV")


@pytest.mark.parametrize("stress", [np.ones(3), np.ones((2, 3)), np.ones(9), "abc"])
def test_stress_of_the_wrong_shape_is_refused(stress):
    frames = [_copper(0), _copper(1)]
    frames[0].info["stress"] = np.eye(3)
    frames[1].info["stress"] = stress
    with pytest.raises(DataError, match=r"frame 1: 'stress' must be .*\(3, 3\) or \(6,\)"):
        dataset_from_atoms(frames, energy_unit="eV")


def test_stress_as_matrix_or_voigt_is_read():
    frames = [_copper(0), _copper(1)]
    frames[0].info["stress"] = np.diag([1.0, 2.0, 3.0])
    frames[1].info["stress"] = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    data = dataset_from_atoms(frames, energy_unit="eV")
    np.testing.assert_allclose(data.targets["stress"][1], np.diag([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    "energy",
    [np.array([-10.0, -20.0]), "abc", np.array([]), True, np.bool_(False), np.nan, 1 + 2j],
    ids=["two", "text", "empty", "bool", "numpy-bool", "nan", "complex"],
)
def test_an_energy_must_be_one_finite_real_number(energy):
    frames = _water(2)
    frames[0].info["energy"] = -1.0
    frames[1].info["energy"] = energy
    with pytest.raises(DataError, match=r"water\.xyz: frame 1: 'energy' (must be|has non-)"):
        dataset_from_atoms(frames, source="water.xyz", energy_unit="eV")


@pytest.mark.parametrize("energy", [-2, np.float32(-2.0), np.array([-2.0]), np.array(-2.0)])
def test_an_energy_as_a_scalar_or_a_one_element_array_is_read(energy):
    frames = _water(1)
    frames[0].info["energy"] = energy
    assert dataset_from_atoms(frames, energy_unit="eV").targets["energy"][0] == -2.0


# ---------------------------------------------------------------- units
@pytest.mark.parametrize("where", ["forces", "stress"])
def test_forces_or_stress_without_energies_need_a_declared_unit(where):
    frames = [_copper(0), _copper(1)]
    for atoms in frames:
        if where == "forces":
            atoms.arrays["forces"] = np.ones((4, 3))
        else:
            atoms.info["stress"] = np.eye(3)
    with pytest.raises(DataError, match=rf"cu\.xyz: there are {where}, but .*does not state"):
        dataset_from_atoms(frames, source="cu.xyz")
    data = dataset_from_atoms(frames, energy_unit="kcal/mol")
    assert "energy" not in data.targets
    assert data.targets[where].max() == pytest.approx(1 / 23.060547830619026)
    # stated in the frames: read without a declaration
    for atoms in frames:
        atoms.info.update(energy_unit="eV", length_unit="Angstrom")
    assert dataset_from_atoms(frames).targets[where].max() == 1.0


# ---------------------------------------------------------------- writers and databases
def _periodic_dataset(stress: bool):
    frames = []
    for k in range(2):
        atoms = _copper(k)
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if stress:
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return dataset_from_atoms(frames, energy_unit="eV")


@pytest.mark.parametrize("stress", [False, True])
@pytest.mark.parametrize("writer", [write_md17, write_iso17], ids=["md17", "iso17"])
def test_molecule_layouts_refuse_cells_and_stress(tmp_path, writer, stress):
    data = _periodic_dataset(stress)
    out = tmp_path / ("cu.npz" if writer is write_md17 else "cu.db")
    lost = r"cells and pbc, 'stress'" if stress else r"cells and pbc;"
    with pytest.raises(DataError, match=rf"cu\.(npz|db): .*would drop .*{lost}.*extxyz"):
        writer(out, data)
    assert not out.exists()


def _iso17_db(path, rows):
    """An ASE database; ``rows``: (atoms, has ISO17 keys) per row."""
    from ase.db import connect

    with connect(str(path), append=False) as db:
        for atoms, iso17 in rows:
            if iso17:
                forces = np.full((len(atoms), 3), 0.5)
                db.write(atoms, data={"atomic_forces": forces}, total_energy=-3.0)
            else:
                atoms = atoms.copy()
                atoms.calc = SinglePointCalculator(atoms, energy=-3.0)
                db.write(atoms)
    return path


def test_read_iso17_keeps_the_cells_of_periodic_rows(tmp_path):
    path = _iso17_db(tmp_path / "cells.db", [(_copper(0), True), (_copper(1), True)])
    data = read_iso17(path)
    assert data.cell is not None and data.pbc.all()
    np.testing.assert_allclose(data.cell[1], _copper(1).cell.array)
    molecules = _iso17_db(tmp_path / "molecules.db", [(a, True) for a in _water(2)])
    assert read_iso17(molecules).cell is None


@pytest.mark.parametrize("first_iso17", [True, False])
def test_a_database_mixing_iso17_and_plain_rows_is_refused(tmp_path, first_iso17):
    rows = [(a, first_iso17 if k == 0 else not first_iso17) for k, a in enumerate(_water(3))]
    path = _iso17_db(tmp_path / "mixed.db", rows)
    lacking = 2 if first_iso17 else 1
    with pytest.raises(DataError, match=rf"mixed\.db: row {lacking} has no 'total_energy'"):
        is_iso17_db(path)
    with pytest.raises(DataError, match=r"mixed\.db: .*mixing layouts"):
        read_any(path, energy_unit="eV")


# ---------------------------------------------------------------- MD17
def _npz(path, z):
    np.savez(
        path,
        z=np.asarray(z),
        R=np.array([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]]),
        E=np.array([[-1.0]]),
        e_unit="eV",
        r_unit="Angstrom",
    )
    return path


@pytest.mark.parametrize(
    "z",
    [[7.9, 1.2, 1.0], [8, 1, 65537], ["O", "H", "H"], [8, 1, 0], [8, 1, -1], [True, True, True]],
    ids=["fraction", "wraps-int16", "symbols", "zero", "negative", "bool"],
)
def test_md17_atomic_numbers_must_be_elements(tmp_path, z):
    path = _npz(tmp_path / "bad_z.npz", z)
    with pytest.raises(DataError, match=r"bad_z\.npz: z "):
        read_md17(path)


def test_md17_integer_valued_float_atomic_numbers_are_read(tmp_path):
    data = read_md17(_npz(tmp_path / "float_z.npz", [8.0, 1.0, 1.0]))
    assert data.numbers.tolist() == [8, 1, 1]


@pytest.mark.parametrize("option", [{"energy_key": "E"}, {"index": 0}])
def test_read_any_names_the_options_an_npz_file_takes(tmp_path, option):
    path = _npz(tmp_path / "water.npz", [8, 1, 1])
    with pytest.raises(DataError, match=r"water\.npz: option .* MD17 .npz.*energy_unit"):
        read_any(path, **option)
