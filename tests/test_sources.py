"""Readers: QM9 CSV, MD17 npz, ISO17 db, ASE files; units converted, bad input refused."""

from pathlib import Path

import numpy as np
import pytest

from atomlens import units
from atomlens.data import DataError, PackedDataset
from atomlens.data.sources import read_any
from atomlens.data.sources.qm9 import QM9_TARGETS, load_qm9, read_qm9_csv

ROWS = Path(__file__).parent / "data" / "qm9_rows.csv"


# ---------------------------------------------------------------------------------- QM9
def test_qm9_rows_atoms_coordinates_and_units():
    data = read_qm9_csv(ROWS)
    assert len(data) == 11
    assert list(data.extras["index"][:3]) == [1, 2, 3]
    assert data.extras["smiles"][0] == "C"
    # methane: C then four H, coordinates straight from the CSV (Angstrom)
    np.testing.assert_array_equal(data.numbers[:5], [6, 1, 1, 1, 1])
    np.testing.assert_allclose(data.positions[0], [-0.0126981359, 1.0858041578, 0.0080009958])
    np.testing.assert_allclose(data.positions[4], [-0.5238136345, 1.4379326443, 0.9063972942])
    # U0 of methane: -40.47893 hartree
    assert data.targets["U0"][0] == pytest.approx(-40.47893 * 27.211386, rel=1e-7)
    assert data.targets["gap"][0] == pytest.approx(0.5048 * units.HARTREE_EV)
    assert data.targets["mu"][1] == pytest.approx(1.6256)  # ammonia, Debye
    assert data.targets["cv"][0] == pytest.approx(6.469)
    assert data.units["U0"] == "eV" and data.units["alpha"] == "bohr^3"
    assert data.units["positions"] == "Angstrom"
    assert set(data.targets) == set(QM9_TARGETS)
    assert {int(z) for z in data.elements} == {1, 6, 7, 8, 9}
    assert np.array_equal(data.n_atoms_per[:3], [5, 4, 3])


def test_qm9_limit_and_cache(tmp_path, monkeypatch):
    assert len(read_qm9_csv([ROWS, ROWS], limit=13)) == 13
    monkeypatch.setattr("atomlens.data.sources.qm9.read_qm9_csv", lambda: read_qm9_csv(ROWS))
    first = load_qm9(tmp_path)
    assert isinstance(first.positions, np.memmap)
    again = load_qm9(tmp_path)
    np.testing.assert_array_equal(first.targets["U0"], again.targets["U0"])
    assert again.extras["smiles"][-1] == "FC(F)(F)C#C"


def _rewrite(tmp_path, edit, name="broken.csv"):
    lines = ROWS.read_text().splitlines(keepends=True)
    path = tmp_path / name
    path.write_text("".join(edit(lines)))
    return path


def test_qm9_truncated_file_names_file_and_line(tmp_path):
    path = _rewrite(tmp_path, lambda lines: lines[:-1] + [lines[-1][:300]])
    with pytest.raises(DataError, match=r"broken\.csv:12"):
        read_qm9_csv(path)


def test_qm9_atom_count_mismatch(tmp_path):
    def drop_atom(lines):
        lines[3] = lines[3].replace(",[0.8717903737,1.3007924048,0.0006931336]", "")
        return lines

    with pytest.raises(DataError, match=r"broken\.csv:4: .*XYZ_Ang"):
        read_qm9_csv(_rewrite(tmp_path, drop_atom))


def test_qm9_unknown_element(tmp_path):
    def alien(lines):
        lines[2] = lines[2].replace("['N','H','H','H']", "['Xx','H','H','H']")
        return lines

    with pytest.raises(DataError, match=r"broken\.csv:3: unknown element symbol 'Xx'"):
        read_qm9_csv(_rewrite(tmp_path, alien))


def test_qm9_bad_number_and_missing_file(tmp_path):
    def bad(lines):
        lines[4] = lines[4].replace("-77.308427", "-77.3o8427")
        return lines

    with pytest.raises(DataError, match=r"broken\.csv:5: InternalEnergy_0K_au"):
        read_qm9_csv(_rewrite(tmp_path, bad))
    with pytest.raises(DataError, match="nothing.csv"):
        read_qm9_csv(tmp_path / "nothing.csv")


