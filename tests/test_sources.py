"""Readers: QM9 CSV, MD17 npz, ISO17 db, ASE files; units converted, bad input refused."""

from pathlib import Path

import numpy as np
import pytest

from atomlens import units
from atomlens.data import DataError, PackedDataset
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
