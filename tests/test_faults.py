"""Faults and bad input, one section per class of issue 11: each gives a clear error or a
correct result, and no command loses an existing model, dataset or trajectory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_model

from atomlens import fileio
from atomlens.models import load_model
from atomlens.models.io import save_model


def _dead_pid() -> int:
    """The id of a process that has exited (for debris left by a killed writer)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _same_weights(a, b) -> bool:
    return all(v.equal(b.state_dict()[k]) for k, v in a.state_dict().items())


# --------------------------------------------------------------- 1. interrupted saves
@pytest.fixture
def saved(tmp_path):
    model = random_model("schnet", seed=1)
    save_model(model, tmp_path / "model")
    return model, tmp_path / "model"


@pytest.mark.parametrize("failing_call", [0, 1])
def test_failed_rename_keeps_the_previous_model(saved, monkeypatch, failing_call):
    """The rename aside (call 0) or the rename in (call 1) fails: the old model still loads."""
    old, path = saved
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) - 1 == failing_call:
            raise OSError("injected rename failure")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        save_model(random_model("schnet", seed=2), path)
    monkeypatch.undo()
    loaded = load_model(path)
    assert _same_weights(loaded, old)
    assert [p.name for p in path.parent.iterdir()] == ["model"]  # no debris


def test_failed_write_keeps_the_previous_model(saved):
    old, path = saved

    def broken(p):
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="disk full"):
        save_model(random_model("schnet", seed=2), path, extra_files={"split.npz": broken})
    assert _same_weights(load_model(path), old)
    assert [p.name for p in path.parent.iterdir()] == ["model"]