def test_packed_dataset_rejects_bad_structures():
    water = np.array([8, 1, 1])
    r = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(DataError, match="empty"):
        PackedDataset.from_structures([])
    with pytest.raises(DataError, match="unknown element"):
        PackedDataset.from_structures([(np.array([8, 1, 0]), r)])
    with pytest.raises(DataError, match="NaN"):
        PackedDataset.from_structures([(water, np.where(r == 0.96, np.nan, r))])
    with pytest.raises(DataError, match="overlapping"):
        PackedDataset.from_structures([(water, np.array([[0.0, 0, 0], [0.01, 0, 0], [1, 1, 0]]))])


# ---------------------------------------------------------------------------------- MD17
def _water_frames(n=4, seed=0):
    rng = np.random.default_rng(seed)
    z = np.array([8, 1, 1])
    base = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    R = base + rng.normal(0, 0.02, (n, 3, 3))
    E = rng.normal(-47000.0, 1.0, n)  # kcal/mol
    F = rng.normal(0, 20.0, (n, 3, 3))  # kcal/mol/Angstrom
    return z, R, E, F


def test_md17_units_converted_and_roundtrip(tmp_path):
    from atomlens.data.sources.md17 import read_md17, write_md17

    z, R, E, F = _water_frames()
    path = tmp_path / "water.npz"
    np.savez(
        path,
        z=z,
        R=R,
        E=E[:, None],
        F=F,
        e_unit="kcal/mol",
        r_unit="Ang",
        f_unit="kcal/mol/Ang",
        name="water",
    )
    data = read_md17(path)
    assert len(data) == 4 and data.units["energy"] == "eV"
    assert data.targets["energy"][0] == pytest.approx(E[0] / 23.060548, rel=1e-7)
    np.testing.assert_allclose(data.targets["forces"][:3], F[0] / 23.060548, rtol=1e-7)
    np.testing.assert_array_equal(data.positions[3:6], R[1])
    assert data.meta["name"] == "water"

    out = write_md17(tmp_path / "out" / "copy.npz", data, name="water")
    with np.load(out, allow_pickle=False) as back:
        np.testing.assert_allclose(back["E"][:, 0], E, rtol=1e-12)
        np.testing.assert_allclose(back["F"], F, rtol=1e-12)
        assert str(back["e_unit"]) == "kcal/mol" and len(str(back["md5"])) == 32
    assert [p.name for p in out.parent.iterdir()] == ["copy.npz"]  # no temp file left
    again = read_md17(out)
    np.testing.assert_allclose(again.targets["forces"], data.targets["forces"], rtol=1e-12)


def test_md17_missing_units_need_declaring(tmp_path):
    from atomlens.data.sources.md17 import read_md17

    z, R, E, F = _water_frames()
    path = tmp_path / "bare.npz"
    np.savez(path, z=z, R=R, E=E, F=F)
    with pytest.raises(DataError, match=r"bare\.npz.*energy_unit="):
        read_md17(path)
    a = read_md17(path, energy_unit="kcal/mol", length_unit="Angstrom")
    b = read_md17(path, assume_md17_units=True)
    np.testing.assert_allclose(a.targets["energy"], b.targets["energy"])
    c = read_md17(path, energy_unit="eV", length_unit="Angstrom")
    assert c.targets["energy"][0] == pytest.approx(E[0])


def test_md17_truncated_and_malformed(tmp_path):
    from atomlens.data.sources.md17 import read_md17

    z, R, E, F = _water_frames()
    good = tmp_path / "good.npz"
    np.savez(good, z=z, R=R, E=E, F=F, e_unit="kcal/mol", r_unit="Ang")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.npz"):
        read_md17(cut)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, z=z[:2], R=R, E=E, e_unit="kcal/mol", r_unit="Ang")
    with pytest.raises(DataError, match=r"wrong\.npz: R has shape"):
        read_md17(wrong)
    with pytest.raises(DataError, match="not found"):
        read_md17(tmp_path / "absent.npz")


