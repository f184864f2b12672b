"""The atomlens command: train -> evaluate -> predict, and clear errors for bad input."""

import csv
import json

import ase.build
import ase.io
import numpy as np
import pytest
import yaml
from helpers import qm9_sample, write_tiny_train_config

from atomlens.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    packed = qm9_sample().save(root / "packed")
    config = write_tiny_train_config(root / "tiny.yaml", packed)
    assert main(["train", str(config), "--out", str(root / "run"), "--no-progress"]) == 0
    return root


def test_train_evaluate(trained, capsys):
    assert (trained / "run" / "model" / "model.safetensors").is_file()
    assert main(["evaluate", str(trained / "run"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "U0_MAE" in out and "meV" in out and "kcal/mol" in out and "(test split)" in out
    # the split is written to the output folder first (what resume reads) and with the model
    from atomlens.data.splits import load_split

    first, saved = (load_split(trained / "run" / name) for name in ("split.npz", "model/split.npz"))
    assert first.keys() == saved.keys() == {"train", "val", "test"}
    for key in first:
        assert (first[key] == saved[key]).all()
    assert sorted(len(v) for v in first.values()) == [10, 10, 20]
    # another data set is scored on every frame and labelled so
    assert (
        main(["evaluate", str(trained / "run"), "--data", str(trained / "packed"), "--json"]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["split"] == "all" and doc["n"] == 40
    assert main(["evaluate", str(trained / "run"), "--data", str(trained / "packed")]) == 0
    assert "on 40 structures (all frames)" in capsys.readouterr().out


def test_predict_writes_per_atom_contributions(trained, tmp_path, capsys):
    structures = tmp_path / "mols.xyz"
    ase.io.write(structures, [ase.build.molecule("CH4"), ase.build.molecule("H2O")])
    result = tmp_path / "pred.extxyz"
    assert main(["predict", str(trained / "run"), str(structures), "--out", str(result)]) == 0
    out = capsys.readouterr().out
    assert "CH4" in out and "H2O" in out
    frames = ase.io.read(result, ":")
    for atoms in frames:
        assert atoms.arrays["atomlens_atomic_U0"].sum() == pytest.approx(
            atoms.info["atomlens_U0"], rel=1e-6
        )
        assert atoms.info["atomlens_unit"] == "eV"  # the predictions' unit, in the file
    assert "atomic U0 (eV)" in out
    before = structures.read_bytes()  # the input is never the output
    assert main(["predict", str(trained / "run"), str(structures), "--out", str(structures)]) == 2
    assert (
        "is the input file" in capsys.readouterr().err and structures.read_bytes() == before
    )  # the per-atom lines have a header with the unit
    nowhere = tmp_path / "newdir" / "p.extxyz"  # said in words (a bare "[Errno 2]" before)
    assert main(["predict", str(trained / "run"), str(structures), "--out", str(nowhere)]) == 2
    assert f"its folder {nowhere.parent} does not exist" in capsys.readouterr().err


def test_a_run_says_how_far_it_got_and_warns_when_it_trained_nothing(capsys):
    """After training: epochs, the budget's stop and the test structures evaluated; a run
    whose budget ended before its first epoch warns that its saved model is untrained (it
    had printed test errors of the initial weights and nothing else)."""
    from atomlens.cli.train import _print_run

    _print_run({"epochs": 12, "stopped_by_budget": True, "n_test": 500, "n_test_evaluated": 100})
    said = capsys.readouterr()
    assert "12 epochs; stopped by the --minutes budget; 100 of 500 test structures" in said.out
    assert not said.err
    _print_run({"epochs": 0, "stopped_by_budget": True}, "model_1")
    assert "model_1 trained no epoch (the budget ended first): it is untrained" in (
        capsys.readouterr().err
    )


def test_device_option_of_evaluate_predict_and_md(trained, tmp_path, capsys, monkeypatch):
    """``--device`` on evaluate, predict and md: ``auto`` is the CPU where torch sees no GPU
    (the same results as ``cpu``); a GPU torch does not see, or a device torch does not know,
    is a clear error before any work, never a silent CPU run."""
    import torch

    from atomlens.cli._common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    structures = tmp_path / "mols.xyz"
    ase.io.write(structures, [ase.build.molecule("CH4"), ase.build.molecule("H2O")])
    outputs = []
    for device in ("cpu", "auto"):
        assert main(["evaluate", str(trained / "run"), "--json", "--device", device]) == 0
        assert main(["predict", str(trained / "run"), str(structures), "--device", device]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    for device, message in (("cuda", "sees no CUDA GPU"), ("tpu9", "--device 'tpu9'")):
        for argv in (
            ["evaluate", str(trained / "run")],
            ["predict", str(trained / "run"), str(structures)],
            ["md", str(trained / "run"), str(structures), "--steps", "2"],
        ):
            assert main([*argv, "--device", device]) == 2
            assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.traj"))  # md wrote nothing
    with pytest.raises(ValueError, match="atomlens runs on cpu, cuda"):
        resolve_device("mps")  # torch knows it; atomlens does not run there
    # train: a GPU torch does not see is refused before the run folder is touched (it was a
    # Lightning traceback after the folder was written, and the retry was then refused)
    out = tmp_path / "run-gpu"
    argv = ["train", str(trained / "tiny.yaml"), "--no-progress", "--out", str(out)]
    assert main([*argv, "--device", "gpu"]) == 2
    assert "sees no CUDA GPU here" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--device", "gpu", "--ensemble", "2"]) == 2
    assert "sees no CUDA GPU here" in capsys.readouterr().err and not out.exists()


def energy_model_folder(tmp_path):
    from helpers import random_model

    from atomlens.models import save_model

    return save_model(random_model("schnet", target="energy").float(), tmp_path / "model")


def labelled_frames():
    """Structures carrying reference energies and forces, as extxyz and md.traj hold them."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for k, name in enumerate(["CH3OH", "H2O"]):
        atoms = ase.build.molecule(name)
        forces = np.full((len(atoms), 3), 0.25 * (k + 1))
        atoms.calc = SinglePointCalculator(atoms, energy=-100.0 - k, forces=forces)
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("suffix", ["extxyz", "traj"])
def test_predict_keeps_reference_values(tmp_path, capsys, suffix):
    model = energy_model_folder(tmp_path)
    labelled = tmp_path / f"labelled.{suffix}"
    ase.io.write(labelled, labelled_frames())
    result = tmp_path / "pred.extxyz"
    assert main(["predict", str(model), str(labelled), "--forces", "--out", str(result)]) == 0
    out = capsys.readouterr().out
    assert "atomic energy (eV)" in out and "(eV/Angstrom)" in out
    for k, atoms in enumerate(ase.io.read(result, ":")):
        # reference values untouched, predictions beside them
        assert atoms.get_potential_energy() == pytest.approx(-100.0 - k)
        np.testing.assert_allclose(atoms.get_forces(), 0.25 * (k + 1))
        predicted = atoms.info["atomlens_energy"]
        assert predicted != pytest.approx(-100.0 - k)
        assert atoms.arrays["atomlens_forces"].shape == (len(atoms), 3)
        assert atoms.arrays["atomlens_atomic_energy"].sum() == pytest.approx(predicted, abs=1e-4)
        assert len(str(float(predicted)).split(".")[1]) <= 6  # no float32 noise digits
    # the units travel with the frames: a .traj holds eV by definition, and the extxyz
    # written from it says so, so that atomlens reads its reference energies back
    from atomlens.data.sources.ase_files import read_structures

    stated = read_structures(result)[0].info
    assert stated.get("energy_unit") == ("eV" if suffix == "traj" else None)


@pytest.mark.parametrize(
    "content, message",
    [
        ("3\ncomment\nC 0 0 0\nH 1 0 0\n", "cannot read"),  # truncated
        ("2\ncomment\nXx 0 0 0\nH 1 0 0\n", "unknown element symbol 'Xx'"),  # unknown element
        ("2\ncomment\nC 0 0 0\nH 0 0 0\n", "overlapping"),  # two atoms at one place
        ("2\ncomment\nC nan 0 0\nH 1 0 0\n", "non-finite"),  # NaN coordinates
    ],
)
def test_predict_bad_input_is_a_clear_error(trained, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.xyz"
    bad.write_text(content)
    result = tmp_path / "never.extxyz"
    assert main(["predict", str(trained / "run"), str(bad), "--out", str(result)]) == 2
    err = capsys.readouterr().err
    assert "bad.xyz" in err and message in err
    assert not result.exists()


def test_unknown_target_and_missing_files(trained, capsys):
    assert (
        main(
            [
                "train",
                "--data",
                str(trained / "packed"),
                "--target",
                "E_foo",
                "--out",
                str(trained / "x"),
            ]
        )
        == 2
    )
    assert "unknown target" in capsys.readouterr().err
    assert main(["predict", str(trained / "nothing"), "x.xyz"]) == 2


@pytest.mark.parametrize(
    ("value", "expected"), [("forces", "forces"), ("0.5", 0.5), (None, "auto")]
)
def test_train_output_scale_option_reaches_the_config(value, expected):
    from atomlens.cli import build_parser
    from atomlens.cli.train import config_from_args

    argv = ["train", "--preset", "md17-schnet"] + (["--output-scale", value] if value else [])
    assert config_from_args(build_parser().parse_args(argv)).output_scale == expected


def test_train_num_workers_option_reaches_the_config():
    from atomlens.cli import build_parser
    from atomlens.cli.train import config_from_args

    argv = ["train", "--preset", "md17-schnet"]
    assert config_from_args(build_parser().parse_args(argv)).num_workers == 0
    parsed = build_parser().parse_args([*argv, "--num-workers", "3"])
    assert config_from_args(parsed).num_workers == 3
    with pytest.raises(ValueError, match="--num-workers must be >= 0"):  # the option's name
        config_from_args(build_parser().parse_args([*argv, "--num-workers", "-1"]))


def test_insight_isomers_says_how_many_the_model_trained_on(trained, tmp_path, capsys):
    """``insight isomers`` scores all isomers by default, training molecules included: it
    says how many of them the model trained on (on its own data set); with one split
    (--split train|val|test) there is nothing to count."""
    from atomlens.data.splits import load_split
    from atomlens.insight.isomers import isomer_indices

    run, packed = trained / "run", str(trained / "packed")
    found = isomer_indices(qm9_sample(), "C7H11NO")
    expected = int(np.isin(found, load_split(run / "split.npz")["train"]).sum())
    argv = ["insight", "isomers", str(run), "--data", packed, "--formula", "C7H11NO"]
    argv += ["--out", str(tmp_path / "iso.png")]
    assert main([*argv, "--json"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["n_isomers"] == len(found) == 4 and line["n_in_training_split"] == expected
    assert main(argv) == 0
    assert f"{expected} of them in the model's training split" in capsys.readouterr().out
    assert expected > 0  # (the sample's split puts some in training: the case to show)
    other_spelling = [*argv[:4], packed + "/", *argv[5:], "--json"]  # the same folder
    assert main(other_spelling) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["n_in_training_split"] == expected
    assert main([*argv, "--json", "--split", "train"]) == 0  # one split: no count
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "n_in_training_split" not in line and line["n_isomers"] == expected


def test_md_of_an_ensemble_with_replicas(trained, tmp_path, capsys, monkeypatch):
    """Several trajectories of an ensemble at once (this said "not an atomlens model folder
    (no config.json)"): the members' mean drives them, each log has their spread. Each
    member is read once (the element check and the run share them)."""
    import shutil

    from helpers import perturbed_copy

    from atomlens.models import io

    ensemble = tmp_path / "ens"
    shutil.copytree(trained / "run" / "model", ensemble / "model_0")
    perturbed_copy(trained / "run" / "model", ensemble / "model_1")  # not the same model
    (ensemble / "ensemble.json").write_text(json.dumps({"members": ["model_0", "model_1"]}))
    structure = tmp_path / "ch4.xyz"
    ase.io.write(structure, ase.build.molecule("CH4"))
    out = tmp_path / "md.traj"
    argv = ["md", str(ensemble), str(structure), "--steps", "4", "--interval", "1"]
    argv += ["--out", str(out)]
    reads = []
    real = io.load_model
    monkeypatch.setattr(io, "load_model", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    assert main([*argv, "--replicas", "2", "--no-compile"]) == 0
    assert sorted(p.name for p in reads) == ["model_0", "model_1"]  # each member read once
    printed = capsys.readouterr().out
    assert printed.count("ensemble spread: energy std up to") == 2
    for k in (0, 1):
        rows = list(csv.DictReader((tmp_path / f"md.{k}.csv").open()))
        assert len(rows) == 5 and float(rows[-1]["energy_std_eV"]) > 0  # two members differ
        assert "max_force_std_eV_A" in rows[0]


def test_training_without_a_test_split_says_so(trained, tmp_path, capsys):
    argv = ["train", str(trained / "tiny.yaml"), "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*argv, "--n-train", "0.5", "--n-val", "0.5", "--n-test", "0"]) == 0
    printed = capsys.readouterr().out
    assert "no test split (n_test = 0), so no test errors" in printed and "--split val" in printed
    assert main(["evaluate", str(tmp_path / "r")]) == 2  # a named error, not a traceback
    assert "the test split holds no structures" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "r"), "--split", "val"]) == 0


def test_one_model_twice_is_no_ensemble(trained, tmp_path, capsys):
    """``predict run run``: one model twice counted double and reported a spread of 0."""
    structures = tmp_path / "mols.xyz"
    ase.io.write(structures, [ase.build.molecule("CH4")])
    run = str(trained / "run")
    assert main(["predict", run, str(trained / "run" / "model"), str(structures)]) == 2
    assert "the same model is given twice as a member" in capsys.readouterr().err


def test_train_saves_a_relative_data_path_as_absolute(trained, tmp_path, monkeypatch):
    """``--data packed`` from one folder, ``evaluate`` from another: the saved config names
    the data absolutely (it said "packed: file not found")."""
    monkeypatch.chdir(trained)
    argv = ["train", "--data", "packed", "--target", "U0", "--n-train", "6", "--n-val", "3"]
    argv += ["--n-test", "3", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "rel")]
    argv += ["--batch-size", "3"]
    assert main(argv) == 0
    refused = tmp_path / "refused"  # a run refused before it wrote anything leaves no folder
    assert main([*argv[:5], "--n-train", "1.0", "--out", str(refused)]) == 2
    assert not refused.exists()
    saved = yaml.safe_load((tmp_path / "rel" / "train_config.yaml").read_text())
    assert saved["data"] == str((trained / "packed").resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tmp_path / "rel"), "--split", "test"]) == 0


def test_training_with_loader_workers_gives_the_same_model(trained, tmp_path):
    """``--num-workers 2``: batches built in worker processes are the training process's
    batches (same order, same neighbour lists): the same weights after two epochs."""
    from safetensors.torch import load_file

    argv = ["train", str(trained / "tiny.yaml"), "--no-progress", "--num-workers", "2"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    ours = load_file(tmp_path / "run" / "model" / "model.safetensors")
    reference = load_file(trained / "run" / "model" / "model.safetensors")
    assert ours.keys() == reference.keys()
    for key in ours:
        assert (ours[key] == reference[key]).all(), key


def test_commands_keep_a_dependencys_internal_deprecations_quiet():
    """Lightning constructs torch's deprecated ``LeafSpec`` on every run; the commands do not
    pass that FutureWarning on to the user (other warnings still show)."""
    import warnings

    from torch.utils._pytree import LeafSpec

    from atomlens.runtime import ignore_dependency_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LeafSpec()
        ignore_dependency_warnings()
        LeafSpec()
        warnings.warn("a user's own deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message)[:28] for w in caught] == [
        "`isinstance(treespec, LeafSp",
        "a user's own deprecation",
    ]


def test_train_on_a_file_takes_its_only_target(tmp_path, capsys):
    """``train --data FILE`` without --target: the file's only target (QM9's U0, the
    default, failed with "unknown target 'U0'" on every MD17 or extxyz file)."""
    from ase.build import molecule

    from atomlens.data.dataset import PackedDataset
    from atomlens.data.sources.ase_files import write_ase

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        frames.append(atoms)
    data = PackedDataset.from_structures(
        [(a.numbers, a.positions) for a in frames],
        {"energy": rng.normal(-2000.0, 0.1, len(frames))},
        {"energy": "eV"},
    )
    path = write_ase(tmp_path / "water.extxyz", data)
    argv = ["train", "--data", str(path), "--n-train", "6", "--n-val", "3", "--n-test", "3"]
    argv += ["--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert f"target: 'energy', the only one in {path}" in capsys.readouterr().out
    from atomlens.models.io import load_model

    assert load_model(tmp_path / "run").target == "energy"


def test_evaluate_on_another_file_takes_that_files_units(trained, capsys):
    """``evaluate --data`` takes --energy-unit and --length-unit for that file (the command
    had none, and its hint asked for them); the flags alone, without --data, are an error."""
    run, packed = str(trained / "run"), str(trained / "packed")
    assert main(["evaluate", run, "--data", packed, "--energy-unit", "eV", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 40
    assert main(["evaluate", run, "--energy-unit", "eV"]) == 2
    assert "describe a --data file" in capsys.readouterr().err


def test_evaluate_refuses_elements_the_model_never_saw(trained, tmp_path, capsys):
    """As predict, md and insight do: a score of untrained elements is extrapolation, given
    only with --allow-unknown-elements."""
    from ase.build import molecule

    from atomlens.data.dataset import PackedDataset

    silane = molecule("SiH4")
    path = PackedDataset.from_structures(
        [(silane.numbers, silane.positions)], {"U0": [-8000.0]}, {"U0": "eV"}
    ).save(tmp_path / "silane")
    run = str(trained / "run")
    assert main(["evaluate", run, "--data", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: element(s) Si never seen" in err and "--allow-unknown-elements" in err
    with pytest.warns(UserWarning, match="Si never seen"):
        assert main(["evaluate", run, "--data", str(path), "--allow-unknown-elements"]) == 0
    assert main(["evaluate", run, "--allow-unknown-elements"]) == 2
    assert "for a --data file" in capsys.readouterr().err


def test_reader_errors_in_words_and_a_closed_pipe_is_quiet(tmp_path, monkeypatch, capsys):
    """An unknown element symbol and an index past the last frame are named (ASE says
    ``KeyError: 'Xx'`` and ``StopIteration``); stdout's reader going away (``| head``) ends
    the command quietly with 141."""
    from atomlens.cli import train as train_command
    from atomlens.data.dataset import DataError
    from atomlens.data.sources.ase_files import read_structures

    (tmp_path / "xx.xyz").write_text("2\n\nC 0 0 0\nXx 1.2 0 0\n")
    (tmp_path / "w.xyz").write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    with pytest.raises(DataError, match="unknown element symbol 'Xx'"):
        read_structures(tmp_path / "xx.xyz")
    with pytest.raises(DataError, match="index 5 selects no frame; the file has 1 frame"):
        read_structures(tmp_path / "w.xyz", "5")
    assert len(read_structures(tmp_path / "w.xyz", "0")) == 1

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(train_command, "run_predict", closed_pipe)
    assert main(["predict", str(tmp_path), str(tmp_path / "w.xyz")]) == 141
    assert capsys.readouterr().err == ""
