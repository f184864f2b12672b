"""Training: overfitting, resuming a killed run, DDP equivalence, configs and presets."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import qm9_sample

from atomlens.data.splits import load_split
from atomlens.models import load_model
from atomlens.training import TrainConfig, evaluate, load_config, preset
from atomlens.training import train_model as train
from atomlens.training.module import AtomisticTask
from atomlens.training.train import fit_statistics

TINY_MODEL = {"representation": "schnet", "head_hidden": 16,
              "representation_kwargs": {"n_atom_basis": 32, "n_interactions": 2, "n_filters": 32,
                                        "n_rbf": 20, "cutoff": 5.0}}


def tiny_config(tmp_path, **kw) -> TrainConfig:
    base = {"target": "U0", "n_train": 20, "n_val": 10, "n_test": 10, "batch_size": 10,
            "lr": 3e-3, "max_epochs": 2, "progress": False, "out": str(tmp_path / "run"),
            "device": "cpu", "model": TINY_MODEL}
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


def test_overfit_twenty_molecules(data):
    """A tiny SchNet drives the training error on 20 QM9 molecules close to zero."""
    torch.manual_seed(0)
    from atomlens.models import build_model

    model = build_model(dict(TINY_MODEL, target="U0"))
    idx = np.arange(20)
    fit_statistics(model, data, idx)
    task = AtomisticTask(model, lr=3e-3)
    batch = data.batch(idx, model.cutoff)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    start = float((model(batch)["U0"] - batch.targets["U0"]).abs().mean())
    for _ in range(600):
        opt.zero_grad()
        loss = task.loss(batch, model(batch))
        loss.backward()
        opt.step()
        sched.step()
    mae = evaluate(model, data, idx)["U0_mae"]
    assert start > 0.05
    assert mae < 0.02 * start, (start, mae)
    assert mae < 0.01  # eV


def test_train_saves_model_split_and_metrics(tmp_path, data):
    config = tiny_config(tmp_path)
    metrics = train(config, data=data)
    out = tmp_path / "run"
    assert {"U0_mae", "U0_rmse", "epochs"} <= set(metrics)
    model = load_model(out / "model")
    split = load_split(out / "model" / "split.npz")
    assert sorted(map(len, split.values())) == [10, 10, 20]
    assert not set(split["train"]) & set(split["test"])
    again = evaluate(model, data, split["test"])
    assert again["U0_mae"] == pytest.approx(metrics["U0_mae"], rel=1e-5)
    doc = json.loads((out / "model" / "config.json").read_text())
    assert doc["model"]["unit"] == "eV" and doc["metadata"]["units"]["U0"] == "eV"
    assert (out / "logs").is_dir() and (out / "tb").is_dir()


def test_resume_continues_from_last_checkpoint(tmp_path, data):
    first = tiny_config(tmp_path, max_epochs=2)
    train(first, data=data)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1
    # the run is "killed" after epoch 2; resuming with a larger budget goes on from there
    train(first.updated(max_epochs=4), resume=True, data=data)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 3
    metrics = np.genfromtxt(next((tmp_path / "run" / "logs").glob("version_1/metrics.csv")),
                            delimiter=",", names=True)
    assert np.nanmin(metrics["epoch"]) >= 2  # the resumed run did not start again at epoch 0


def test_ema_training_runs(tmp_path, data):
    metrics = train(tiny_config(tmp_path, ema_decay=0.9), data=data)
    assert np.isfinite(metrics["U0_mae"])


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_two_processes_match_single_process(tmp_path, data):
    """2 CPU processes (gloo) on the same global batches give the single-process weights."""
    common = {"max_epochs": 2, "batch_size": 10, "lr": 1e-3, "seed": 3}
    single = tiny_config(tmp_path / "single", **common)
    train(single, data=data)
    ddp = tiny_config(tmp_path / "ddp", strategy="ddp_spawn", devices=2, **common)
    train(ddp, data=data)
    a = load_model(tmp_path / "single" / "run" / "model").state_dict()
    b = load_model(tmp_path / "ddp" / "run" / "model").state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_config_files_and_presets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: qm9-u0-schnet\ntarget: homo\nmodel:\n  head_hidden: 8\n")
    config = load_config(path)
    assert config.target == "homo" and config.model.head_hidden == 8
    assert config.model.representation_kwargs["n_interactions"] == 6
    path.write_text("target: U0\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
    assert preset("qm9-u0-dtnn").model.representation == "dtnn"


def test_unknown_target_is_a_clear_error(tmp_path, data):
    from atomlens.data import DataError
    from atomlens.training.train import load_dataset

    folder = data.save(tmp_path / "packed")
    with pytest.raises(DataError, match="unknown target 'E0'"):
        load_dataset(TrainConfig(data=str(folder), target="E0"))
    with pytest.raises(DataError, match="no forces"):
        load_dataset(TrainConfig(data=str(folder), target="U0", forces=True))


def test_refit_offset_recovers_a_constant_per_atom_shift(data):
    from helpers import random_model

    from atomlens.training.evaluate import predict_dataset
    from atomlens.training.train import refit_offset

    model = random_model("schnet")
    idx = np.arange(12)
    sub = data.subset(idx)
    pred = predict_dataset(model, sub, idx)["energy"]
    sub.targets = {"energy": pred + 0.3 * sub.n_atoms_per}
    sub.units["energy"] = "eV"
    delta = refit_offset(model, sub, idx)
    assert delta == pytest.approx(-0.3, abs=1e-9)
    np.testing.assert_allclose(predict_dataset(model, sub, idx)["energy"],
                               sub.targets["energy"], atol=1e-8)