def test_kill_between_the_renames_is_recovered_on_the_next_start(saved):
    """A writer killed after the rename aside left no ``model/``: loading renames it back,
    and debris of dead writers is removed; a live writer's folders are left alone."""
    old, path = saved
    host = fileio._host()
    aside = path.parent / f".model.old-{host}-{_dead_pid()}-abc123"
    os.replace(path, aside)
    tmp = path.parent / f".model.tmp-{host}-{_dead_pid()}-def456"
    tmp.mkdir()
    live = path.parent / f".model.tmp-{host}-{os.getppid()}-ghi789"
    live.mkdir()
    loaded = load_model(path)
    assert _same_weights(loaded, old)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["model", live.name])


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    from atomlens.data.splits import load_split, save_split

    debris = tmp_path / f".split.npz.tmp-{fileio._host()}-{_dead_pid()}-0a1b.npz"
    debris.write_bytes(b"half written")
    save_split(
        tmp_path / "split.npz",
        {"train": np.arange(3), "val": np.arange(3, 4), "test": np.arange(4, 6)},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.npz"]
    assert load_split(tmp_path / "split.npz")["test"].tolist() == [4, 5]


def test_saved_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_model(random_model("schnet"), tmp_path / "model")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "model").stat().st_mode & 0o777) == oct(0o755)
    for name in ("config.json", "model.safetensors"):
        assert oct((tmp_path / "model" / name).stat().st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------- 2. guarded --out
@pytest.fixture(scope="module")
def qm9():
    from helpers import qm9_sample

    return qm9_sample()


def _tiny(out, **kw):
    from helpers import tiny_train_config

    return tiny_train_config(out, **kw)


@pytest.fixture(scope="module")
def finished_run(qm9, tmp_path_factory):
    from atomlens.training import train_model as train

    out = tmp_path_factory.mktemp("guard") / "run"
    train(_tiny(out), data=qm9)
    return out


def test_a_second_run_on_a_used_folder_is_refused(qm9, finished_run):
    from atomlens.training import train_model as train
    from atomlens.training.run_folder import RunFolderError

    elements = load_model(finished_run).metadata["elements"]  # recorded for class 6
    assert {1, 6} <= set(elements) <= {1, 6, 7, 8, 9}
    before = (finished_run / "train_config.yaml").read_text()
    with pytest.raises(RunFolderError, match="not empty.*--resume.*--overwrite"):
        train(_tiny(finished_run, lr=1e-2), data=qm9)
    assert (finished_run / "train_config.yaml").read_text() == before  # the good run's config
    with pytest.raises(RunFolderError, match=r"n_train: 20 -> 25"):
        train(_tiny(finished_run, n_train=25, max_epochs=2), resume=True, data=qm9)
    assert (finished_run / "train_config.yaml").read_text() == before
    # another, smaller data file: the run's split does not fit it (was "split indices out
    # of range", before the fingerprint could say that the run is another)
    with pytest.raises(RunFolderError, match=r"different run.*split does not fit.*\(30 str"):
        train(_tiny(finished_run, max_epochs=2), resume=True, data=qm9.subset(np.arange(30)))
    assert (finished_run / "train_config.yaml").read_text() == before


def test_fingerprint_ignores_budgets_but_not_settings_data_or_split(qm9):
    from atomlens.training.run_folder import digest, fingerprint

    split = {"train": np.arange(20), "val": np.arange(20, 30), "test": np.arange(30, 40)}
    base = digest(fingerprint(_tiny("a", n_train=20), qm9, split))
    same = fingerprint(
        _tiny("b", n_train=20.0, max_epochs=9, max_minutes=3.0, device="auto"), qm9, split
    )
    assert digest(same) == base
    other_split = {**split, "train": np.arange(1, 21)}
    changed = qm9.subset(np.arange(len(qm9)))
    changed.targets["U0"] = changed.targets["U0"] + 1e-9
    for different in (
        fingerprint(_tiny("a", lr=1e-2), qm9, split),
        fingerprint(_tiny("a"), qm9, other_split),
        fingerprint(_tiny("a"), changed, split),
    ):
        assert digest(different) != base


def test_concurrent_run_and_resume_without_checkpoint(qm9, tmp_path, finished_run):
    from atomlens.training import run_folder
    from atomlens.training import train_model as train

    with (
        run_folder.locked(tmp_path / "busy"),
        pytest.raises(run_folder.RunFolderError, match="another atomlens train is running"),
    ):
        train(_tiny(tmp_path / "busy"), data=qm9)
    with pytest.raises(run_folder.RunFolderError, match="nothing to resume"):
        train(_tiny(tmp_path / "fresh"), resume=True, data=qm9)


def test_resume_refuses_a_foreign_or_hostile_checkpoint(qm9, tmp_path, finished_run):
    import shutil

    from atomlens.training import train_model as train
    from atomlens.training.run_folder import RunFolderError

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    last = out / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["atomlens_fingerprint"] = "another run"
    torch.save(checkpoint, last)
    with pytest.raises(RunFolderError, match="not written by the run"):
        train(_tiny(out, max_epochs=2), resume=True, data=qm9)
    torch.save({"state_dict": {}, "payload": fileio.Path("x")}, last)  # a pickled object
    with pytest.raises(RunFolderError, match="refusing it") as err:
        train(_tiny(out, max_epochs=2), resume=True, data=qm9)
    assert "weights_only=False" not in str(err.value)


def test_resume_with_fewer_epochs_than_done_is_a_clear_error(qm9, tmp_path):
    """A finished 2-epoch run resumed with --epochs 1: one clear error naming what was done
    (Lightning's own check raised a MisconfigurationException), the run left as it was;
    --epochs 2 (what was done) evaluates it again without training."""
    from atomlens.training import train_model as train
    from atomlens.training.run_folder import RunFolderError, epochs_done, load_checkpoint

    out = tmp_path / "run"
    train(_tiny(out, max_epochs=2), data=qm9)
    last = out / "checkpoints" / "last.ckpt"
    assert epochs_done(load_checkpoint(last)) == 2
    before = last.read_bytes()
    with pytest.raises(RunFolderError, match="has trained 2 epochs, more than --epochs 1"):
        train(_tiny(out, max_epochs=1), resume=True, data=qm9)
    assert last.read_bytes() == before
    assert not (out / "logs" / "version_1").exists()  # refused before Lightning started
    assert epochs_done({"epoch": 4}) == 5 and epochs_done({}) is None
    train(_tiny(out, max_epochs=2), resume=True, data=qm9)
    assert epochs_done(load_checkpoint(last)) == 2


def test_training_keeps_lightnings_chatter_and_internal_warnings_quiet(qm9, tmp_path, caplog):
    """Training (the Python API as the command) does not pass on Lightning's tips, its
    "GPU available" lines, or warnings about its own internals and about settings atomlens
    chose (a small set's few batches, the run's own checkpoint folder on --resume); the
    loggers' levels are restored afterwards."""
    import logging
    import warnings

    from atomlens.training import train_model as train

    chatty = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = chatty.level
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        train(_tiny(tmp_path / "run", max_epochs=2), data=qm9)
        train(_tiny(tmp_path / "run", max_epochs=3), resume=True, data=qm9)
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    for noise in ("Tip:", "GPU available", "LeafSpec", "logging interval", "is not empty"):
        assert noise not in said, noise
    assert chatty.level == level


def test_ctrl_c_in_training_keeps_the_epochs_and_says_how_to_go_on(
    qm9, tmp_path, monkeypatch, capsys
):
    """A Ctrl-C half-way through training: Lightning's shutdown ends in sys.exit(1), which
    training turns back into KeyboardInterrupt; the command says "interrupted" and how to go
    on (exit 130, no traceback); the finished epoch is kept and --resume trains the rest."""
    from atomlens.cli import main
    from atomlens.cli import train as train_command
    from atomlens.training import module
    from atomlens.training import train_model as train
    from atomlens.training.run_folder import epochs_done, load_checkpoint

    real, steps = module.AtomisticTask.training_step, []

    def interrupted_step(self, batch, batch_idx):
        steps.append(batch_idx)
        if len(steps) == 3:  # the first batch of the second epoch (2 batches per epoch)
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    out = tmp_path / "run"
    monkeypatch.setattr(module.AtomisticTask, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(out, max_epochs=3), data=qm9)
    monkeypatch.setattr(module.AtomisticTask, "training_step", real)
    assert epochs_done(load_checkpoint(out / "checkpoints" / "last.ckpt")) == 1
    # its folder holds no model yet: loading it says so and how to go on
    from atomlens.models import load_model

    with pytest.raises(FileNotFoundError, match="has not finished.*--resume goes on"):
        load_model(out)
    (tmp_path / "ens" / "model_0").mkdir(parents=True)  # an ensemble stopped before its end
    with pytest.raises(FileNotFoundError, match="ensemble whose training has not finished"):
        load_model(tmp_path / "ens")
    member = tmp_path / "ens" / "model_1"  # one of its members, stopped after an epoch
    (member / "checkpoints").mkdir(parents=True)
    (member / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train --ensemble command \(--out .*ens\)"):
        load_model(member)
    train(_tiny(out, max_epochs=3), resume=True, data=qm9)
    assert epochs_done(load_checkpoint(out / "checkpoints" / "last.ckpt")) == 3

    def ctrl_c(args):
        if getattr(args, "out", None):
            args.run_folder = Path(args.out)  # as run_train sets it, before training
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run_train", ctrl_c)
    monkeypatch.setattr(train_command, "run_evaluate", ctrl_c)
    assert main(["train", "--preset", "qm9-u0-demo", "--out", str(out)]) == 130
    assert main(["train", "--preset", "qm9-u0-demo", "--out", str(tmp_path / "x")]) == 130
    assert main(["evaluate", str(out)]) == 130
    err = capsys.readouterr().err.splitlines()
    train_hint = (
        "atomlens train: interrupted; every finished epoch is saved: run the same command "
        "with --resume to go on from the last one"
    )
    nothing = "atomlens train: interrupted; no epoch had finished, nothing to resume: run "
    nothing += "the command again"
    assert err == [train_hint, nothing, "atomlens evaluate: interrupted"]


def test_spawned_training_processes_keep_the_chatter_quiet_too(monkeypatch):
    """A rank that ddp_spawn starts is a fresh interpreter: the process-settings callback
    installs the warning filters (LeafSpec, DDP's broadcast_buffers advice) and logger
    levels there, as training's context does in the first process."""
    import logging
    import warnings

    from atomlens.training import train as training

    chatty = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(chatty, "level", logging.INFO)
    monkeypatch.setattr(training, "end_with_parent", lambda sig: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training._ProcessSettings(None, spawned=True).setup(None, None, "fit")
        warnings.warn("`broadcast_buffers` is deprecated. Use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
    assert chatty.level == logging.WARNING


def test_overwrite_replaces_the_run(qm9, tmp_path, finished_run):
    import shutil

    from atomlens.training import train_model as train

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "logs" / "version_7").mkdir(parents=True)  # an old run's log folder
    (out / "logs" / "notes.txt").write_text("mine")  # a user's file in a folder named logs
    (out / "tb" / "version_3").mkdir(parents=True)
    (out / "model.keep").write_text("mine")
    train(_tiny(out, seed=5), data=qm9, overwrite=True)
    assert "seed: 5" in (out / "train_config.yaml").read_text()
    # the old run's numbered log folders go; the new run's and the user's files stay
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["notes.txt", "version_0"]
    assert not (out / "tb" / "version_3").exists()
    assert (out / "model.keep").read_text() == "mine"


def test_checkpoints_are_renamed_into_place(qm9, tmp_path, monkeypatch):
    """Checkpoints are written beside their name and renamed over it (not through $TMPDIR,
    which may be another file system: there a kill mid-copy truncated last.ckpt)."""
    from atomlens.training import train as train_module

    written = []
    save = torch.save

    def recording(obj, path, *a, **kw):
        if isinstance(path, (str, os.PathLike)):  # Lightning's own save writes to a buffer
            written.append(Path(path))
        return save(obj, path, *a, **kw)

    monkeypatch.setattr(train_module.torch, "save", recording)
    out = tmp_path / "run"
    train_module.train(_tiny(out, max_epochs=1), data=qm9)
    saved = [p for p in written if p.suffix == ".ckpt"]
    assert saved and all(p.parent == out / "checkpoints" for p in saved)
    assert all(p.name.startswith((".best.ckpt.", ".last.ckpt.")) for p in saved)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from atomlens.training import train as train_module

    path = tmp_path / "last.ckpt"
    io = train_module._AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def broken(obj, f, *a, **kw):
        Path(f).write_bytes(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(train_module.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"epoch": 3}, path, storage_options={"a": 1})


@pytest.mark.parametrize(
    ("strategy", "spawned"),
    [
        ("ddp_spawn", True),
        ("ddp_fork", True),
        ("ddp_notebook", True),
        ("ddp", False),
        ("auto", False),
    ],
)
def test_multiprocessing_ranks_are_tied_to_the_command(
    qm9, tmp_path, monkeypatch, strategy, spawned
):
    """train() asks its process-settings callback to tie the ranks to the command exactly
    for the strategies whose ranks multiprocessing starts."""
    from lightning.pytorch.strategies import DDPStrategy

    from atomlens.training import train as train_module

    class Stop(Exception):
        pass

    seen = []

    def trainer(**kw):
        seen.extend(
            c.spawned for c in kw["callbacks"] if isinstance(c, train_module._ProcessSettings)
        )
        raise Stop

    monkeypatch.setattr(train_module.pl, "Trainer", trainer)
    with pytest.raises(Stop):
        train_module.train(_tiny(tmp_path / "run", strategy=strategy), data=qm9)
    assert seen == [spawned]
    assert train_module._multiprocessing_ranks(DDPStrategy(start_method="spawn"))
    assert not train_module._multiprocessing_ranks(DDPStrategy())


# --------------------------------------------------------------- 3. md: validate first, no loss
def test_empty_output_path_is_named(tmp_path):
    from atomlens.md import temporary_outputs

    assert list(temporary_outputs([None, tmp_path / "a.traj"])) == [tmp_path / "a.traj"]
    with pytest.raises(ValueError, match="output path is empty"):
        temporary_outputs([tmp_path / "a.traj", ""])


@pytest.fixture(scope="module")
def stiff_model(tmp_path_factory):
    """A random model with strong forces: stable at 0.5 fs, blown up at 100 fs."""
    torch.set_num_threads(1)
    model = random_model("schnet")
    model.scale.fill_(8.0)
    return save_model(model, tmp_path_factory.mktemp("md") / "model")


@pytest.fixture
def ethanol(tmp_path):
    import ase.build
    import ase.io

    path = tmp_path / "ethanol.xyz"
    ase.io.write(path, ase.build.molecule("CH3CH2OH"))
    return path


def test_md_blow_up_exits_non_zero_and_keeps_earlier_outputs(
    stiff_model, ethanol, tmp_path, capsys
):
    from atomlens.cli import main

    out = tmp_path / "run" / "md.traj"
    common = ["md", str(stiff_model), str(ethanol), "--out", str(out)]
    assert main([*common, "--steps", "20", "--timestep", "0.5"]) == 0
    log = out.with_suffix(".csv")  # beside --out, not in the working folder
    before = out.read_bytes(), log.read_bytes()
    assert main([*common, "--steps", "50", "--timestep", "100"]) != 0
    err = capsys.readouterr().err
    assert "drifted" in err and "shorten the time step" in err
    assert (out.read_bytes(), log.read_bytes()) == before
    assert (out.parent / "md.unstable.traj").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    # an extxyz trajectory states its units, so it reads back as data without guessing
    from atomlens.data.sources import read_any

    xyz = tmp_path / "md.extxyz"
    assert main([*common[:3], "--out", str(xyz), "--steps", "2", "--interval", "1"]) == 0
    assert len(read_any(xyz).targets["energy"]) == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature_K": -5.0}, "temperature must be finite and >= 0 K"),
        ({"timestep_fs": float("nan")}, "time step must be finite and > 0 fs"),
        ({"ensemble": "langevin", "friction": -1.0}, "friction must be finite and >= 0"),
        ({"max_drift_eV_per_atom": 0.0}, "max_drift_eV_per_atom must be > 0"),
        ({"max_temperature_K": -1.0}, "max_temperature_K must be > 0"),
    ],
)
def test_run_md_refuses_bad_settings_before_any_step(stiff_model, ethanol, settings, message):
    """The library's own checks (the command line's are stricter and name its options)."""
    import ase.io

    from atomlens.md import run_md

    with pytest.raises(ValueError, match=message):
        run_md(str(stiff_model), ase.io.read(ethanol), steps=2, compile=False, **settings)


def test_npt_refuses_zero_kelvin_and_a_non_finite_pressure(stiff_model):
    import ase.build

    from atomlens.md import run_md

    cell = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    for settings, message in [
        ({"temperature_K": 0.0}, "NPT needs a temperature > 0 K"),
        ({"pressure_bar": float("nan")}, "pressure must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_md(str(stiff_model), cell.copy(), ensemble="npt", steps=2, **settings)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--temperature", "-5"], "--temperature must be >= 0, not -5.0"),
        (["--timestep", "nan"], "--timestep must be a finite number > 0, not nan"),
        (["--ensemble", "langevin", "--friction", "-1"], "--friction must be >= 0, not -1.0"),
        (["--max-temperature", "1"], "above the limit of 1 K"),
    ],
)
def test_md_bad_settings_are_named(stiff_model, ethanol, tmp_path, capsys, extra, message):
    from atomlens.cli import main

    out = tmp_path / "md.traj"
    assert (
        main(["md", str(stiff_model), str(ethanol), "--steps", "5", "--out", str(out), *extra]) != 0
    )
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".csv").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1\n\nH 0 0 0\n", "at least two atoms"),
        ("2\n\nH 0 0 0\nH nan 0 0\n", "non-finite"),
    ],
)
def test_md_bad_structures_are_named(stiff_model, tmp_path, capsys, content, message):
    from atomlens.cli import main

    path = tmp_path / "bad.xyz"
    path.write_text(content)
    assert main(["md", str(stiff_model), str(path), "--out", str(tmp_path / "md.traj")]) != 0
    assert message in capsys.readouterr().err


