"""The command line's one error policy (``atomlens.cli.main``): an expected user error is one
line ``atomlens <command>: error: <message>`` on stderr with exit status 2 and no traceback;
anything else propagates with its traceback."""

import ase.build
import ase.io
import pytest
from helpers import random_model

from atomlens import _optional
from atomlens.cli import main
from atomlens.models.io import save_model


def one_line_error(capsys, command: str) -> str:
    """The message of the single error line of ``command`` on stderr (and nothing else)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    prefix = f"atomlens {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


@pytest.fixture
def chon_model(tmp_path):
    return save_model(
        random_model("schnet"), tmp_path / "model", metadata={"elements": [1, 6, 7, 8]}
    )


def test_bad_value(capsys):
    assert main(["explain", "--threads", "0"]) == 2
    assert one_line_error(capsys, "explain") == "--threads must be >= 1, not 0"
    assert main(["explain"]) == 2  # a value the command needs
    assert "--out" in one_line_error(capsys, "explain")


def test_bad_input_file(tmp_path, capsys):
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\ncomment\nC 0 0 0\n")  # truncated
    assert main(["md", str(tmp_path / "model"), str(bad)]) == 2
    message = one_line_error(capsys, "md")
    assert str(bad) in message and "cannot read" in message


def test_unknown_element(chon_model, tmp_path, capsys):
    """Refused naming the file the user gave (not the Calculator or BatchedMD inside), before
    anything is written."""
    path = tmp_path / "silane.xyz"
    ase.io.write(path, ase.build.molecule("SiH4"))
    assert main(["predict", str(chon_model), str(path)]) == 2
    message = one_line_error(capsys, "predict")
    assert message.startswith(f"{path}: element(s) Si never seen"), message
    assert "--allow-unknown-elements" in message
    for replicas in ("1", "2"):  # one trajectory (Calculator), several (BatchedMD)
        out = tmp_path / f"md{replicas}.traj"
        argv = ["md", str(chon_model), str(path), "--replicas", replicas, "--out", str(out)]
        assert main([*argv, "--steps", "2"]) == 2
        message = one_line_error(capsys, "md")
        assert message.startswith(f"{path}: element(s) Si never seen"), message
        assert not list(tmp_path.glob("md*"))


def test_broken_structures_are_named_by_their_file(chon_model, tmp_path, capsys):
    """insight and explain refuse non-finite coordinates naming the file (they said
    "<atoms>: structure 0 ...", the placeholder of a Python call)."""
    path = tmp_path / "nan.xyz"
    path.write_text("3\n\nO 0 0 0\nH nan 0 0\nH 0 0.96 0\n")
    for argv in (
        ["insight", "atomic-energies", str(chon_model), str(path)],
        ["insight", "extensivity", str(chon_model), str(path)],
        ["explain", "molecule", str(chon_model), str(path), "--out", str(tmp_path / "x")],
    ):
        assert main(argv) == 2
        message = one_line_error(capsys, argv[0])
        assert message.startswith(f"{path}: ") and "non-finite" in message, message


def test_missing_file(tmp_path, capsys):
    assert main(["export", str(tmp_path / "no_model"), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "no_model" in one_line_error(capsys, "export")


def test_export_refuses_a_model_trained_on_cells(tmp_path, capsys):
    """The exported program has no cell input: a model trained on periodic cells (stress)
    would silently treat a crystal as a cluster. Refused unless --molecules."""
    from atomlens.training.config import TrainConfig, save_config

    folder = save_model(random_model("schnet", target="energy"), tmp_path / "model")
    save_config(
        TrainConfig(target="energy", forces=True, stress=True), folder / "train_config.yaml"
    )
    out = tmp_path / "m.pt2"
    assert main(["export", str(folder), "--out", str(out)]) == 2
    message = one_line_error(capsys, "export")
    assert "periodic cells" in message and "--molecules" in message and not out.exists()


def test_digits_study_checks_its_input_before_training(tmp_path, capsys):
    """Bad values and a --model path whose folder is missing are found before the CNN trains
    (it was lost at the save); another file's weights are named, not a state-dict dump."""
    out = str(tmp_path / "e")
    assert main(["explain", "--out", out, "--n-images", "0"]) == 2
    assert one_line_error(capsys, "explain") == "n_images must be >= 1, not 0"
    missing = tmp_path / "no_dir" / "d.safetensors"
    assert main(["explain", "--out", out, "--model", str(missing)]) == 2
    assert "folder does not exist" in one_line_error(capsys, "explain")
    other = save_model(random_model("schnet"), tmp_path / "model") / "model.safetensors"
    assert main(["explain", "--out", out, "--model", str(other), "--epochs", "1"]) == 2
    assert "not the weights of the digits CNN" in one_line_error(capsys, "explain")


def test_missing_extra(monkeypatch, tmp_path, capsys):
    real = _optional.available
    monkeypatch.setattr(_optional, "available", lambda m: not m.startswith("sklearn") and real(m))
    assert main(["explain", "--out", str(tmp_path / "explain")]) == 2
    assert 'pip install "atomlens[explain]"' in one_line_error(capsys, "explain")


def test_run_folder_conflict(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--resume", "--overwrite"]
    assert main(argv) == 2
    assert "give one" in one_line_error(capsys, "train")


def test_sample_errors_follow_the_policy(tmp_path, capsys):
    """``sample`` had its own copy of the policy (on stdout); now it raises like the others."""
    assert main(["sample", "--smiles", "O", "--frames", "3", "--out", str(tmp_path / "x.txt")]) == 2
    assert ".npz" in one_line_error(capsys, "sample")
    assert capsys.readouterr().out == ""
    # --cells strains copies of a periodic cell: on a molecule it was ignored without a word
    out = tmp_path / "w.extxyz"
    assert main(["sample", "--smiles", "O", "--cells", "3", "--out", str(out)]) == 2
    assert "periodic cell" in one_line_error(capsys, "sample") and not out.exists()


@pytest.mark.parametrize("switch", ["flag", "environment"])
def test_debug_shows_the_traceback_of_expected_errors(switch, monkeypatch, capsys):
    argv = ["explain"]
    if switch == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("ATOMLENS_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError" in err
    assert err.rstrip().splitlines()[-1].startswith("atomlens explain: error: ")


def test_an_unexpected_error_raises_with_its_traceback(monkeypatch):
    import atomlens.cli.export

    def broken(args):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(atomlens.cli.export, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["export", "model"])