# ---------------------------------------------------------------------------------- ISO17
def _write_iso17_db(path, n_frames=3, drop_forces=False):
    from ase import Atoms
    from ase.db import connect

    z, R, E, F = _water_frames(n_frames)
    with connect(str(path)) as db:
        for k in range(n_frames):
            data = {} if drop_forces else {"atomic_forces": F[k] / 23.06}
            db.write(
                Atoms(numbers=z, positions=R[k]),
                data=data,
                total_energy=E[k] / 23.06,
                qm9_index=3,
                frame=k,
            )
    return z, R, E / 23.06, F / 23.06


def test_iso17_reader_and_writer(tmp_path):
    from atomlens.data.sources import read_any
    from atomlens.data.sources.iso17 import read_iso17, write_iso17

    _, _, E, F = _write_iso17_db(tmp_path / "iso.db")
    data = read_iso17(tmp_path / "iso.db")
    assert len(data) == 3
    np.testing.assert_allclose(data.targets["energy"], E)
    np.testing.assert_allclose(data.targets["forces"].reshape(3, 3, 3), F)
    assert list(data.extras["frame"]) == [0, 1, 2] and set(data.extras["qm9_index"]) == {3}
    write_iso17(tmp_path / "copy.db", data)
    again = read_any(tmp_path / "copy.db")  # dispatches to the ISO17 reader
    np.testing.assert_allclose(again.targets["forces"], data.targets["forces"])
    assert list(again.extras["frame"]) == [0, 1, 2]
    # ASE's reader would return the structures without their energies and forces: refused
    from atomlens.data.sources.ase_files import read_ase

    for kwargs in ({}, {"format": "db"}):
        with pytest.raises(DataError, match=r"copy\.db: an ISO17-layout database.*read_iso17"):
            read_ase(tmp_path / "copy.db", **kwargs)


def test_iso17_errors(tmp_path):
    from atomlens.data.sources.iso17 import read_iso17

    _write_iso17_db(tmp_path / "noforces.db", drop_forces=True)
    with pytest.raises(DataError, match=r"noforces\.db: row 1 has no data\['atomic_forces'\]"):
        read_iso17(tmp_path / "noforces.db")
    (tmp_path / "junk.db").write_bytes(b"SQLite format 3\x00" + b"\x01" * 300)
    with pytest.raises(DataError, match=r"junk\.db"):
        read_iso17(tmp_path / "junk.db")
    with pytest.raises(DataError, match="not found"):
        read_iso17(tmp_path / "absent.db")
    assert not (tmp_path / "absent.db").exists()


# ---------------------------------------------------------------------------------- ASE files
def test_extxyz_roundtrip(tmp_path):
    from atomlens.data.sources import read_any
    from atomlens.data.sources.ase_files import read_ase, write_ase

    z, R, E, F = _water_frames(3)
    data = PackedDataset.from_structures(
        [(z, r) for r in R],
        {"energy": E / 23.06, "forces": list(F / 23.06)},
        {"energy": "eV", "forces": "eV/Angstrom"},
    )
    path = write_ase(tmp_path / "water.extxyz", data)
    back = read_ase(path)
    np.testing.assert_allclose(back.targets["energy"], data.targets["energy"], rtol=1e-10)
    np.testing.assert_allclose(back.targets["forces"], data.targets["forces"], atol=1e-7)
    np.testing.assert_allclose(back.positions, data.positions, atol=1e-7)
    # the file states its units: a contradicting declaration is refused
    with pytest.raises(DataError, match="says its energy unit is 'eV' but 'kcal/mol'"):
        read_any(path, energy_unit="kcal/mol")
    # a file without units is refused unless they are declared, and then converted
    import ase.io

    frames = ase.io.read(path, ":")
    for atoms in frames:
        del atoms.info["energy_unit"], atoms.info["length_unit"]
    ase.io.write(tmp_path / "plain.extxyz", frames)
    with pytest.raises(DataError, match="does not state their unit"):
        read_any(tmp_path / "plain.extxyz")
    scaled = read_any(tmp_path / "plain.extxyz", energy_unit="kcal/mol", length_unit="nm")
    np.testing.assert_allclose(scaled.positions, 10 * back.positions)
    np.testing.assert_allclose(
        scaled.targets["forces"], back.targets["forces"] / 23.060548 / 10, rtol=1e-6
    )
    write_ase(tmp_path / "water.db", data)
    np.testing.assert_allclose(
        read_any(tmp_path / "water.db").targets["energy"], data.targets["energy"]
    )
    # an ASE trajectory holds ASE's units by the format's definition (atomlens md writes
    # them): read as eV and Angstrom; a contradicting declaration is refused
    ase.io.write(tmp_path / "md.traj", frames)
    traj = read_any(tmp_path / "md.traj")
    np.testing.assert_allclose(traj.targets["energy"], back.targets["energy"], rtol=1e-10)
    assert traj.units["energy"] == "eV"
    with pytest.raises(DataError, match="kcal/mol"):
        read_any(tmp_path / "md.traj", energy_unit="kcal/mol")