# --------------------------------------------------------------- 4. units never guessed
def test_ase_file_with_energies_and_no_unit_is_refused(tmp_path):
    import ase.build
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from atomlens.data import DataError
    from atomlens.data.sources import read_any

    water = ase.build.molecule("H2O")
    water.calc = SinglePointCalculator(water, energy=-1.0, forces=np.zeros((3, 3)))
    for suffix in (".extxyz", ".db"):
        path = tmp_path / f"water{suffix}"
        ase.io.write(path, [water])
        with pytest.raises(DataError, match="does not state their unit"):
            read_any(path)
        assert read_any(path, energy_unit="kcal/mol").targets["energy"][0] == pytest.approx(
            -0.0433641, rel=1e-5
        )
    water.info["energy_unit"] = "hartree"  # stated in the file
    ase.io.write(tmp_path / "stated.extxyz", [water])
    assert read_any(tmp_path / "stated.extxyz").targets["energy"][0] == pytest.approx(
        -27.211386, rel=1e-7
    )
    water.info["force_unit"] = "eV/Angstrom"  # contradicts hartree / Angstrom
    ase.io.write(tmp_path / "mixed.extxyz", [water])
    with pytest.raises(DataError, match="not energy unit / length unit"):
        read_any(tmp_path / "mixed.extxyz")


