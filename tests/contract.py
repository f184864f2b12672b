"""The contract every representation meets, as a test class each model inherits.

A new model adds one class to ``tests/test_contract.py``::

    class TestMyModel(RepresentationContract):
        representation = "mymodel"
        kwargs = {"n_atom_basis": 16, "cutoff": 4.0}

and is then checked for: invariance under rotation, translation and permutation; forces
equal to minus the finite-difference gradient and stress equal to the finite-difference
strain derivative (float64), for molecules and for periodic cells, a cell smaller than twice
the cutoff included; periodic energies against a brute-force sum over images; invariance
under wrapping atoms into the cell and under the choice of an equivalent cell; exact
supercell extensivity; a molecule in a large box equal to the free molecule; a structure
alone equal to the same structure in a mixed batch; and a save/load round trip.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from atomlens.data.batch import Pairs
from atomlens.models import build_model, load_model, save_model


def silicon_primitive(seed: int = 0) -> Atoms:
    """Two-atom diamond Si: cell vectors of 3.84 Angstrom, below twice any test cutoff."""
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.1, seed=seed)
    return atoms


def water_box(seed: int = 0) -> Atoms:
    """Four water molecules in a 6 Angstrom cubic cell, molecules crossing the boundary."""
    rng = np.random.default_rng(seed)
    atoms = Atoms(cell=[6.0, 6.0, 6.0], pbc=True)
    for k in range(4):
        w = molecule("H2O")
        w.rotate(rng.uniform(0, 360), rng.normal(size=3))
        w.translate([(k % 2) * 3.0 + 2.2, (k // 2) * 3.0 + 1.7, 1.5 + k * 1.2])
        atoms += w
    return atoms


def ethanol(seed: int = 0) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def numerical_forces(energy, atoms: Atoms, h: float = 1e-5) -> np.ndarray:
    forces = np.zeros((len(atoms), 3))
    for a, x in itertools.product(range(len(atoms)), range(3)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, x] += h
        minus.positions[a, x] -= h
        forces[a, x] = -(energy(plus) - energy(minus)) / (2 * h)
    return forces


def numerical_stress(energy, atoms: Atoms, h: float = 1e-6) -> np.ndarray:
    """sigma_xy = (1/V) dE/d eps_xy, deforming positions and cell by (1 + eps)."""
    stress = np.zeros((3, 3))
    for x, y in itertools.product(range(3), range(3)):
        values = []
        for sign in (1, -1):
            deformation = np.eye(3)
            deformation[x, y] += sign * h
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
            values.append(energy(strained))
        stress[x, y] = (values[0] - values[1]) / (2 * h * atoms.get_volume())
    return stress


def brute_force_pairs(atoms: Atoms, cutoff: float, reach: int = 3) -> Pairs:
    """Every directed pair (i, j, image) within the cutoff, by looping over images."""
    i_list, j_list, shifts = [], [], []
    cell = atoms.cell.array
    for n in itertools.product(range(-reach, reach + 1), repeat=3):
        shift = np.asarray(n) @ cell
        for i, j in itertools.product(range(len(atoms)), repeat=2):
            if i == j and n == (0, 0, 0):
                continue
            if np.linalg.norm(atoms.positions[j] - atoms.positions[i] + shift) < cutoff:
                i_list.append(i)
                j_list.append(j)
                shifts.append(shift)
    return Pairs(
        torch.tensor(i_list),
        torch.tensor(j_list),
        torch.tensor(np.array(shifts), dtype=torch.float64),
        symmetric=False,
    )


class RepresentationContract:
    """Inherit and set ``representation`` and ``kwargs`` (a cutoff below 3.84 * 2 Angstrom)."""

    representation: str
    kwargs: dict

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        torch.manual_seed(0)
        model = build_model(
            {
                "representation": cls.representation,
                "representation_kwargs": cls.kwargs,
                "head_hidden": 8,
                "target": "energy",
            }
        ).double()
        atomref = np.zeros(101)
        atomref[[1, 8, 14]] = [-13.6, -2042.0, -100.0]
        model.set_statistics(atomref, shift=-0.3, scale=0.7)
        return model.eval()

    @staticmethod
    def energy(model, atoms: Atoms) -> float:
        return float(model.predict(atoms)["energy"][0])

    # -------------------------------------------------------------- invariances
    def test_rotation_translation_permutation(self, model):
        atoms = ethanol()
        out = model.predict(atoms, forces=True)
        moved = atoms.copy()
        moved.rotate(37, (1, 2, 3), center="COM")
        moved.translate((1.0, -2.0, 0.5))
        rotation = np.linalg.lstsq(
            atoms.positions - atoms.positions.mean(0),
            moved.positions - moved.positions.mean(0),
            rcond=None,
        )[0]
        order = np.random.default_rng(0).permutation(len(atoms))
        moved = moved[order]
        out2 = model.predict(moved, forces=True)
        assert out2["energy"][0] == pytest.approx(out["energy"][0], abs=1e-9)
        np.testing.assert_allclose(out2["forces"], (out["forces"] @ rotation)[order], atol=1e-9)
        np.testing.assert_allclose(out2["atomic"], out["atomic"][order], atol=1e-9)

    def test_periodic_rotation_wrap_and_equivalent_cell(self, model):
        atoms = water_box()
        reference = model.predict(atoms, forces=True, stress=True)
        shifted = atoms.copy()
        shifted.positions += (2.5, -1.0, 7.0)  # out of the cell, then wrapped back
        wrapped = shifted.copy()
        wrapped.wrap()
        for other in (shifted, wrapped):
            assert self.energy(model, other) == pytest.approx(reference["energy"][0], abs=1e-9)
        rotated = atoms.copy()
        rotation = torch.linalg.qr(
            torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        )[0].numpy()
        rotation *= np.sign(np.linalg.det(rotation))
        rotated.set_cell(atoms.cell.array @ rotation.T)
        rotated.positions = atoms.positions @ rotation.T
        out = model.predict(rotated, forces=True, stress=True)
        assert out["energy"][0] == pytest.approx(reference["energy"][0], abs=1e-9)
        np.testing.assert_allclose(out["forces"], reference["forces"] @ rotation.T, atol=1e-9)
        np.testing.assert_allclose(
            out["stress"][0], rotation @ reference["stress"][0] @ rotation.T, atol=1e-10
        )
        silicon = silicon_primitive()
        sheared = silicon.copy()  # the same lattice from another basis (unimodular change)
        sheared.set_cell(np.array([[1, 1, 0], [0, 1, 0], [0, -1, 1]]) @ silicon.cell.array)
        assert self.energy(model, sheared) == pytest.approx(self.energy(model, silicon), abs=1e-9)

    # -------------------------------------------------------------- periodic images
    def test_periodic_energy_equals_brute_force_sum_over_images(self, model):
        for atoms in (silicon_primitive(), water_box()):
            numbers = torch.as_tensor(atoms.numbers)
            positions = torch.as_tensor(atoms.positions)
            pairs = brute_force_pairs(atoms, model.cutoff)
            with torch.no_grad():
                expected = model.atomic_energies(numbers, positions, pairs)
            np.testing.assert_allclose(model.predict(atoms)["atomic"], expected.numpy(), atol=1e-10)

    def test_supercell_is_extensive(self, model):
        for atoms in (silicon_primitive(), water_box()):
            energy = self.energy(model, atoms)
            for repeat in ((2, 1, 1), (2, 2, 1)):
                n = int(np.prod(repeat))
                assert self.energy(model, atoms.repeat(repeat)) == pytest.approx(
                    n * energy, abs=1e-8 * n
                )

    def test_molecule_in_a_large_box_is_the_free_molecule(self, model):
        atoms = ethanol()
        boxed = atoms.copy()
        boxed.set_cell([20.0, 21.0, 22.0])
        boxed.center()
        boxed.pbc = True
        assert self.energy(model, boxed) == pytest.approx(self.energy(model, atoms), abs=1e-10)
        np.testing.assert_allclose(
            model.predict(boxed, forces=True)["forces"],
            model.predict(atoms, forces=True)["forces"],
            atol=1e-10,
        )

    # -------------------------------------------------------------- derivatives
    @pytest.mark.parametrize("name", ["ethanol", "silicon_primitive", "water_box"])
    def test_forces_are_minus_the_finite_difference_gradient(self, model, name):
        atoms = {
            "ethanol": ethanol,
            "silicon_primitive": silicon_primitive,
            "water_box": water_box,
        }[name]()
        forces = model.predict(atoms, forces=True)["forces"]
        expected = numerical_forces(lambda a: self.energy(model, a), atoms)
        np.testing.assert_allclose(forces, expected, atol=1e-6 * max(1, np.abs(expected).max()))

    @pytest.mark.parametrize("name", ["silicon_primitive", "water_box"])
    def test_stress_is_the_finite_difference_strain_derivative(self, model, name):
        atoms = {"silicon_primitive": silicon_primitive, "water_box": water_box}[name]()
        stress = model.predict(atoms, stress=True)["stress"][0]
        expected = numerical_stress(lambda a: self.energy(model, a), atoms)
        np.testing.assert_allclose(stress, expected, atol=1e-6 * max(1, np.abs(expected).max()))
        np.testing.assert_allclose(stress, stress.T, atol=1e-12)

    # -------------------------------------------------------------- batches and files
    def test_alone_equals_in_a_mixed_batch(self, model):
        structures = [ethanol(), silicon_primitive(), water_box(), ethanol(seed=1)]
        together = model.predict(structures, forces=True, stress=True)
        start = 0
        for k, atoms in enumerate(structures):
            alone = model.predict(atoms, forces=True, stress=atoms.pbc.any())
            n = len(atoms)
            assert together["energy"][k] == pytest.approx(alone["energy"][0], abs=1e-9)
            np.testing.assert_allclose(
                together["forces"][start : start + n], alone["forces"], atol=1e-9
            )
            if atoms.pbc.any():
                np.testing.assert_allclose(together["stress"][k], alone["stress"][0], atol=1e-10)
            else:
                assert not together["stress"][k].any()  # no cell, no stress
            start += n

    def test_save_load_round_trip(self, model, tmp_path):
        save_model(model, tmp_path / "model")
        loaded = load_model(tmp_path / "model")
        assert loaded.config == model.config
        for atoms in (ethanol(), water_box()):
            a = model.predict(atoms, forces=True)
            b = loaded.predict(atoms, forces=True)
            assert b["energy"][0] == a["energy"][0]
            np.testing.assert_array_equal(b["forces"], a["forces"])
