"""Numeric options out of range, and start structures no calculation should see, are refused
before any work: one line naming the option (or file), exit status 2, no traceback (they
ended in IndexError, ZeroDivisionError, a tblite traceback, or were accepted silently)."""

import ase.build
import ase.io
import pytest
from helpers import random_model
from test_cli_errors import one_line_error

from atomlens.cli import main
from atomlens.models.io import save_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A CHON model and a water molecule."""
    root = tmp_path_factory.mktemp("ranges")
    model = save_model(random_model("schnet"), root / "model", metadata={"elements": [1, 6, 7, 8]})
    water = root / "water.xyz"
    ase.io.write(water, ase.build.molecule("H2O"))
    return model, water


def refused(capsys, argv: list[str], command: str, option: str) -> str:
    assert main([*argv, "--threads", "1"]) == 2, argv
    message = one_line_error(capsys, command)
    assert message.startswith(f"{option} must be "), message
    return message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--padding", "-1"),
        ("--padding", "nan"),
        ("--chunk-size", "0"),
        ("--height", "nan"),
        ("--spacing", "0"),
        ("--spacing", "inf"),
        ("--cube-spacing", "-0.2"),
    ],
)
def test_potential_map(files, tmp_path, capsys, option, value):
    model, water = files
    out = tmp_path / "map.png"
    argv = ["insight", "potential-map", str(model), str(water), "--probe", "C"]
    refused(capsys, [*argv, "--out", str(out), option, value], "insight", option)
    assert not out.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--max-molecules", "-1"), ("--min-count", "-2"), ("--seed", "-1"), ("--sizes", "2,6")],
)
def test_rings(files, tmp_path, capsys, option, value):
    argv = ["insight", "rings", str(files[0]), "--out", str(tmp_path / "r.png"), option, value]
    refused(capsys, argv, "insight", option)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        (["--ensemble", "npt", "--temperature", "0"], "--temperature"),
        (["--ensemble", "npt", "--pressure", "nan"], "--pressure"),
        (["--temperature", "-1"], "--temperature"),
        (["--timestep", "nan"], "--timestep"),
        (["--interval", "0"], "--interval"),
        (["--max-temperature", "-1"], "--max-temperature"),
        (["--max-temperature", "nan"], "--max-temperature"),
        (["--max-drift", "0"], "--max-drift"),
        (["--max-drift", "-1"], "--max-drift"),
        (["--ensemble", "langevin", "--friction", "inf"], "--friction"),
    ],
)
def test_md(files, tmp_path, capsys, options, option):
    model, water = files
    out = tmp_path / "md.traj"
    argv = ["md", str(model), str(water), "--steps", "2", "--out", str(out), *options]
    message = refused(capsys, argv, "md", option)
    if "npt" in options and option == "--temperature":
        assert "> 0" in message
    assert not list(tmp_path.iterdir())


def test_md_limits_can_be_switched_off(files, tmp_path, capsys):
    """inf is no limit (and the library refuses what the command refuses)."""
    from atomlens.md import run_md

    model, water = files
    argv = ["md", str(model), str(water), "--steps", "2", "--no-compile", "--threads", "1"]
    argv += ["--out", str(tmp_path / "md.traj"), "--max-drift", "inf", "--max-temperature", "inf"]
    assert main(argv) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="NPT needs a temperature > 0 K"):
        run_md(model, ase.build.bulk("Cu", cubic=True), ensemble="npt", temperature_K=0.0)
    with pytest.raises(ValueError, match="max_drift_eV_per_atom must be > 0"):
        run_md(model, ase.io.read(water), max_drift_eV_per_atom=0.0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timestep", "0"),
        ("--temperature", "-5"),
        ("--friction", "-1"),
        ("--equilibration", "-10"),
        ("--relax", "-1"),
        ("--cells", "0"),
        ("--frames", "0"),
        ("--every", "0"),
        ("--strain", "nan"),
        ("--reference-isomers", "0"),
    ],
)
def test_sample_options(files, tmp_path, capsys, option, value):
    out = tmp_path / "s.npz"
    argv = ["sample", "--xyz", str(files[1]), "--out", str(out), option, value]
    refused(capsys, argv, "sample", option)
    assert not out.exists()


@pytest.mark.parametrize(
    ("atoms", "expected"),
    [
        ("O 0 0 0\nH 0 0 0\nH 0 0.96 0", "closer than"),  # two atoms at one position
        ("O 0 0 0\nH nan 0 0\nH 0 0.96 0", "non-finite"),
        ("O 0 0 0\nX 0.96 0 0\nH 0 0.96 0", "unknown element"),
        ("O 0 0 0\nFr 1.5 0 0\nH 0 0.96 0", "beyond GFN-xTB"),
    ],
)
def test_sample_structure_checked_before_any_calculation(tmp_path, capsys, atoms, expected):
    start, out = tmp_path / "start.xyz", tmp_path / "s.npz"
    start.write_text(f"3\n\n{atoms}\n")
    assert main(["sample", "--xyz", str(start), "--out", str(out), "--threads", "1"]) == 2
    message = one_line_error(capsys, "sample")
    assert message.startswith(f"{start}: ") and expected in message, message
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_explain_molecule_n_top(files, tmp_path, capsys, value):
    model, water = files
    out = tmp_path / "explained"
    argv = ["explain", "molecule", str(model), str(water), "--out", str(out), "--n-top", value]
    refused(capsys, argv, "explain", "--n-top")
    assert not out.exists()