def test_npz_force_unit_must_be_energy_per_length(tmp_path):
    from atomlens.data import DataError
    from atomlens.data.sources import read_md17

    path = tmp_path / "bad.npz"
    np.savez(
        path,
        z=[8, 1, 1],
        R=[[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]],
        E=[1.0],
        F=np.zeros((1, 3, 3)),
        e_unit="kcal/mol",
        r_unit="Angstrom",
        f_unit="eV/Angstrom",
    )
    with pytest.raises(DataError, match="not energy unit / length unit"):
        read_md17(path)


# --------------------------------------------------------------- 5. data on disk checked
def _corrupt(folder, name, change, keep_checksums=False):
    import json

    array = np.load(folder / name)
    change(array)
    np.save(folder / name, array)
    if not keep_checksums:  # as if written by an older atomlens, or checksums updated
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("checksums")
        (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("positions.npy", lambda a: a.__setitem__((5, 1), np.nan), "structure 0 has non-finite"),
        ("target.U0.npy", lambda a: a.__setitem__(3, np.inf), "target 'U0' has non-finite"),
        ("numbers.npy", lambda a: a.__setitem__(7, 0), "unknown element"),
        ("offsets.npy", lambda a: a.__setitem__(4, a[2]), "offsets not increasing"),
        ("offsets.npy", lambda a: a.__setitem__(-1, a[-1] - 1), "offsets must run from 0"),
    ],
)
def test_corrupted_packed_dataset_is_refused_on_load(qm9, tmp_path, name, change, message):
    from atomlens.data import DataError, PackedDataset

    folder = qm9.save(tmp_path / "packed")
    _corrupt(folder, name, change, keep_checksums=True)
    with pytest.raises(DataError, match=f"{name} changed since it was written"):
        PackedDataset.load(folder)
    _corrupt(folder, name, lambda a: None)
    with pytest.raises(DataError, match=message):
        PackedDataset.load(folder)


