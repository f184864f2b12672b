"""The GPU path gives the CPU's results: calculator (eager and CUDA graphs), batched MD,
training steps and the training command.

Runs where torch sees a GPU (``benchmarks/gpu.sh`` runs it on a lent machine); skipped
elsewhere. ``ATOMLENS_TEST_DEVICE=cpu`` runs the same checks on the CPU, to test the tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from helpers import qm9_sample, random_model, write_tiny_train_config

import atomlens
from atomlens.batched_md import BatchedMD

DEVICE = os.environ.get("ATOMLENS_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU (ATOMLENS_TEST_DEVICE unset)")


@pytest.fixture
def compiling(monkeypatch):
    """Compile (the tests' default is ATOMLENS_COMPILE=0); on a GPU, afterwards, no compiled
    function may have skipped its CUDA graph (Inductor skips them silently, e.g. for a CPU
    tensor among the inputs)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("ATOMLENS_COMPILE", "1")
    counters["inductor"].clear()
    yield
    if DEVICE.startswith("cuda"):
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _moves(atoms, step: int) -> None:
    atoms.positions += np.random.default_rng(step).normal(scale=0.03, size=(len(atoms), 3))


def test_calculator_on_the_device_matches_the_cpu(compiling):
    """Eager and compiled (CUDA graphs on a GPU: the default there) in float64 through ASE's
    get_forces, the positions moved in place between calls (graph replays with new inputs),
    and float32 compiled against float64."""
    model = random_model("schnet")
    atoms = molecule("CH3CH2OH")
    atoms.positions[0] += [4.0, 0.0, 0.0]  # pairs beyond the cutoff
    cpu = atomlens.Calculator(model, dtype="float64", compile=False)
    eager = atomlens.Calculator(model, device=DEVICE, dtype="float64", compile=False)
    compiled = atomlens.Calculator(model, device=DEVICE, dtype="float64")
    single = atomlens.Calculator(model, device=DEVICE, dtype="float32")
    for step in range(4):
        _moves(atoms, step)
        cpu.calculate(atoms, ["energy", "forces"])
        for calc, tol in ((eager, 1e-9), (compiled, 1e-9), (single, 2e-4)):
            atoms.calc = calc
            forces = atoms.get_forces()
            np.testing.assert_allclose(forces, cpu.results["forces"], rtol=0, atol=tol)
            assert atoms.get_potential_energy() == pytest.approx(
                cpu.results["energy"], abs=100 * tol
            )
    assert compiled._use_compiled and compiled._compiled_once and single._use_compiled


def test_periodic_calculator_on_the_device_with_stress(compiling):
    model = random_model("schnet")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=0)
    cpu = atomlens.Calculator(model, dtype="float64", compile=False)
    device = atomlens.Calculator(model, device=DEVICE, dtype="float64")
    for step in range(3):
        _moves(atoms, step)
        cpu.calculate(atoms, ["energy", "forces", "stress"])
        atoms.calc = device
        np.testing.assert_allclose(atoms.get_forces(), cpu.results["forces"], atol=1e-9)
        np.testing.assert_allclose(atoms.get_stress(), cpu.results["stress"], atol=1e-9)
    assert device._use_compiled


def test_batched_md_on_the_device_follows_the_cpu(compiling):
    """20 velocity-Verlet steps of three trajectories: compiled on the device (CUDA graphs
    on a GPU) against the eager CPU run, same seed."""
    model = random_model("schnet", seed=2)
    systems = [molecule("H2O"), molecule("CH3CH2OH"), molecule("CH3CH2OH")]
    cpu = BatchedMD(model, systems, dtype="float64", seed=3, compile=False)
    device = BatchedMD(model, systems, device=DEVICE, dtype="float64", seed=3)
    assert device.compiled is not None
    cpu.run(20, progress=False)
    device.run(20, progress=False)
    torch.testing.assert_close(device.positions.cpu(), cpu.positions, rtol=0, atol=1e-8)
    torch.testing.assert_close(device.forces.cpu(), cpu.forces, rtol=0, atol=1e-8)


@pytest.mark.parametrize("tables", [(), ("cpu", "cuda")], ids=["per-pair", "tables"])
@pytest.mark.parametrize("forces", [False, True])
def test_training_step_gradients_on_the_device(forces, tables, monkeypatch):
    """One loss's parameter gradients (with forces: the double backward) equal the CPU's,
    with the filters evaluated the same way on both (per pair, the GPU's default, or from
    tables, the CPU's)."""
    from atomlens.models import schnet

    monkeypatch.setattr(schnet, "TABLES_ON", tables)
    data = qm9_sample()
    grads = []
    for device in ("cpu", DEVICE):
        model = random_model("schnet").to(device).train()
        batch = data.batch(np.arange(8), model.cutoff, torch.float64).to(device)
        out = model(batch, forces=forces)
        loss = out["energy"].pow(2).mean()
        if forces:
            loss = loss + out["forces"].pow(2).sum(-1).mean()
        loss.backward()
        grads.append([p.grad.detach().cpu() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_training_command_on_the_device(tmp_path, capsys):
    """``atomlens train`` with ``device: gpu`` (Lightning on the GPU), then the model on the
    CPU: evaluation of the saved model gives the training run's test MAE."""
    from atomlens.cli import main
    from atomlens.models.io import load_model

    packed = qm9_sample().save(tmp_path / "packed")
    device = "gpu" if DEVICE.startswith("cuda") else DEVICE
    config = write_tiny_train_config(tmp_path / "tiny.yaml", packed, device)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    model = load_model(run)
    assert next(model.parameters()).device.type == "cpu"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test", "--json"]) == 0
    on_cpu = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained = json.loads((run / "metrics.json").read_text())  # evaluated where it trained
    assert on_cpu["n"] == trained["n_test_evaluated"] == 10
    # the GPU evaluates filters per pair, the CPU from tables: equal to the tables' error
    assert on_cpu["U0_mae"] == pytest.approx(trained["U0_mae"], rel=1e-5)