def test_ase_file_errors(tmp_path):
    from atomlens.data.sources.ase_files import read_ase

    good = "3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n"
    (tmp_path / "cut.xyz").write_text(good + good[:30])
    with pytest.raises(DataError, match=r"cut\.xyz"):
        read_ase(tmp_path / "cut.xyz")
    (tmp_path / "alien.xyz").write_text(good.replace("O 0.0", "Qq 0.0"))
    with pytest.raises(DataError, match=r"alien\.xyz"):
        read_ase(tmp_path / "alien.xyz")
    (tmp_path / "nan.xyz").write_text(good.replace("0.96", "nan"))
    with pytest.raises(DataError, match=r"nan\.xyz.*NaN"):
        read_ase(tmp_path / "nan.xyz")
    (tmp_path / "clash.xyz").write_text(good.replace("0.96", "0.01"))
    with pytest.raises(DataError, match=r"clash\.xyz.*overlapping"):
        read_ase(tmp_path / "clash.xyz")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(DataError, match=r"empty\.xyz"):
        read_ase(tmp_path / "empty.xyz")
    with pytest.raises(DataError, match="not found"):
        read_ase(tmp_path / "absent.xyz")
    assert len(read_ase(tmp_path / "cut.xyz", index=0)) == 1  # the intact first frame


# ------------------------------------------------------------- units and values at the edge
def test_structures_in_bohr_are_converted_to_angstrom_where_they_are_read(tmp_path):
    """A file that states length_unit=bohr reaches every structure command in Angstrom:
    positions, cell, the forces and stress of its frames; MD and potential maps had taken
    its coordinates as Angstrom (an O-H bond of 1.81 "Angstrom")."""
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from atomlens.data.sources.ase_files import read_structures
    from atomlens.units import BOHR_ANGSTROM

    water = molecule("H2O")
    water.cell = [8.0, 8.0, 8.0]
    forces = np.arange(9.0).reshape(3, 3)
    in_bohr = water.copy()
    in_bohr.positions /= BOHR_ANGSTROM
    in_bohr.cell = water.cell.array / BOHR_ANGSTROM
    in_bohr.info.update(length_unit="bohr", energy_unit="eV")
    in_bohr.calc = SinglePointCalculator(in_bohr, energy=-2.0, forces=forces)
    write(tmp_path / "bohr.extxyz", in_bohr)
    (atoms,) = read_structures(tmp_path / "bohr.extxyz")
    np.testing.assert_allclose(atoms.positions, water.positions, atol=1e-7)
    np.testing.assert_allclose(atoms.cell.array, water.cell.array, atol=1e-7)
    assert atoms.info["length_unit"] == "Angstrom"
    assert atoms.get_potential_energy() == -2.0
    np.testing.assert_allclose(atoms.get_forces(), forces / BOHR_ANGSTROM)
    write(tmp_path / "angstrom.extxyz", atoms)  # and reads back as data, as stated
    data = read_any(tmp_path / "angstrom.extxyz")
    np.testing.assert_allclose(data.targets["forces"], forces / BOHR_ANGSTROM, rtol=1e-6)


