"""The dipole output (models/dipole.py): latent charges that sum to the total charge, a
dipole vector that rotates with the molecule, a norm independent of the origin, the
e*Angstrom -> debye conversion, and ``train --target mu`` with charges in the outputs."""

import numpy as np
import pytest
import torch
from helpers import qm9_sample, random_model, tiny_train_config
from scipy.spatial.transform import Rotation

from atomlens import units


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


@pytest.fixture(scope="module")
def model():
    return random_model(
        "schnet", seed=3, output="dipole", target="mu", unit="Debye", aggregation="mean"
    ).eval()


def _batch(data, model, idx, rotation=None, translation=None):
    batch = data.batch(idx, model.cutoff, torch.float64)
    positions = batch.positions
    if rotation is not None:
        positions = positions @ torch.as_tensor(rotation).T
    if translation is not None:
        positions = positions + torch.as_tensor(translation)
    batch.positions = positions
    return batch


def test_conversion_constant():
    # 1 D = 1e-21 / c C m; e * 1 Angstrom = 1.602176634e-29 C m -> 4.80320 D (CODATA)
    debye_coulomb_metre = 1e-21 / 299792458.0
    assert units.E_ANGSTROM_DEBYE == pytest.approx(1.602176634e-29 / debye_coulomb_metre, rel=1e-7)


def test_charges_sum_to_the_total_charge_and_give_the_dipole(data, model):
    idx = np.arange(6)
    batch = _batch(data, model, idx)
    out = model(batch)
    charges = out["charges"].detach().numpy()
    index = batch.structure_index.numpy()
    np.testing.assert_allclose(np.bincount(index, charges), 0.0, atol=1e-9)
    assert np.abs(charges).max() > 1e-3  # not trivially zero
    # mu = c sum_i q_i r_i, written here from the equation
    positions = batch.positions.numpy()
    expected = np.stack([np.bincount(index, charges * positions[:, a]) for a in range(3)], 1)
    expected *= 4.80320471
    np.testing.assert_allclose(out["dipole"].detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        out["mu"].detach().numpy(), np.linalg.norm(expected, axis=1), rtol=1e-6
    )
    # a charged molecule: the correction spreads the excess evenly over its atoms
    batch.targets["total_charge"] = torch.tensor([1.0, 0, -1, 0, 2, 0], dtype=torch.float64)
    charged = model(batch)["charges"].detach().numpy()
    np.testing.assert_allclose(np.bincount(index, charged), [1, 0, -1, 0, 2, 0], atol=1e-9)
    shift = (charged - charges)[index == 0]
    np.testing.assert_allclose(shift, 1.0 / np.sum(index == 0))


def test_dipole_rotates_with_the_molecule_and_ignores_the_origin(data, model):
    idx = np.arange(4)
    rotation = Rotation.random(random_state=1).as_matrix()
    reference = model(_batch(data, model, idx))
    rotated = model(_batch(data, model, idx, rotation=rotation))
    np.testing.assert_allclose(
        rotated["dipole"].detach().numpy(),
        reference["dipole"].detach().numpy() @ rotation.T,
        atol=1e-9,
    )
    moved = model(_batch(data, model, idx, translation=[3.0, -7.0, 11.0]))
    np.testing.assert_allclose(
        moved["mu"].detach().numpy(), reference["mu"].detach().numpy(), rtol=1e-9
    )
    with pytest.raises(ValueError, match="no forces"):
        model(_batch(data, model, idx), forces=True)


def test_train_mu_predicts_charges(tmp_path, data, capsys):
    from atomlens.cli import main
    from atomlens.models import load_model
    from atomlens.training import train_model as train

    config = tiny_train_config(tmp_path / "run", width=16, target="mu")
    metrics = train(config, data=data)
    assert np.isfinite(metrics["mu_mae"]) and metrics["unit"] == "Debye"
    model = load_model(tmp_path / "run")
    assert model.config.output == "dipole" and float(model.scale) == 1.0
    atoms = data.atoms(0)
    path = tmp_path / "m.xyz"
    atoms.write(path)
    assert (
        main(["predict", str(tmp_path / "run"), str(path), "--out", str(tmp_path / "out.extxyz")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "dipole" in printed and "charges (e)" in printed
    import ase.io

    written = ase.io.read(tmp_path / "out.extxyz")
    assert abs(written.arrays["atomlens_charges"].sum()) < 1e-5
    dipole = written.info["atomlens_dipole"]
    assert np.linalg.norm(dipole) == pytest.approx(written.info["atomlens_mu"], rel=1e-5)


def test_insight_prints_charges_beside_atomic_energies(tmp_path, data, model, capsys):
    import json

    from atomlens.cli import main
    from atomlens.insight import atomic_energies
    from atomlens.models.io import save_model

    save_model(model, tmp_path / "dipole")
    save_model(random_model("schnet", seed=1), tmp_path / "energy")
    path = tmp_path / "m.xyz"
    data.atoms(2).write(path)
    assert (
        main(
            [
                "insight",
                "atomic-energies",
                str(tmp_path / "energy"),
                str(path),
                "--charges",
                str(tmp_path / "dipole"),
                "--json",
            ]
        )
        == 0
    )
    (table,) = json.loads(capsys.readouterr().out)
    charges = [row["charge"] for row in table["atoms"]]
    assert len(charges) == len(data.atoms(2)) and abs(sum(charges)) < 1e-9
    expected = model.predict(data.atoms(2))["charges"]
    np.testing.assert_allclose(charges, expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="not partial charges"):
        atomic_energies(model, data.atoms(2), charge_model=random_model("schnet"))


def test_a_dipole_model_refuses_forces_and_stress(data, model):
    batch = _batch(data, model, [0, 1])
    with pytest.raises(ValueError, match="^a dipole model predicts no forces or stress$"):
        model(batch, forces=True)
    with pytest.raises(ValueError, match=r"^stress needs structures with a cell \(periodic"):
        model(batch, stress=True)  # molecules: no cell
