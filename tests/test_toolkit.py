"""Living beside other tools: light imports, extras, the Python API, help text, figures."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from helpers import random_model

from atomlens import _optional
from atomlens.cli import main
from atomlens.data.dataset import DataError, dataset_from_atoms
from atomlens.units import KCAL_MOL_EV

ROOT = Path(__file__).parent.parent


def run_python(code: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": ""}
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout


# ---------------------------------------------------------------- install
def test_dependencies_are_ranges_and_extras_name_the_heavy_packages():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "==" in d]
    core = " ".join(project["dependencies"])
    for heavy in ("qm9pack", "rdkit", "tblite", "scikit-learn", "tensorboard"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert {"qm9", "sample", "explain", "tensorboard", "all", "test"} <= set(extras)
    assert any("all" in d for d in extras["test"])
    for distribution, extra in _optional.EXTRAS.values():
        assert any(distribution in d for d in extras[extra])


def test_a_missing_extra_names_it(monkeypatch):
    from atomlens.data.sampling import molecule_from_smiles
    from atomlens.data.sources.qm9 import qm9pack_files

    monkeypatch.setattr(_optional, "available", lambda module: False)
    with pytest.raises(_optional.MissingExtra, match=r"atomlens\[sample\]"):
        molecule_from_smiles("CCO")
    with pytest.raises(_optional.MissingExtra, match=r"atomlens\[qm9\].*qm9pack"):
        qm9pack_files()


def test_import_and_help_do_not_load_torch_or_matplotlib():
    loaded = run_python(
        "import sys, contextlib, io\n"
        "import atomlens\n"
        "from atomlens.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'lightning') if m in sys.modules))\n"
    )
    assert loaded.strip() == "[]"


def test_figures_leave_the_matplotlib_backend_alone(tmp_path):
    backend = run_python(
        "import matplotlib\n"
        "matplotlib.use('pdf')\n"
        "import numpy as np, torch\n"
        "from ase.build import molecule\n"
        "from atomlens.insight.plots import atomic_energy_plot\n"
        "from atomlens.explain.figures import explanation_grid\n"
        "m = molecule('H2O')\n"
        f"atomic_energy_plot(m.numbers, m.positions, [0.01, -0.02, 0.0], {str(tmp_path)!r} + '/a.png')\n"
        "x = torch.rand(2, 1, 4, 4)\n"
        f"explanation_grid(x, {{'g': x}}, {str(tmp_path)!r} + '/e.png', ['3', '5'], [3, 1])\n"
        "print(matplotlib.get_backend())\n"
    )
    assert backend.strip() == "pdf"
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- Python API
def test_predict_returns_float64_numpy_with_units():
    model = random_model("schnet", target="energy").float()
    out = model.predict([molecule("CH4"), molecule("H2O")], forces=True)
    assert set(out) == {"energy", "atomic", "forces"}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in out.values())
    assert out.units == {"energy": "eV", "atomic": "eV", "forces": "eV/Angstrom"}
    raw = model(molecule("CH4"), forces=True)  # the differentiable call keeps tensors
    assert isinstance(raw["energy"], torch.Tensor)
    assert out["energy"][0] == pytest.approx(float(raw["energy"][0]), abs=1e-3)


def test_dataset_from_atoms_keeps_energies_and_forces_in_declared_units():
    frames = []
    for k in range(3):
        atoms = molecule("H2O")
        atoms.positions[0, 0] += 0.01 * k
        atoms.calc = SinglePointCalculator(
            atoms, energy=-10.0 * (k + 1), forces=np.full((3, 3), float(k))
        )
        frames.append(atoms)
    data = dataset_from_atoms(frames, energy_unit="kcal/mol")
    np.testing.assert_allclose(
        data.targets["energy"], [-10 * KCAL_MOL_EV, -20 * KCAL_MOL_EV, -30 * KCAL_MOL_EV]
    )
    np.testing.assert_allclose(data.targets["forces"][3:6], KCAL_MOL_EV)  # kcal/mol/Angstrom
    assert data.units["energy"] == "eV" and data.units["forces"] == "eV/Angstrom"
    # info / arrays keys, and a force unit of its own
    plain = [molecule("H2O") for _ in range(2)]
    for k, atoms in enumerate(plain):
        atoms.info["E"] = -1.0 * k
        atoms.arrays["F"] = np.ones((3, 3))
    data = dataset_from_atoms(
        plain, energy_unit="hartree", length_unit="bohr", energy_key="E", forces_key="F"
    )
    assert data.targets["energy"][1] == pytest.approx(-27.211386245988)
    assert data.targets["forces"][0, 0] == pytest.approx(27.211386245988 / 0.529177210903)
    np.testing.assert_allclose(data.positions[:3], plain[0].positions * 0.529177210903)
    assert "energy" not in dataset_from_atoms(frames, targets=False).targets
    with pytest.raises(DataError, match="does not state their unit"):  # never guessed
        dataset_from_atoms(frames)
    frames[1].calc = None
    with pytest.raises(DataError, match="frame 1 has no 'energy'"):
        dataset_from_atoms(frames, energy_unit="eV")


def test_training_module_and_function_are_both_reachable():
    import atomlens.training
    import atomlens.training.train as module

    assert callable(module.load_dataset) and callable(module.fit_statistics)
    assert atomlens.training.train_model is module.train
    assert atomlens.training.train is module and callable(module)  # train(config) still runs


def test_no_module_imports_back_up_to_the_package_root():
    """``atomlens/__init__.py`` is a face for users: nothing inside the package imports from
    it (``from atomlens import X``, ``from .. import X`` reaching the root), so the root can
    re-export anything without an import circle."""
    import ast

    src = ROOT / "src"
    offenders = []
    for path in sorted((src / "atomlens").rglob("*.py")):
        package = path.relative_to(src).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # relative: the package it climbs to
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ((node.module,) if node.module else ()))
            else:
                target = node.module or ""
            if target == "atomlens":
                offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []


def test_predict_dataset_lives_in_the_models_layer():
    import atomlens.training
    from atomlens.models import inference

    assert atomlens.training.predict_dataset is inference.predict_dataset  # still reachable


# ---------------------------------------------------------------- help text
def test_train_help_shows_defaults_presets_and_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.0005)" in text and "(default: runs/model)" in text
    assert "qm9-u0-demo" in text and "md17-schnet" in text
    import argparse

    from atomlens.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        assert action.help, action.dest


# ---------------------------------------------------------------- figures
def test_centred_norm_and_milli_units():
    from atomlens.insight.plots import centred_norm, to_milli

    norm = centred_norm(np.array([-20.0, 5.0]))
    assert norm(0.0) == pytest.approx(0.5)
    assert norm(-20.0) == pytest.approx(0.0) and norm(20.0) == pytest.approx(1.0)
    values, unit = to_milli([0.0123], "eV")
    assert unit == "meV" and values[0] == pytest.approx(12.3)
    assert to_milli([1.0], "Debye")[1] == "Debye"


def test_viewer_is_self_contained_html(tmp_path):
    from atomlens.insight.viewer import write_viewer

    atoms = molecule("CH3OH")
    values = np.linspace(-12.5, 30.0, len(atoms))
    path = write_viewer(
        tmp_path / "v.html", [atoms], [{"E_i": (values, "meV")}], title="test </script>"
    )
    text = path.read_text()
    assert '"unit":"meV"' in text and '"symbols":["C","O","H"' in text
    assert "http" not in text.lower().replace("http-equiv", "")  # nothing fetched at view time
    assert text.count("</script>") == 1
    with pytest.raises(ValueError, match="2 values for 6 atoms"):
        write_viewer(tmp_path / "bad.html", [atoms], [{"E_i": (values[:2], "meV")}])
