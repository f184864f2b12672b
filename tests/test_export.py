"""Export: the saved energy-and-forces program runs with plain torch and matches the model."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import molecule

from atomlens.calculator import Calculator
from atomlens.export import all_ordered_pairs, export_model, read_description
from atomlens.models import build_model
from atomlens.nn import ShiftedSoftplus

REPS = {
    "schnet": {
        "n_atom_basis": 16,
        "n_interactions": 2,
        "n_filters": 16,
        "n_rbf": 10,
        "cutoff": 4.0,
    },
    "dtnn": {
        "n_atom_basis": 8,
        "n_interactions": 2,
        "n_factors": 8,
        "n_rbf": 10,
        "cutoff": 4.0,
        "rbf_stop": 4.0,
    },
}


def energy_model(rep: str):
    torch.manual_seed(0)
    model = build_model(
        {
            "representation": rep,
            "representation_kwargs": REPS[rep],
            "head_hidden": 8,
            "target": "energy",
        }
    )
    atomref = np.zeros(101)
    atomref[[1, 6, 8]] = [-13.6, -1029.0, -2042.0]
    model.set_statistics(atomref, shift=-0.3, scale=0.7)
    return model.eval()


def test_all_ordered_pairs():
    i, j = all_ordered_pairs(4)
    pairs = {(int(a), int(b)) for a, b in zip(i, j)}
    assert len(i) == 12 and pairs == {(a, b) for a in range(4) for b in range(4) if a != b}


@pytest.mark.parametrize("rep", ["schnet", "dtnn"])
def test_exported_program_matches_the_model_without_atomlens(tmp_path, rep):
    model = energy_model(rep)
    path = export_model(model, tmp_path / "model.pt2")
    assert read_description(path)["outputs"]["forces"].endswith("eV/Angstrom")
    # a molecule of another size than the traced one, larger than the cutoff (5.x Angstrom)
    atoms = molecule("CH3CH2OCH3")
    calc = Calculator(model)
    reference_energy = calc.get_potential_energy(atoms)
    reference_forces = calc.get_forces(atoms)
    np.save(tmp_path / "positions.npy", atoms.positions.astype(np.float32))
    np.save(tmp_path / "numbers.npy", atoms.numbers.astype(np.int64))
    # a fresh interpreter that never imports atomlens
    script = (
        "import sys, numpy as np, torch\n"
        f"d = {str(tmp_path)!r}\n"
        "program = torch.export.load(d + '/model.pt2').module()\n"
        "e, f = program(torch.from_numpy(np.load(d + '/positions.npy')),"
        " torch.from_numpy(np.load(d + '/numbers.npy')))\n"
        "np.save(d + '/forces.npy', f.numpy()); np.save(d + '/energy.npy', e.numpy())\n"
        "assert not any(m.startswith('atomlens') for m in sys.modules)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""},
    )
    energy, forces = np.load(tmp_path / "energy.npy"), np.load(tmp_path / "forces.npy")
    assert float(energy) == pytest.approx(reference_energy, abs=2e-3)  # float32 of ~-3000 eV
    np.testing.assert_allclose(forces, reference_forces, atol=2e-4)


def test_shifted_softplus_scripts():
    scripted = torch.jit.script(ShiftedSoftplus())
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(scripted(x), torch.nn.functional.softplus(x) - np.log(2.0))
