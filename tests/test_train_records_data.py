"""A run's train_config.yaml names the data it was trained on, or says that none names it.

``train(config, data=...)`` from Python used to record ``config.data``'s default ("qm9")
as the run's data; ``atomlens evaluate`` of that run then read QM9 (a download) before its
fingerprint check refused it.
"""

import yaml
from helpers import qm9_sample, tiny_train_config, write_tiny_train_config

from atomlens.cli import main
from atomlens.training import train_model as train
from atomlens.training.train import GIVEN_DATA


def _config(out, data="qm9"):
    return tiny_train_config(out, data=data)


def _recorded(run):
    return yaml.safe_load((run / "train_config.yaml").read_text())["data"]


def test_data_given_in_python_is_recorded_as_such(tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(run), data=qm9_sample())
    assert _recorded(run) == GIVEN_DATA
    capsys.readouterr()
    # evaluate cannot read it again: it says so, instead of reading QM9 and refusing that
    assert main(["evaluate", str(run)]) != 0
    err = capsys.readouterr().err
    assert "trained on the data given to train() in Python" in err and "--data" in err
    # named as a file, the run's own test split is scored (the fingerprint matches)
    packed = qm9_sample().save(tmp_path / "packed")
    assert main(["evaluate", str(run), "--data", str(packed), "--split", "test"]) == 0
    assert "on 10 structures (test split)" in capsys.readouterr().out


def test_data_named_by_the_config_is_recorded_by_name(tmp_path):
    packed = qm9_sample().save(tmp_path / "packed")
    # the Python API given the data its config names (as the command line does)
    from atomlens.training.train import load_dataset

    config = _config(tmp_path / "api", data=str(packed))
    train(config, data=load_dataset(config))
    assert _recorded(tmp_path / "api") == str(packed)
    # the command line: a config file, and a data file alone (its only target)
    tiny = write_tiny_train_config(tmp_path / "tiny.yaml", packed)
    assert main(["train", str(tiny), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert _recorded(tmp_path / "cli") == str(packed)
    xyz = tmp_path / "mols.extxyz"
    import ase.io

    frames = [qm9_sample().atoms(k) for k in range(40)]
    for atoms in frames:
        atoms.info = {"energy": atoms.info["U0"]}
    ase.io.write(xyz, frames)
    argv = ["train", "--data", str(xyz), "--energy-unit", "eV", "--out", str(tmp_path / "file")]
    argv += ["--epochs", "1", "--n-train", "20", "--n-val", "10", "--no-progress"]
    assert main(argv) == 0
    assert _recorded(tmp_path / "file") == str(xyz)
    assert main(["evaluate", str(tmp_path / "file")]) == 0


def test_ensemble_members_in_their_own_processes_record_the_file(tmp_path):
    from atomlens.training.ensemble import train_ensemble

    packed = qm9_sample().save(tmp_path / "packed")
    train_ensemble(_config(tmp_path / "ens", data=str(packed)), 2, parallel=2)
    for k in (0, 1):
        assert _recorded(tmp_path / "ens" / f"model_{k}") == str(packed)
