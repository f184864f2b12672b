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
    # trained on cells without stress (or without a training config): the model's metadata
    # say the data were periodic; that model had been exported without a word
    from atomlens.export import export_model

    model = random_model("schnet", target="energy")
    model.metadata = {"periodic": True}
    quiet = save_model(model, tmp_path / "quiet", metadata={"periodic": True})
    assert main(["export", str(quiet), "--out", str(out)]) == 2
    assert "trained on periodic cells" in one_line_error(capsys, "export") and not out.exists()
    with pytest.raises(ValueError, match="trained on periodic cells"):
        export_model(model, out)
    assert export_model(model, out, molecules=True) == out


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


def test_outputs_never_destroy_an_input(chon_model, tmp_path, capsys):
    """An output that is an input file, a model's own file, a folder, or another output of
    the same command is refused before any work, and every input is left as it was."""
    start = tmp_path / "start.xyz"
    ase.io.write(start, ase.build.molecule("CH4"))
    numbered = tmp_path / "s.0.xyz"  # trajectory 0 of `--out s.xyz --replicas 2`
    numbered.write_bytes(start.read_bytes())
    config = chon_model / "config.json"
    before = {p: p.read_bytes() for p in [start, numbered, *chon_model.iterdir()] if p.is_file()}
    (tmp_path / "folder.traj").mkdir()
    md = ["md", str(chon_model), str(start), "--steps", "2", "--threads", "1", "--no-compile"]
    pmap = ["insight", "potential-map", str(chon_model), str(start), "--probe", "C"]
    cases = [
        (md + ["--out", str(start)], "md", "is the input file"),
        (md + ["--out", str(tmp_path / "t.traj"), "--log", str(start)], "md", "input file"),
        (md + ["--out", str(config)], "md", "would overwrite a file of"),
        (md + ["--out", str(tmp_path / "folder.traj")], "md", "is a folder"),
        (
            ["md", str(chon_model), str(numbered), "--replicas", "2", "--steps", "2"]
            + ["--out", str(tmp_path / "s.xyz")],
            "md",
            "is the input file",
        ),
        (
            ["export", str(chon_model), "--out", str(chon_model / "model.safetensors")],
            "export",
            "would overwrite a file of",
        ),
        (["predict", str(chon_model), str(start), "--out", str(config)], "predict", ".extxyz"),
        (
            ["predict", str(chon_model), str(start), "--out", str(chon_model / "a.extxyz")],
            "predict",
            None,  # a new file inside the model folder: allowed (it runs)
        ),
        (pmap + ["--cube", str(start)], "insight", "is the input file"),
        (
            pmap + ["--out", str(tmp_path / "m.png"), "--cube", str(tmp_path / "m.png")],
            "insight",
            "name one file",
        ),
        (
            ["explain", "molecule", str(chon_model), str(start), "--out", str(start)],
            "explain",
            "is a file; name a folder",
        ),
    ]
    for argv, command, expected in cases:
        if expected is None:
            assert main(argv) == 0, argv
            capsys.readouterr()
            continue
        assert main(argv) == 2, argv
        assert expected in one_line_error(capsys, command), argv
    for path, content in before.items():
        assert path.read_bytes() == content, path
    assert not list(tmp_path.rglob(".*tmp-*"))  # nothing half-written left behind


def test_check_outputs_rules(tmp_path):
    from atomlens.fileio import check_output_folder, check_outputs

    model, data = tmp_path / "model", tmp_path / "data.xyz"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data.write_text("")
    (tmp_path / "link.xyz").symlink_to(data)
    check_outputs({"--out": model / "new.traj", "--log": tmp_path / "new.csv"}, [model, data])
    check_outputs({"--out": None}, [model])
    for outputs, message in [
        ({"--out": tmp_path / "link.xyz"}, "is the input file"),  # the same file by a link
        ({"--out": model / "config.json"}, "would overwrite a file of"),
        ({"--out": model}, "is a folder"),
        ({"--out": tmp_path / "a", "--log": tmp_path / "x" / ".." / "a"}, "name one file"),
    ]:
        with pytest.raises((ValueError, OSError), match=message):
            check_outputs(outputs, [model, data])
    assert check_output_folder(tmp_path / "new") == tmp_path / "new"
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_folder(data)


def test_an_index_that_selects_no_frame_says_so(chon_model, tmp_path, capsys):
    path = tmp_path / "six.xyz"
    ase.io.write(path, [ase.build.molecule("CH4")] * 6)
    assert main(["predict", str(chon_model), str(path), "--index", "5:2"]) == 2
    assert "--index 5:2 selects none of its 6 frames" in one_line_error(capsys, "predict")


def test_sample_never_replaces_a_sampled_set_unless_told(tmp_path, capsys):
    """A sampled set costs quantum-chemistry hours: an existing --out is refused before any
    calculation (with --overwrite it is replaced when the new set is complete)."""
    out = tmp_path / "water.npz"
    out.write_bytes(b"earlier frames")
    assert main(["sample", "--smiles", "O", "--frames", "2", "--out", str(out)]) == 2
    assert "pass --overwrite" in one_line_error(capsys, "sample")
    folder = tmp_path / "iso"
    folder.mkdir()
    (folder / "test_other.db").write_bytes(b"earlier")
    argv = ["sample", "--isomers", "CCO", "COC", "--frames", "2", "--out", str(folder)]
    assert main(argv) == 2
    assert "test_other.db exists" in one_line_error(capsys, "sample")
    assert out.read_bytes() == b"earlier frames"
