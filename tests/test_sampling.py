"""Ab initio sampling: a short GFN2-xTB Langevin run, forces = -dE/dR, files written and read."""

import argparse

import numpy as np
import pytest

from atomlens.data import DataError
from atomlens.data.sampling import (
    make_calculator,
    molecule_from_smiles,
    sample_isomers,
    sample_md,
)
from atomlens.data.sources import read_any, read_md17


@pytest.fixture(scope="module")
def water_run():
    atoms = molecule_from_smiles("O", seed=0)
    calculator = make_calculator("gfn2")
    data = sample_md(atoms, calculator, temperature=500, n_frames=10, every=2, seed=1)
    return data, calculator


def test_water_md_energies_and_forces(water_run):
    data, _ = water_run
    assert len(data) == 10 and data.units["energy"] == "eV"
    energy = np.asarray(data.targets["energy"])
    assert np.isfinite(energy).all()
    # GFN2-xTB total energy of water is about -5.07 hartree = -138 eV
    assert -140 < energy.min() and energy.max() < -136
    assert np.asarray(data.targets["forces"]).shape == (30, 3)
    assert data.meta["temperature_K"] == 500
    # frames differ: the dynamics moved the atoms
    assert not np.allclose(data.positions[:3], data.positions[-3:])


def test_forces_are_minus_energy_gradient(water_run):
    from threadpoolctl import threadpool_limits

    data, _ = water_run
    calculator = make_calculator("gfn2")
    atoms = data.atoms(7)
    stored = np.asarray(data.targets["forces"][21:24])
    h = 1e-3
    numeric = np.zeros((3, 3))
    with threadpool_limits(1):  # one thread is fastest for xTB on a 3-atom molecule
        for i in range(3):
            for k in range(3):
                energies = []
                for sign in (1, -1):
                    moved = atoms.copy()
                    moved.positions[i, k] += sign * h
                    moved.calc = calculator
                    energies.append(moved.get_potential_energy())
                numeric[i, k] = -(energies[0] - energies[1]) / (2 * h)
    assert np.linalg.norm(stored - numeric) / np.linalg.norm(stored) < 1e-3


def test_sampled_data_written_as_md17_npz(water_run, tmp_path):
    from atomlens.data.sources.md17 import write_md17

    data, _ = water_run
    path = write_md17(tmp_path / "water.npz", data, name="water", theory="GFN2-xTB")
    back = read_md17(path)
    np.testing.assert_allclose(back.targets["energy"], data.targets["energy"], rtol=1e-12)
    np.testing.assert_allclose(back.targets["forces"], data.targets["forces"], rtol=1e-10)
    with np.load(path, allow_pickle=False) as raw:
        assert str(raw["e_unit"]) == "kcal/mol"
        assert raw["E"][0, 0] == pytest.approx(data.targets["energy"][0] * 23.060548, rel=1e-6)


def test_isomer_sets_and_cli(tmp_path):
    sets = sample_isomers(["CO", "CO"], n_reference_isomers=1, n_frames=5, every=1, seed=0)
    assert [len(sets[k]) for k in ("reference", "test_within", "test_other")] == [4, 1, 5]
    assert list(sets["test_within"].extras["frame"]) == [4]
    assert set(sets["test_other"].extras["isomer"]) == {1}

    from atomlens.cli.sample import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "water.db"
    args = parser.parse_args(
        [
            "sample",
            "--smiles",
            "O",
            "--frames",
            "3",
            "--every",
            "1",
            "--equilibration",
            "0",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    data = read_any(out)  # ISO17 layout
    assert len(data) == 3 and np.isfinite(data.targets["energy"]).all()
    args = parser.parse_args(["sample", "--smiles", "O", "--frames", "3", "--out", "x.txt"])
    with pytest.raises(DataError, match="x.txt"):  # main() prints it (tests/test_cli_errors.py)
        args.func(args)


def test_sampling_errors():
    with pytest.raises(DataError, match="SMILES"):
        molecule_from_smiles("C1CC(")
    with pytest.raises(ValueError, match="unknown method"):
        make_calculator("hf-by-hand")
    try:
        import pyscf  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pyscf"):
            make_calculator("pyscf")


def test_periodic_cell_sampled_with_its_cell_and_stress(tmp_path):
    """GFN1-xTB MD of a two-atom silicon cell through the CLI: cells and stress kept."""
    from ase.build import bulk
    from ase.io import write as ase_write

    from atomlens.cli import main
    from atomlens.data.sources import read_any

    ase_write(tmp_path / "si.extxyz", bulk("Si", "diamond", a=5.43))
    assert (
        main(
            [
                "sample",
                "--xyz",
                str(tmp_path / "si.extxyz"),
                "--frames",
                "2",
                "--every",
                "1",
                "--equilibration",
                "0",
                "--cells",
                "2",
                "--strain",
                "0.03",
                "--temperature",
                "300",
                "--out",
                str(tmp_path / "si_md.extxyz"),
            ]
        )
        == 0
    )
    data = read_any(tmp_path / "si_md.extxyz", energy_unit="eV", length_unit="Angstrom")
    assert len(data) == 2 and data.pbc.all()
    import ase.io

    assert all(a.info["theory"] == "gfn1" for a in ase.io.read(tmp_path / "si_md.extxyz", ":"))
    assert data.units["stress"] == "eV/Angstrom^3"
    volumes = np.abs(np.linalg.det(data.cell))
    assert volumes[0] != pytest.approx(volumes[1])  # the second copy is strained
    # the stored stress is GFN1-xTB's for the stored cell and positions
    from tblite.ase import TBLite

    atoms = data.atoms(1)
    atoms.calc = TBLite(method="GFN1-xTB", verbosity=0)
    np.testing.assert_allclose(data.targets["stress"][1], atoms.get_stress(voigt=False), atol=1e-6)
    with pytest.raises(SystemExit):
        main(
            [
                "sample",
                "--xyz",
                str(tmp_path / "si.extxyz"),
                "--out",
                str(tmp_path / "x.npz"),
                "--cells",
                "x",
            ]
        )
    assert (
        main(
            [
                "sample",
                "--xyz",
                str(tmp_path / "si.extxyz"),
                "--frames",
                "1",
                "--out",
                str(tmp_path / "si.npz"),
            ]
        )
        == 2
    )  # cells need extxyz


def test_sampled_cells_store_the_frames_asked_for(monkeypatch):
    """--frames N over --cells C stores N frames in all, the remainder to the first cells
    (N // C each had stored 2 of 3 frames over 2 cells, 999 of 1,000 over 3); fewer frames
    than cells is refused."""
    from ase.build import bulk

    from atomlens.data import sampling

    calls = []

    def fake_md(atoms, calculator, n_frames, seed, **md):
        calls.append(n_frames)
        return sampling.PackedDataset.from_structures(
            [(atoms.numbers, atoms.positions)] * n_frames,
            cells=[atoms.cell.array] * n_frames,
            pbc=[atoms.pbc] * n_frames,
        )

    monkeypatch.setattr(sampling, "sample_md", fake_md)
    cell = bulk("Si", "diamond", a=5.43)
    data = sampling.sample_cells(cell, calculator=None, n_cells=3, n_frames=1000)
    assert calls == [334, 333, 333] and len(data) == 1000
    with pytest.raises(ValueError, match="2 frames for 3 cells"):
        sampling.sample_cells(cell, calculator=None, n_cells=3, n_frames=2)
