"""Bad input a review tried on every command (session 32): each is a one-line error before
any work, names the option, and leaves nothing behind; options that a run would ignore are
refused; a Ctrl-C keeps what cost hours."""

from __future__ import annotations

import ase.build
import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from helpers import random_model
from test_cli_errors import one_line_error

from atomlens.cli import main
from atomlens.models.io import save_model


@pytest.fixture
def model(tmp_path):
    """A saved energy model that knows H, C and O."""
    saved = random_model("schnet", target="energy").float()
    return save_model(saved, tmp_path / "model", metadata={"elements": [1, 6, 8]})


@pytest.fixture
def labelled(tmp_path):
    """Six labelled molecules (eV, Angstrom stated) for training."""
    frames = []
    for k, name in enumerate(["CH4", "H2O", "CH3OH", "C2H6", "C2H4", "CO2"]):
        atoms = ase.build.molecule(name)
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 * len(atoms) + 0.1 * k)
        atoms.info.update(energy_unit="eV", length_unit="Angstrom")
        frames.append(atoms)
    path = tmp_path / "mols.extxyz"
    write(path, frames)
    return path


def _train_argv(data, out) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--target",
        "energy",
        "--n-train",
        "2",
        "--n-val",
        "2",
        "--n-test",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]


def test_train_refuses_a_model_folder_as_its_run_folder(tmp_path, model, labelled, capsys):
    """``--out RUN/model`` had written a run inside the saved model (``predict RUN`` then
    found the new one); ``--out`` holding the --init-from model would be replaced."""
    argv = _train_argv(labelled, model)
    assert main([*argv, "--overwrite"]) == 2
    assert "is a saved model folder" in one_line_error(capsys, "train")
    assert main(_train_argv(labelled, model / "sub")) == 2
    assert "lies inside" in one_line_error(capsys, "train")
    run = tmp_path / "run"
    save_model(random_model("schnet", target="energy").float(), run / "model")
    assert main([*_train_argv(labelled, run), "--init-from", str(run), "--overwrite"]) == 2
    assert "holds the model --init-from" in one_line_error(capsys, "train")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert main([*_train_argv(labelled, tmp_path / "r2"), "--refit-statistics"]) == 2
    assert "--refit-statistics refits" in one_line_error(capsys, "train")
    assert main([*_train_argv(labelled, tmp_path / "r3"), "--device", "mps"]) == 2
    assert "device must be one of auto, cpu, gpu, cuda" in one_line_error(capsys, "train")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_interrupt_hint_only_where_a_checkpoint_exists(tmp_path):
    from atomlens.cli import _resumable

    assert not _resumable(tmp_path) and not _resumable(None)
    (tmp_path / "model_1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "model_1" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert _resumable(tmp_path)  # an ensemble's member


def test_thread_counts_beyond_reason_are_refused(tmp_path, model, capsys):
    write(tmp_path / "w.xyz", ase.build.molecule("H2O"))
    assert main(["predict", str(model), str(tmp_path / "w.xyz"), "--threads", "100000"]) == 2
    assert "--threads 100000: more than 4 per CPU" in one_line_error(capsys, "predict")


def test_sample_refusals(tmp_path, capsys):
    out = str(tmp_path / "s.extxyz")
    assert main(["sample", "--smiles", " ", "--out", out]) == 2
    assert "--smiles is empty" in one_line_error(capsys, "sample")
    assert main(["sample", "--smiles", "C", "--strain", "0.1", "--out", out]) == 2
    assert "--strain 0.1 sets the strain of the copies" in one_line_error(capsys, "sample")
    assert main(["sample", "--smiles", "C", "--reference-isomers", "2", "--out", out]) == 2
    assert "--reference-isomers splits" in one_line_error(capsys, "sample")
    assert not (tmp_path / "s.extxyz").exists()


class _StopsAfter(Calculator):
    """ASE's EMT, then a Ctrl-C at the ``n``-th call."""

    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, n: int):
        from ase.calculators.emt import EMT

        super().__init__()
        self.inner, self.n, self.calls = EMT(), n, 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        self.calls += 1
        if self.calls >= self.n:
            raise KeyboardInterrupt
        atoms = atoms.copy()
        atoms.calc = self.inner
        self.results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.any():
            self.results["stress"] = atoms.get_stress()