# --------------------------------------------------------------- 6. no silent extrapolation
@pytest.fixture
def chon_model(tmp_path):
    return save_model(
        random_model("schnet"), tmp_path / "model", metadata={"elements": [1, 6, 7, 8]}
    )


def test_unknown_elements_are_refused_unless_allowed(chon_model, tmp_path, capsys):
    import ase.build
    import ase.io

    from atomlens import Calculator
    from atomlens.cli import main
    from atomlens.data import DataError

    silane = ase.build.molecule("SiH4")
    model = load_model(chon_model)
    with pytest.raises(DataError, match=r"element\(s\) Si never seen in training"):
        model.predict(silane)
    with pytest.warns(UserWarning, match="Si never seen"):
        assert np.isfinite(model.predict(silane, allow_unknown_elements=True)["energy"]).all()
    silane.calc = Calculator(chon_model)
    with pytest.raises(DataError, match="Si never seen"):
        silane.get_potential_energy()
    path = tmp_path / "silane.xyz"
    ase.io.write(path, silane)
    assert main(["predict", str(chon_model), str(path)]) == 2
    assert "--allow-unknown-elements" in capsys.readouterr().err
    assert main(["predict", str(chon_model), str(path), "--allow-unknown-elements"]) == 0


def test_nan_weights_are_a_clear_error(tmp_path, capsys):
    import ase.build
    import ase.io

    from atomlens.cli import main

    model = random_model("schnet")
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("nan")
    folder = save_model(model, tmp_path / "model")
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) weights in \['head.0.weight'\]"):
        load_model(folder)
    ase.io.write(tmp_path / "water.xyz", ase.build.molecule("H2O"))
    assert main(["predict", str(folder), str(tmp_path / "water.xyz")]) == 2
    assert "non-finite" in capsys.readouterr().err
    from atomlens.models.guards import check_finite

    with pytest.raises(ValueError, match="non-finite .* energy"):
        check_finite({"energy": np.array([np.nan]), "atomic": np.zeros(3)})


