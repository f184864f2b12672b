"""The ASE calculator agrees with direct model calls; it validates atoms once, not per step."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from helpers import MODELS, random_model

import atomlens
from atomlens.data import DataError
from atomlens.data.dataset import dataset_from_atoms
from atomlens.models import save_model


def _two_ethanols() -> Atoms:
    """Two ethanol molecules 6 Angstrom apart: some pairs lie beyond a 5 Angstrom cutoff."""
    first = molecule("CH3CH2OH")
    second = first.copy()
    second.translate([6.0, 0.5, 0.0])
    return first + second


def _direct(model, atoms, dtype=torch.float64):
    batch = dataset_from_atoms([atoms], targets=False).batch([0], model.cutoff, dtype)
    out = model(batch, forces=True)
    return {k: v.detach().numpy() for k, v in out.items()}


@pytest.mark.parametrize("representation", MODELS)
def test_calculator_matches_model(representation):
    model = random_model(representation)
    atoms = _two_ethanols()
    atoms.rattle(0.05, seed=1)
    atoms.calc = atomlens.Calculator(model, dtype="float64")
    ref = _direct(model, atoms)
    assert atoms.get_potential_energy() == pytest.approx(ref["energy"][0], rel=1e-12, abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        atoms.calc.get_property("energies", atoms), ref["atomic"], rtol=1e-10, atol=1e-10
    )
    assert atoms.calc.get_property("energies", atoms).sum() == pytest.approx(
        atoms.get_potential_energy(), rel=1e-12
    )
    # model.predict is the other public route and must agree too
    pred = model.predict(atoms, forces=True)
    np.testing.assert_allclose(pred["forces"], atoms.get_forces(), rtol=1e-10, atol=1e-10)


def test_calculator_from_saved_model_and_float32(tmp_path):
    model = random_model("schnet")
    save_model(model.float(), tmp_path / "model")
    atoms = molecule("CH3CH2OH")
    atoms.calc = atomlens.Calculator(tmp_path, dtype="float64")  # training folder layout too
    assert atoms.calc.dtype == torch.float64
    e64, f64 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = atomlens.Calculator(tmp_path / "model")
    assert atoms.calc.dtype == torch.float32
    assert atoms.get_potential_energy() == pytest.approx(e64, abs=1e-3)
    np.testing.assert_allclose(atoms.get_forces(), f64, atol=1e-4)
    assert atoms.get_forces().dtype == np.float64


def test_calculator_does_not_change_the_model():
    model = random_model("schnet").float().train()
    atoms = molecule("H2O")
    atoms.calc = atomlens.Calculator(model, dtype="float64")
    atoms.get_forces()
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_calculator_follows_changes_of_positions_and_numbers():
    model = random_model("schnet")
    calc = atomlens.Calculator(model, dtype="float64")
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    atoms.positions[0] += 0.05
    e1 = atoms.get_potential_energy()
    assert e1 != e0 and e1 == pytest.approx(_direct(model, atoms)["energy"][0], rel=1e-12)
    water = molecule("H2O")
    water.calc = calc  # same calculator, new molecule: the cached tensors are rebuilt
    assert water.get_potential_energy() == pytest.approx(
        _direct(model, water)["energy"][0], rel=1e-12
    )
    assert len(water.get_forces()) == 3


def test_calculator_refuses_bad_atoms():
    model = random_model("schnet")
    calc = atomlens.Calculator(model)
    overlapping = Atoms("OHH", positions=[[0, 0, 0], [0, 0, 0.01], [0, 0.9, 0.3]])
    overlapping.calc = calc
    with pytest.raises(DataError, match="overlapping"):
        overlapping.get_potential_energy()
    flat = molecule("H2O", pbc=True)  # periodic, but the cell has no volume
    flat.calc = calc
    with pytest.raises(DataError, match="no volume"):
        flat.get_potential_energy()
    touching = Atoms("H", positions=[[0, 0, 0]], cell=[0.05, 3, 3], pbc=True)
    touching.calc = calc  # an atom on top of its own periodic image
    with pytest.raises(DataError, match="periodic image"):
        touching.get_potential_energy()
    atoms = molecule("H2O")
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.positions[1, 0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        atoms.get_forces()


def test_calculator_needs_an_energy_model():
    """The calculator, batched MD and export say what the model is instead: a mean over
    atoms, or a dipole model (which had been called a mean over atoms)."""
    from atomlens.batched_md import BatchedMD
    from atomlens.export import EnergyAndForces

    intensive = random_model("schnet", aggregation="mean", target="gap")
    with pytest.raises(ValueError, match="sum of atomic energies.*pooled by a mean"):
        atomlens.Calculator(intensive)
    dipole = random_model("schnet", target="mu", unit="D", output="dipole")
    for build in (atomlens.Calculator, EnergyAndForces, lambda m: BatchedMD(m, [molecule("H2O")])):
        with pytest.raises(ValueError, match=r"predicts 'mu' in 'D'.*\(a dipole model\)"):
            build(dipole)


def test_pair_capacity_rounds_up_with_headroom_to_whole_steps():
    from atomlens.calculator import PAIR_CAPACITY_STEP as step
    from atomlens.calculator import pair_capacity

    assert pair_capacity(1000, 1.15) == step * 9  # 1150 pairs -> 9 steps of 128 (1152)
    assert pair_capacity(1024, 1.0) == 1024  # exactly 8 steps
    assert pair_capacity(0, 1.15) == step  # room for one pair at least
    assert pair_capacity(1000, 1.15, limit=1100) == 1100  # never more than all pairs
    assert pair_capacity(1000, 1.15, limit=5000) == 1152


def test_compiled_calculator_matches_eager_including_pairs_beyond_the_cutoff():
    """compile=True keeps all pairs (fixed shapes); the smooth cutoff makes that exact."""
    import ase.build

    model = random_model("schnet")
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.positions[0] += [4.0, 0.0, 0.0]  # some pairs now lie beyond the 5 Angstrom cutoff
    eager = atomlens.Calculator(model, dtype="float64")
    compiled = atomlens.Calculator(model, dtype="float64", compile=True)
    for step in range(2):
        atoms.positions += np.random.default_rng(step).normal(scale=0.05, size=(len(atoms), 3))
        eager.calculate(atoms, ["energy", "forces"])
        compiled.calculate(atoms, ["energy", "forces"])
        assert compiled.results["energy"] == pytest.approx(eager.results["energy"], abs=1e-9)
        np.testing.assert_allclose(compiled.results["forces"], eager.results["forces"], atol=1e-9)
        np.testing.assert_allclose(
            compiled.results["energies"], eager.results["energies"], atol=1e-9
        )
    assert next(model.parameters()).requires_grad  # the caller's model is left alone


def test_compiled_calculators_in_one_process_each_run_their_own_code():
    """The compiled code checks no guards at call time, and Dynamo files compiled code under
    the function's code object, which every calculator shares: two calculators with other
    models (DTNN, SchNet) on other molecules, used in turns through ASE, must each give
    their own eager results."""
    import ase.build

    cases = []
    for representation, name, seed in (("schnet", "CH3CH2OH", 0), ("dtnn", "C6H6", 1)):
        model = random_model(representation, seed=seed)
        atoms = ase.build.molecule(name)
        atoms.calc = atomlens.Calculator(model, dtype="float64", compile=True)
        eager = atomlens.Calculator(model, dtype="float64", compile=False)
        cases.append((atoms, eager))
    for step in range(3):  # ASE's get_property path, positions changed in place between calls
        for atoms, eager in cases:
            atoms.positions += np.random.default_rng(step).normal(0, 0.05, (len(atoms), 3))
            forces = atoms.get_forces()
            eager.calculate(atoms, ["energy", "forces"])
            assert atoms.calc._use_compiled and atoms.calc._compiled_once
            np.testing.assert_allclose(forces, eager.results["forces"], rtol=0, atol=1e-9)
            assert atoms.get_potential_energy() == pytest.approx(eager.results["energy"], abs=1e-9)
            np.testing.assert_array_equal(atoms.calc.atoms.positions, atoms.positions)


def test_auto_compile_for_small_molecules_with_a_fallback(monkeypatch, caplog):
    """compile="auto" (the default) compiles a small molecule, says so, and gives the eager
    results; a compile that fails falls back to the eager model with a warning;
    ATOMLENS_COMPILE=0 and periodic cells run eagerly."""
    import logging

    model = random_model("schnet")
    atoms = molecule("CH3CH2OH")
    eager = atomlens.Calculator(model, compile=False)
    atoms.calc = eager
    reference = (atoms.get_potential_energy(), atoms.get_forces().copy())

    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    with caplog.at_level(logging.INFO, logger="atomlens"):
        atoms.calc = atomlens.Calculator(model)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert atoms.calc._use_compiled
    assert "compiling energy and forces for C2H6O" in caplog.text
    assert energy == pytest.approx(reference[0], abs=1e-8)
    np.testing.assert_allclose(forces, reference[1], atol=1e-7)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    atoms.calc = atomlens.Calculator(model)
    with pytest.warns(UserWarning, match="compiling failed"):
        energy = atoms.get_potential_energy()
    assert not atoms.calc._use_compiled and energy == pytest.approx(reference[0], abs=1e-8)
    with pytest.raises(RuntimeError, match="no C.. compiler"):  # compile=True: no fallback
        atoms.calc = atomlens.Calculator(model, compile=True)
        atoms.get_potential_energy()

    monkeypatch.setenv("ATOMLENS_COMPILE", "0")
    atoms.calc = atomlens.Calculator(model)
    atoms.get_potential_energy()
    assert not atoms.calc._use_compiled
    with pytest.raises(ValueError, match="compile must be"):
        atomlens.Calculator(model, compile="sometimes")


def test_compile_modes_by_device_and_a_named_mode_on_the_cpu(monkeypatch):
    """compile=True/"auto" record CUDA graphs on a GPU ("reduce-overhead") and use Inductor's
    default on a CPU; a named mode is passed on, and its code path (Inductor makes no graphs
    on a CPU) gives the eager results."""
    import ase.build

    from atomlens import calculator
    from atomlens.nn.kernels import compile_mode, compile_option, default_compile_mode

    assert default_compile_mode("cuda") == default_compile_mode("cuda:1") == "reduce-overhead"
    assert default_compile_mode("cpu") is None
    assert compile_mode(True, "cuda") == compile_mode("auto", "cuda") == "reduce-overhead"
    assert compile_mode(True, "cpu") is None
    assert compile_mode("max-autotune", "cpu") == "max-autotune"
    with pytest.raises(ValueError, match="compile must be"):
        compile_mode("fast", "cpu")
    assert compile_option(np.True_) is True and compile_option(0) is False
    assert compile_option("auto") == "auto"
    for bad in (None, 2, np.array([1, 0])):
        with pytest.raises(ValueError, match="compile must be"):
            compile_option(bad)

    modes = []
    compile_fixed_shapes = calculator.compile_fixed_shapes

    def recording(function, device, mode=None, **kwargs):
        modes.append(mode)
        return compile_fixed_shapes(function, device, mode, **kwargs)

    monkeypatch.setattr(calculator, "compile_fixed_shapes", recording)
    model = random_model("schnet")
    atoms = ase.build.molecule("CH3CH2OH")
    eager = atomlens.Calculator(model, dtype="float64", compile=False)
    named = atomlens.Calculator(model, dtype="float64", compile="reduce-overhead")
    assert named.compile is True
    assert atomlens.Calculator(model, compile=np.True_).compile is True  # a numpy bool
    assert atomlens.Calculator(model, compile=0).compile is False
    with pytest.raises(ValueError, match="compile must be"):
        atomlens.Calculator(model, compile=None)
    for step in range(2):  # new positions into the same compiled function
        atoms.positions += np.random.default_rng(step).normal(scale=0.05, size=(len(atoms), 3))
        eager.calculate(atoms, ["energy", "forces"])
        named.calculate(atoms, ["energy", "forces"])
        np.testing.assert_allclose(named.results["forces"], eager.results["forces"], atol=1e-9)
        assert named.results["energy"] == pytest.approx(eager.results["energy"], abs=1e-9)
    monkeypatch.setenv("ATOMLENS_COMPILE", "1")  # (the tests' default is 0)
    atomlens.Calculator(model, dtype="float64").calculate(atoms, ["energy"])  # auto, CPU
    assert set(modes[:-1]) == {"reduce-overhead"} and modes[-1] is None


def test_compiled_periodic_cell_matches_eager_through_rebuilds_and_cell_changes(
    caplog, monkeypatch
):
    """compile=True on a cell smaller than twice the cutoff: the padded Verlet list gives the
    eager energy, forces and stress, when the list is rebuilt, when the cell changes (NPT,
    no recompile) and when the list outgrows its capacity (one recompile, logged)."""
    import logging

    from ase.build import bulk

    monkeypatch.setattr("atomlens.calculator.PAIR_CAPACITY_STEP", 8)  # small, to outgrow it
    monkeypatch.setattr("atomlens.calculator.PAIR_CAPACITY_HEADROOM", 1.0)
    model = random_model("schnet")
    atoms = bulk("Si", "diamond", a=5.43)  # 2 atoms, 3.8 Angstrom cell vectors
    eager = atomlens.Calculator(model, dtype="float64", compile=False)
    compiled = atomlens.Calculator(model, dtype="float64", compile=True, skin=0.5)
    rng = np.random.default_rng(0)
    properties = ["energy", "forces", "stress"]
    capacities = []
    with caplog.at_level(logging.INFO, logger="atomlens"):
        for step in range(4):
            atoms.positions += rng.normal(scale=0.3, size=(len(atoms), 3))  # > skin / 2
            if step == 2:  # a cell change: a rebuilt list with the same capacity
                atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
            if step == 3:  # a denser cell: more pairs than the capacity
                atoms.set_cell(atoms.cell.array * 0.8, scale_atoms=True)
            changes = compiled.check_state(atoms)
            compiled.calculate(atoms, properties, changes)
            capacities.append(compiled._capacity)
            eager.calculate(atoms, properties, changes)
            for key in ("energy", "forces", "energies", "stress"):
                np.testing.assert_allclose(
                    compiled.results[key], eager.results[key], rtol=0, atol=1e-9, err_msg=key
                )
    assert compiled._use_compiled and compiled._neighbors.builds == 4
    assert capacities[1] == capacities[2] < capacities[3]
    assert caplog.text.count("compiling energy, forces and stress for Si2") == 2