def test_an_interrupted_sampling_keeps_its_frames(tmp_path, monkeypatch, capsys):
    """A Ctrl-C during ``sample`` writes the frames sampled before it to OUT.partial.SUFFIX
    (a whole data set) and says so; a second interrupt does not overwrite the first's."""
    from atomlens.data import sampling

    monkeypatch.setattr(sampling, "make_calculator", lambda method: _StopsAfter(12))
    write(tmp_path / "w.xyz", ase.build.molecule("H2O"))
    argv = ["sample", "--xyz", str(tmp_path / "w.xyz"), "--frames", "50", "--every", "2"]
    argv += ["--equilibration", "0", "--out", str(tmp_path / "s.extxyz")]
    for name in ("s.partial.extxyz", "s.partial-1.extxyz"):
        assert main(argv) == 130
        assert f"are in {tmp_path / name}" in capsys.readouterr().err
        frames = read(tmp_path / name, ":")
        assert 1 <= len(frames) < 50
        assert all(np.isfinite(f.get_potential_energy()) for f in frames)
    assert not (tmp_path / "s.extxyz").exists()


def test_an_interrupted_sampling_of_strained_cells_keeps_the_finished_ones(
    tmp_path, monkeypatch, capsys
):
    """``--cells N``: the cells sampled before the Ctrl-C and the one it stopped are kept."""
    from atomlens.data import sampling

    monkeypatch.setattr(sampling, "make_calculator", lambda method: _StopsAfter(130))
    write(tmp_path / "cu.extxyz", ase.build.bulk("Cu", "fcc", a=3.6, cubic=True))
    argv = ["sample", "--xyz", str(tmp_path / "cu.extxyz"), "--cells", "2", "--frames", "20"]
    argv += ["--every", "2", "--equilibration", "0", "--method", "gfn1"]
    argv += ["--out", str(tmp_path / "s.extxyz")]
    assert main(argv) == 130
    assert "are in" in capsys.readouterr().err
    frames = read(tmp_path / "s.partial.extxyz", ":")
    assert 10 < len(frames) < 20  # the first cell's 10 frames and some of the second's
    assert all(f.pbc.all() and np.isfinite(f.get_stress()).all() for f in frames)


def test_an_interrupted_isomer_sampling_keeps_the_isomers_so_far(tmp_path, monkeypatch, capsys):
    """``--isomers``: the frames of the isomers sampled before the Ctrl-C, not yet split into
    the three sets, go to OUT/sampled.partial.db (ISO17 layout)."""
    from atomlens.data import sampling
    from atomlens.data.sources.iso17 import read_iso17

    calls = _StopsAfter(100)  # one counter for both isomers' calculators
    monkeypatch.setattr(sampling, "make_calculator", lambda method: calls)
    out = tmp_path / "iso"
    argv = ["sample", "--isomers", "CCO", "COC", "--frames", "8", "--every", "2"]
    argv += ["--equilibration", "0", "--out", str(out)]
    assert main(argv) == 130
    assert "not split into the three sets" in capsys.readouterr().err
    data = read_iso17(out / "sampled.partial.db")
    isomers = np.asarray(data.extras["isomer"])
    assert (isomers == 0).sum() == 8 and 0 < (isomers == 1).sum() < 8


def test_ensemble_refuses_its_init_from_inside_before_touching_the_folder(tmp_path):
    """An ensemble whose --init-from model lies in its own --out: refused before
    --overwrite removes the manifest or retrains a member."""
    from helpers import tiny_train_config

    from atomlens.training.ensemble import MANIFEST, train_ensemble

    ens = tmp_path / "ens"
    for k in range(2):
        save_model(random_model("schnet"), ens / f"model_{k}" / "model")
    (ens / MANIFEST).write_text("{}")
    config = tiny_train_config(ens, init_from=str(ens / "model_1"))
    with pytest.raises(ValueError, match="holds the model --init-from"):
        train_ensemble(config, 2, overwrite=True)
    assert (ens / MANIFEST).read_text() == "{}"
    assert sorted(p.name for p in (ens / "model_0").iterdir()) == ["model"]