# --------------------------------------------------------------- 7./8. clear messages
def _message(argv, capsys) -> str:
    from atomlens.cli import main

    assert main(argv) == 2
    return capsys.readouterr().err


def test_paths_of_the_wrong_kind_are_named(chon_model, ethanol, tmp_path, capsys):
    assert "is a folder, a file is expected" in _message(
        ["md", str(chon_model), str(tmp_path), "--out", str(tmp_path / "x.traj")], capsys
    )
    assert "is a file; a model is a folder" in _message(
        ["predict", str(ethanol), str(ethanol)], capsys
    )
    assert "no such file" in _message(
        ["predict", str(chon_model), str(tmp_path / "no.xyz")], capsys
    )
    err = _message(
        ["predict", str(chon_model), str(ethanol), "--out", str(tmp_path / "missing" / "p.extxyz")],
        capsys,
    )
    assert "missing does not exist" in err
    (tmp_path / "cfg.yaml").write_text("target: U0\n")
    assert "is a file; the output of a run is a folder" in _message(
        ["train", str(tmp_path / "cfg.yaml"), "--out", str(ethanol)], capsys
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of modes")
def test_unreadable_and_read_only_paths_are_named(chon_model, ethanol, tmp_path, capsys):
    ethanol.chmod(0)
    assert "no permission to read it" in _message(
        ["predict", str(chon_model), str(ethanol)], capsys
    )
    ethanol.chmod(0o644)
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert "Permission denied" in _message(
        ["md", str(chon_model), str(ethanol), "--steps", "1", "--out", str(locked / "md.traj")],
        capsys,
    )


def test_config_and_weights_that_do_not_fit(chon_model):
    import json

    doc = json.loads((chon_model / "config.json").read_text())
    doc["model"]["representation_kwargs"]["n_atom_basis"] = 32
    (chon_model / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="weights do not fit the architecture"):
        load_model(chon_model)
    try:
        load_model(chon_model)
    except ValueError as err:  # torch's list of every mismatch, cut to three
        assert "more)" in str(err) and len(str(err).splitlines()) == 1
    doc["model"]["representation_kwargs"]["n_atoms_basis"] = 32  # a misspelt key
    (chon_model / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="cannot rebuild the model"):
        load_model(chon_model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"cutoff": -5}, "cutoff must be a positive number"),
        ({"cutoff": float("nan")}, "cutoff must be a positive number"),
        ({"n_interactions": 0}, "n_interactions must be an integer >= 1"),
        ({"n_rbf": 2.5}, "n_rbf must be an integer >= 1"),
        ({"rbf_gamma": "wide"}, "rbf_gamma must be a positive number"),
    ],
)
def test_hand_edited_hyperparameters_are_named(chon_model, edit, message):
    """A config.json edited by hand: the model is refused when loaded, naming the value,
    not at its first prediction with a traceback."""
    import json

    doc = json.loads((chon_model / "config.json").read_text())
    doc["model"]["representation_kwargs"].update(edit)
    (chon_model / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"cannot rebuild the model.*{message}"):
        load_model(chon_model)