def test_units_declared_for_data_that_record_theirs_must_be_theirs(tmp_path):
    """A packed folder records its units: a declaration that disagrees is refused (it was
    ignored: --energy-unit bogus --length-unit nm ran and scored)."""
    from atomlens.data.sources.open import open_dataset

    _write_iso17_db(tmp_path / "iso.db")
    read_any(tmp_path / "iso.db").save(tmp_path / "packed")
    assert len(open_dataset(str(tmp_path / "packed"), energy_unit="eV", length_unit="Ang")) == 3
    with pytest.raises(DataError, match="'nm' was declared.*record their units"):
        open_dataset(str(tmp_path / "packed"), length_unit="nm")
    with pytest.raises(DataError, match="'kcal/mol' was declared"):
        open_dataset(str(tmp_path / "packed"), energy_unit="kcal/mol")
    with pytest.raises(DataError, match="unknown energy unit 'bogus'"):
        open_dataset(str(tmp_path / "packed"), energy_unit="bogus")


def test_nan_coordinates_with_energies_are_named_as_such(tmp_path):
    """NaN positions in a frame with an energy: said as non-finite coordinates (NaN != NaN
    had made ASE's staleness test blame a calculator shared by several frames)."""
    path = tmp_path / "nan.xyz"
    path.write_text("2\nProperties=species:S:1:pos:R:3 energy=-1.0\nC nan 0 0\nH 0 0 1\n")
    with pytest.raises(DataError, match=r"non-finite \(NaN/inf\) coordinates"):
        read_any(path, energy_unit="eV")


def test_qm9_rows_whose_miscounts_cancel_are_refused(tmp_path):
    """Each row's Elements and XYZ_Ang must match its own N_atoms: a row listing one atom
    too many beside one listing one too few (the totals agree) had read NH3 as H2NO."""

    def shift(lines):
        lines[1] = lines[1].replace("'C','H','H','H','H'", "'C','H','H','H','H','N'")
        lines[2] = lines[2].replace("'N','H','H','H'", "'H','H','H'")
        return lines

    with pytest.raises(DataError, match=r"broken\.csv:2: N_atoms is 5 but Elements lists 6"):
        read_qm9_csv(_rewrite(tmp_path, shift))


def test_iso17_databases_in_other_units_or_with_text_energies_are_refused(tmp_path):
    """The ISO17 layout is eV and Angstrom: metadata stating other units are refused (they
    were read as eV and Angstrom), and so is an energy that is no real number."""
    from ase import Atoms
    from ase.db import connect

    from atomlens.data.sources.iso17 import read_iso17

    _write_iso17_db(tmp_path / "kcal.db")
    connect(str(tmp_path / "kcal.db")).metadata = {"energy_unit": "kcal/mol"}
    with pytest.raises(DataError, match="metadata state energy_unit='kcal/mol'"):
        read_iso17(tmp_path / "kcal.db")
    with connect(str(tmp_path / "text.db")) as db:
        db.write(
            Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]),
            data={"atomic_forces": np.zeros((2, 3))},
            total_energy="abc",
        )
    with pytest.raises(DataError, match="total_energy must be a real number, not 'abc'"):
        read_iso17(tmp_path / "text.db")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("E", np.array(["a", "b", "c", "d"]), "E must hold real numbers"),
        ("E", np.array([True, False, True, False]), "E must hold real numbers, not dtype bool"),
        ("R", None, "R must hold real numbers, not dtype complex"),
        ("F", np.full((4, 3, 3), "x"), "F must hold real numbers"),
        ("R", np.float64(1.0), r"R has shape \(\), expected \(frames, 3, 3\)"),
    ],
)
def test_md17_arrays_that_are_no_real_numbers_are_refused(tmp_path, key, value, match):
    """Text, bools (read as 1/0), complex values (imaginary part dropped) and a 0-d R are
    refused by name (an IndexError traceback or a bare conversion error before)."""
    from atomlens.data.sources.md17 import read_md17

    z, R, E, F = _water_frames()
    arrays = {"z": z, "R": R, "E": E, "F": F}
    arrays[key] = R.astype(complex) if value is None else value
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        read_md17(tmp_path / "bad.npz", assume_md17_units=True)