def test_isomer_sampling_refuses_cell_options(tmp_path, capsys):
    argv = ["sample", "--isomers", "CCO", "COC", "--cells", "2", "--out", str(tmp_path / "i")]
    assert main(argv) == 2
    assert "--cells and --strain sample strained copies" in one_line_error(capsys, "sample")


def test_devices_torch_does_not_have_are_refused(monkeypatch):
    import torch

    from atomlens.models.io import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="sees 1 CUDA GPU"):
        check_device("cuda:7")
    with pytest.raises(ValueError, match="atomlens runs on 'cpu' or 'cuda"):
        check_device("mps")


def test_structure_selections_and_figure_names(tmp_path, model, capsys):
    """A negative index past the first frame selects nothing (ASE gave frame 0); the
    one-structure studies refuse a selection of several; a figure name that is no image
    format is refused before the work; --allow-unknown-elements where the error suggests it."""
    path = tmp_path / "two.xyz"
    write(path, [ase.build.molecule("H2O"), ase.build.molecule("CH4")])
    assert main(["predict", str(model), str(path), "--index", "-3"]) == 2
    assert "index -3 selects no frame; the file has 2 frames" in one_line_error(capsys, "predict")
    argv = ["insight", "potential-map", str(model), str(path), "--index", "0:2"]
    assert main([*argv, "--probe", "C"]) == 2
    assert "selects 2 structures" in one_line_error(capsys, "insight")
    argv = ["insight", "atomic-energies", str(model), str(path), "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "a figure is written as an image" in one_line_error(capsys, "insight")
    write(tmp_path / "nh3.xyz", ase.build.molecule("NH3"))
    argv = ["insight", "extensivity", str(model), str(tmp_path / "nh3.xyz")]
    assert main(argv) == 2
    assert "--allow-unknown-elements" in one_line_error(capsys, "insight")
    assert main([*argv, "--allow-unknown-elements"]) in (0, 1)  # a verdict, not a refusal
    assert "size-extensive" in capsys.readouterr().out


def test_options_a_run_would_ignore_are_refused(tmp_path, model, capsys):
    write(tmp_path / "w.xyz", ase.build.molecule("H2O"))
    argv = ["md", str(model), str(tmp_path / "w.xyz"), "--ensemble", "langevin"]
    assert main([*argv, "--max-drift", "0.5", "--steps", "2"]) == 2
    assert "--max-drift applies to --ensemble nve" in one_line_error(capsys, "md")
    argv = ["explain", "molecule", str(model), str(tmp_path / "w.xyz"), "--out"]
    argv += [str(tmp_path / "e"), "--method", "patternattribution"]
    argv += ["--patterns", str(tmp_path / "p"), "--fit-data", str(tmp_path / "w.xyz")]
    assert main(argv) == 2
    assert "not both" in one_line_error(capsys, "explain")
    assert main(["export", str(model), "--out", str(tmp_path / "w.xyz")]) == 2
    assert "name a .pt2 file" in one_line_error(capsys, "export")
    assert read(tmp_path / "w.xyz").get_chemical_formula() == "H2O"


def test_md_names_the_file_of_overlapping_atoms(tmp_path, model, capsys):
    atoms = ase.build.molecule("H2O")
    atoms.positions[1] = atoms.positions[0]
    write(tmp_path / "bad.xyz", atoms)
    assert main(["md", str(model), str(tmp_path / "bad.xyz"), "--steps", "2"]) == 2
    message = one_line_error(capsys, "md")
    assert str(tmp_path / "bad.xyz") in message and "overlapping" in message


def test_frames_that_state_a_unit_and_frames_that_do_not(tmp_path):
    from atomlens.data.dataset import DataError
    from atomlens.data.sources.ase_files import read_ase

    frames = [ase.build.molecule("H2O"), ase.build.molecule("CH4")]
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=-1.0)
    frames[0].info["energy_unit"] = "kcal/mol"
    write(tmp_path / "m.extxyz", frames)
    with pytest.raises(DataError, match="1 frames state energy_unit=kcal/mol and 1 state none"):
        read_ase(tmp_path / "m.extxyz")