@pytest.mark.parametrize("elements", ["abc", [1, "C"], [0, 6], [1, 6, 200], True])
def test_hand_edited_training_elements_are_named(chon_model, elements):
    import json

    doc = json.loads((chon_model / "config.json").read_text())
    doc["metadata"]["elements"] = elements
    (chon_model / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="metadata elements must be a list of atomic numbers"):
        load_model(chon_model)


def test_negative_batch_size_and_fifo_are_named(qm9, chon_model, tmp_path, capsys):
    from atomlens.data.dataset import make_loader

    with pytest.raises(ValueError, match="batch size must be an integer >= 1, not -10"):
        make_loader(qm9, np.arange(5), -10, 5.0)
    fifo = tmp_path / "pipe.xyz"
    os.mkfifo(fifo)
    assert "not a regular file" in _message(["predict", str(chon_model), str(fifo)], capsys)


def test_split_sizes_error_suggests_n_train():
    from atomlens.data import DataError
    from atomlens.data.splits import random_split

    with pytest.raises(
        DataError,
        match=r"n_train=2000 \+ n_val=100 = 2100 exceed the "
        r"dataset's 200 structures.*--n-train 100",
    ):
        random_split(200, 2000, 100)


# --------------------------------------------------------------- 9. configs checked when read
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the config file is empty"),
        ("batch_size: '32'\n", "batch_size must be an integer, not str '32'"),
        ("batch_size: -10\n", "batch_size must be >= 1, not -10"),
        ("rho: 2\n", r"rho must be in \[0, 1\]"),
        ("output_scale: rms\n", "output_scale must be 'auto', 'std', 'forces' or a positive"),
        ("output_scale: -1.0\n", "output_scale must be 'auto', 'std', 'forces' or a positive"),
        ("output_scale: true\n", "output_scale must be a string or a number"),
        ("max_epochs: 0\n", "max_epochs must be >= 1"),
        ("lr: .nan\n", "lr must be > 0, not nan"),
        ("loss: l1\n", "loss must be 'mse' or 'mae', not 'l1'"),
        ("weight_decay: -0.1\n", "weight_decay must be >= 0, not -0.1"),
        ("forces: 1\n", "forces must be true or false"),
        ("model: 3\n", "model must be a mapping"),
        ("model:\n  head_hidden: 0\n", "model.head_hidden must be >= 1"),
        (
            "preset: qm9-u0-schnet\nmodel:\n  representation_kwargs:\n    filter_spacing: 1.0e-9\n",
            "table nodes",
        ),
    ],
)
def test_bad_config_values_are_refused_when_read(tmp_path, text, message):
    from atomlens.training import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        cfg = load_config(path)
        from atomlens.models import build_model

        build_model(cfg.model)  # the filter_spacing bound is the model's own
    assert "c.yaml" in str(err.value) or "table nodes" in str(err.value)


