"""Settings of the calculators and of batched MD are refused when they would give wrong
numbers (a negative or NaN skin, a half precision, one model twice in an ensemble), dtype
names are understood alike everywhere, and a bad input is no compile failure."""

import copy
import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from helpers import random_model

import atomlens
from atomlens.batched_md import BatchedMD
from atomlens.data import DataError
from atomlens.ensemble import EnsembleCalculator, load_ensemble
from atomlens.md import run_md
from atomlens.models import save_model
from atomlens.models.io import load_model, parse_dtype


@pytest.fixture
def model():
    return random_model("schnet")  # float64


def in_float32(model):
    """A float32 copy (``Module.float()`` converts in place)."""
    return copy.deepcopy(model).float()


@pytest.mark.parametrize("skin", [float("nan"), -3.0, -2, float("inf"), "0.3", None])
def test_a_skin_that_is_no_finite_number_at_least_zero_is_refused(model, skin):
    with pytest.raises(ValueError, match="skin must be a finite number >= 0"):
        atomlens.Calculator(model, compile=False, skin=skin)
    with pytest.raises(ValueError, match="skin must be a finite number >= 0"):
        BatchedMD(model, [molecule("H2O")], compile=False, skin=skin)


def test_a_skin_of_zero_or_more_gives_the_same_results(model):
    cell = bulk("C", cubic=True)
    energies = []
    for skin in (0, 0.3, np.float64(1.0)):
        cell.calc = atomlens.Calculator(model, compile=False, skin=skin)
        energies.append(cell.get_potential_energy())
    np.testing.assert_allclose(energies, energies[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 0.0])
def test_batched_md_refuses_a_timestep_that_is_no_positive_number(model, bad):
    with pytest.raises(ValueError, match="need finite timestep_fs > 0"):
        BatchedMD(model, [molecule("H2O")], compile=False, timestep_fs=bad)
    with pytest.raises(ValueError, match="need finite timestep_fs > 0"):
        BatchedMD(model, [molecule("H2O")], compile=False, friction=float("nan"))


def test_ensembles_refuse_different_targets_and_one_model_twice(model, tmp_path):
    energy = random_model("schnet", seed=1, target="energy")
    u0 = random_model("schnet", seed=2, target="U0")
    with pytest.raises(ValueError, match="predict different things"):
        EnsembleCalculator([energy, u0], compile=False)
    save_model(in_float32(model), tmp_path / "m32")
    twice = [[model, model], [str(tmp_path / "m32"), model], [model, in_float32(model)]]
    for members in twice:
        with pytest.raises(ValueError, match="given twice"):
            EnsembleCalculator(members, compile=False)
        with pytest.raises(ValueError, match="given twice"):
            BatchedMD(members, [molecule("H2O")], compile=False)
    save_model(model, tmp_path / "copy")  # a copy of the folder: the same model too
    with pytest.raises(ValueError, match="given twice"):
        load_ensemble([tmp_path / "m32", tmp_path / "copy"])
    other = random_model("schnet", seed=3)
    calc = EnsembleCalculator([model, other], compile=False)  # two models: fine
    assert calc.get_potential_energy(molecule("H2O")) != 0.0
    assert calc.results["energy_std"] > 0.0


def test_parse_dtype_accepts_float32_and_float64_by_any_name():
    for name in (torch.float32, "float32", "float", np.float32, np.dtype("float32")):
        assert parse_dtype(name) is torch.float32
    for name in (torch.float64, "float64", "double", np.float64, np.dtype("float64")):
        assert parse_dtype(name) is torch.float64
    assert parse_dtype(None) is None
    for bad in (torch.bfloat16, torch.float16, "float16", "half", np.float16, np.int32, "f", 3):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            parse_dtype(bad)


def test_every_entry_point_reads_dtypes_alike(model, tmp_path):
    folder = save_model(model, tmp_path / "m64")
    atoms = molecule("CH3CH2OH")
    water = [molecule("H2O")]
    other = random_model("schnet", seed=3)
    for name, dtype in (("double", torch.float64), (np.float32, torch.float32)):
        assert atomlens.Calculator(model, compile=False, dtype=name).dtype == dtype
        assert next(load_model(folder, dtype=name).parameters()).dtype == dtype
        assert BatchedMD(model, water, compile=False, dtype=name).dtype == dtype
        ensemble = EnsembleCalculator([model, other], compile=False, dtype=name)
        assert {member.dtype for member in ensemble.members} == {dtype}
    assert next(load_model(folder, dtype="float32").parameters()).dtype == torch.float32
    for bad in (torch.bfloat16, "float16"):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            atomlens.Calculator(model, compile=False, dtype=bad)
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            load_model(folder, dtype=bad)
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            BatchedMD(model, water, compile=False, dtype=bad)
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            EnsembleCalculator([model, other], compile=False, dtype=bad)
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            run_md(model, atoms, steps=1, dtype=bad, compile=False)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):  # a model's own
        atomlens.Calculator(copy.deepcopy(model).to(torch.bfloat16), compile=False)


