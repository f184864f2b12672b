"""MD with a float32 model keeps a float64 state: far from the origin, long runs, large totals.

A float32 coordinate of 1e4 Angstrom is kept to 1e-3 Angstrom, the size of an MD step's
displacement, and a float32 total energy of thousands of eV to a few meV. BatchedMD
integrates in float64 and gives the model positions relative to each trajectory's first
atom; both it and the ASE calculator sum per-atom energies in float64.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule
from helpers import random_model

from atomlens.batched_md import BatchedMD
from atomlens.calculator import Calculator

FAR = np.array([1.0e4, -2.0e4, 5.0e3])  # Angstrom


pytestmark = pytest.mark.usefixtures("one_thread")


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    return atoms


def _far(atoms):
    far = atoms.copy()
    far.positions += FAR
    return far


@pytest.mark.parametrize("compile", [False, True])
def test_batched_md_far_from_the_origin_follows_the_same_trajectory(compile):
    model = random_model("schnet", seed=2).float()
    near = _ethanol()
    md = BatchedMD(model, [near, _far(near)], temperature_K=300, compile=compile, seed=0)
    assert md.positions.dtype == torch.float64 and md.momenta.dtype == torch.float64
    n = len(near)
    start = md.atoms(0)
    md.momenta[n:] = md.momenta[:n]  # the same velocities in both
    forces = md.forces.numpy()
    # float32 model, differences taken in float64: the same forces to float32 rounding
    # (a float32 state far away: errors of ~1e-3 Angstrom in every difference)
    np.testing.assert_allclose(forces[n:], forces[:n], rtol=0, atol=2e-5 * np.abs(forces).max())
    md.run(40)
    near_now, far_now = md.atoms(0), md.atoms(1)
    assert np.abs(near_now.positions - start.positions).max() > 1e-3  # it moved
    # each step's displacement is kept to float64's spacing at 2e4 Angstrom (4e-12)
    np.testing.assert_allclose(far_now.positions - FAR, near_now.positions, rtol=0, atol=1e-5)
    assert md.energies.dtype == torch.float64
    assert float(md.energies[1]) == pytest.approx(float(md.energies[0]), abs=2e-3)


def test_batched_md_sums_energies_in_float64():
    model = random_model("schnet", seed=2).float()  # atom references of DFT's scale
    atoms = _ethanol()
    md = BatchedMD(model, [atoms], temperature_K=0, compile=False)
    with torch.no_grad():
        atomic = model.atomic_energies(md.numbers, md._model_positions(), *_all_pairs(md))
    total = float(atomic.double().sum())
    assert abs(total) > 1000  # float32's spacing there: 1.2e-4 eV and more
    assert float(md.energies[0]) == pytest.approx(total, rel=0, abs=1e-9)


def _all_pairs(md):
    from atomlens.data.batch import Pairs
    from atomlens.data.neighbors import molecular_pairs

    i, j = molecular_pairs(md.n_atoms_per, md.positions, md.cutoff)
    return (Pairs(i, j, None, True),)


@pytest.mark.parametrize("compile", [False, True])
def test_calculator_sums_energies_in_float64(compile):
    model = random_model("schnet", seed=2).float()
    atoms = _ethanol()
    atoms.calc = Calculator(model, compile=compile)
    energy = atoms.get_potential_energy()
    atomic = atoms.calc.results["energies"]  # float32 values, as float64
    assert abs(energy) > 1000
    assert energy == pytest.approx(atomic.sum(), rel=0, abs=1e-9)