def test_nested_settings_merge_over_a_preset(tmp_path):
    from atomlens.training import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "preset: qm9-u0-schnet-neurips\nmodel:\n  representation_kwargs:\n    n_rbf: 50\n"
    )
    kwargs = load_config(path).model.representation_kwargs
    assert kwargs["n_rbf"] == 50
    assert (kwargs["n_interactions"], kwargs["n_filters"], kwargs["rbf_stop"]) == (3, 64, 30.0)
    path.write_text(
        "preset: qm9-u0-schnet\nmodel:\n  representation: dtnn\n"
        "  representation_kwargs: {n_atom_basis: 8}\n"
    )
    assert load_config(path).model.representation_kwargs == {"n_atom_basis": 8}


# --------------------------------------------------------------- 10. bounded sizes
def test_grid_sizes_are_bounded():
    import ase.build

    from atomlens.insight.potential_map import box_grid, plane_grid

    water = ase.build.molecule("H2O")
    with pytest.raises(ValueError, match="grid points, more than 1,000,000"):
        plane_grid(water, spacing=1e-4)
    with pytest.raises(ValueError, match="grid points"):
        box_grid(water, spacing=0.01)
    with pytest.raises(ValueError, match="positive number"):
        plane_grid(water, spacing=float("nan"))
    assert plane_grid(water, spacing=0.5)[0].shape[-1] == 3


# --------------------------------------------------------------- 11. distributed training
@pytest.mark.ddp
@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_spawn_shm"])
def test_ddp_three_processes_uneven_shares_energy_and_forces(qm9, tmp_path, strategy):
    """DDP (3 CPU processes; reductions through gloo, or through shared memory) on energies
    + forces gives the single-process weights, though no global batch splits evenly over
    the ranks: 21 training structures in batches of 10 are shares of 4/3/3, 4/3/3 and 1/0/0
    structures (and unequal atom counts; a rank with an empty share contributes zero
    gradients, not NaN). The cosine schedule broadcasts rank 0's rate every step."""
    from atomlens.data import PackedDataset
    from atomlens.training import train_model as train

    rng = np.random.default_rng(0)
    data = PackedDataset(
        qm9.numbers,
        qm9.positions,
        qm9.offsets,
        {"U0": qm9.targets["U0"], "forces": rng.normal(0.0, 0.5, (len(qm9.numbers), 3))},
        {"U0": "eV", "forces": "eV/Angstrom"},
    )
    common = {
        "forces": True,
        "rho": 0.5,
        "n_train": 21,
        "n_val": 3,
        "n_test": 0,
        "max_epochs": 1,
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "seed": 3,
        "threads": 1,
    }
    train(_tiny(tmp_path / "single", **common), data=data)
    metrics = train(_tiny(tmp_path / "ddp", strategy=strategy, devices=3, **common), data=data)
    assert metrics["epochs"] == 1  # counted in the spawned processes, read from last.ckpt
    single = load_model(tmp_path / "single").state_dict()
    ddp = load_model(tmp_path / "ddp").state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_md_stop_names_a_periodic_cell_a_structure(stiff_model, ethanol):
    """The unstable-run hint says "this molecule" for a molecule, "this structure" for a cell."""
    import ase.build
    import ase.io

    from atomlens.md import MDUnstableError, run_md

    cell = ase.build.bulk("C", "diamond", a=3.57, cubic=True)
    for atoms, noun in [(ase.io.read(ethanol), "molecule"), (cell, "structure")]:
        with pytest.raises(MDUnstableError, match=f"check that the model knows this {noun}"):
            run_md(
                str(stiff_model),
                atoms,
                steps=5,
                temperature_K=300.0,
                max_temperature_K=1.0,
                allow_unknown_elements=True,
            )


def test_figures_are_written_whole_or_not_at_all(tmp_path):
    """Figures (and the insight and explanation tables) are written to a temporary file and
    renamed: a failure while drawing keeps the previous figure and leaves no temporary."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = fileio.save_figure(fig, tmp_path / "plot.png")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    class Broken(Figure):
        def savefig(self, target, **kwargs):
            Path(target).write_bytes(b"half a fig")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fileio.save_figure(Broken(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