def test_batched_md_keeps_the_models_own_precision(model, tmp_path):
    """dtype=None keeps the model's (or saved folder's) precision, as the Calculator does."""
    water = [molecule("H2O")]
    folder = save_model(model, tmp_path / "m64")
    assert BatchedMD(model, water, compile=False).dtype == torch.float64
    assert BatchedMD(folder, water, compile=False).dtype == torch.float64
    assert BatchedMD(in_float32(model), water, compile=False).dtype == torch.float32
    assert atomlens.Calculator(folder, compile=False).dtype == torch.float64
    mixed = BatchedMD([in_float32(model), random_model("schnet", seed=3)], water, compile=False)
    assert mixed.dtype == torch.float64  # an ensemble: the widest of its members
    assert {next(m.parameters()).dtype for m in mixed.models} == {torch.float64}


def test_a_bad_input_is_raised_as_such_and_keeps_compiling_on(model, monkeypatch):
    """compile="auto": a flat cell raises its ValueError as the eager path does, without a
    "compiling failed" warning, and the next good cell runs compiled again."""
    from atomlens import calculator

    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    compiled = []

    def fake_compile(function, device, mode=None):  # the compiled path, without compiling
        compiled.append(function)
        return function

    monkeypatch.setattr(calculator, "compile_fixed_shapes", fake_compile)
    atoms = bulk("C", cubic=True)
    atoms.rattle(0.02, seed=1)
    eager = atomlens.Calculator(model, compile=False)
    reference = eager.get_potential_energy(atoms)
    atoms.calc = atomlens.Calculator(model)
    assert atoms.get_potential_energy() == pytest.approx(reference, abs=1e-8)
    assert atoms.calc._use_compiled and len(compiled) == 1
    good = atoms.cell.array.copy()
    flat = good.copy()
    flat[2] = 0.0
    atoms.set_cell(flat)
    with pytest.raises(ValueError, match="cell vectors span no volume") as raised:
        eager.get_potential_energy(atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compiling failed" warning
        with pytest.raises(ValueError, match="cell vectors span no volume") as ours:
            atoms.get_potential_energy()
    assert str(ours.value) == str(raised.value)
    assert atoms.calc._use_compiled
    atoms.set_cell(good)
    atoms.positions[0, 0] += 0.01
    assert atoms.get_potential_energy() == pytest.approx(
        eager.get_potential_energy(atoms), abs=1e-8
    )
    assert atoms.calc._use_compiled
    atoms.positions[0] = np.nan  # NaN positions: a DataError, and compiling stays on
    with pytest.raises(DataError, match="non-finite"):
        atoms.get_potential_energy()
    assert atoms.calc._use_compiled


def test_a_failing_compile_of_a_grown_pair_list_falls_back(model, monkeypatch):
    """The recompile for a Verlet list that outgrew its capacity happens where a failure
    falls back to the eager model (compile="auto")."""
    from atomlens import calculator

    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    monkeypatch.setattr(calculator, "PAIR_CAPACITY_STEP", 8)  # small, to outgrow it
    monkeypatch.setattr(calculator, "PAIR_CAPACITY_HEADROOM", 1.0)
    calls = []

    def fake_compile(function, device, mode=None):
        calls.append(function)
        if len(calls) > 1:
            raise RuntimeError("no C++ compiler")
        return function

    monkeypatch.setattr(calculator, "compile_fixed_shapes", fake_compile)
    atoms = bulk("C", cubic=True)
    atoms.calc = atomlens.Calculator(model)
    atoms.get_potential_energy()
    atoms.set_cell(atoms.cell.array * 0.9, scale_atoms=True)  # more pairs within reach
    with pytest.warns(UserWarning, match="compiling failed.*no C.. compiler"):
        energy = atoms.get_potential_energy()
    assert not atoms.calc._use_compiled and len(calls) == 2
    eager = atomlens.Calculator(model, compile=False)
    assert energy == pytest.approx(eager.get_potential_energy(atoms), abs=1e-8)


def test_float32_forces_do_not_depend_on_where_the_molecule_is():
    """Energies and forces depend on position differences only: a float32 calculator gives
    the same forces for a molecule at the origin and 1e4 Angstrom away (an unwrapped
    trajectory); its positions are centred in float64 before the cast (3e-4 of the forces
    were lost before)."""
    model = random_model("schnet")
    near = molecule("CH3CH2OH")
    near.rattle(0.05, seed=1)
    far = near.copy()
    far.positions += 1e4
    results = []
    for atoms in (near, far):
        atoms.calc = atomlens.Calculator(model, dtype="float32", compile=False)
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    (e_near, f_near), (e_far, f_far) = results
    assert e_far == pytest.approx(e_near, abs=1e-6)
    np.testing.assert_allclose(f_far, f_near, rtol=0, atol=1e-6 * np.abs(f_near).max() + 1e-9)
