"""Fine-tuning from a saved model, ensembles (training, calculator, predict, MD spread)."""

import dataclasses

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.build import molecule
from helpers import qm9_sample, random_model
from test_training import tiny_config

from atomlens.calculator import Calculator
from atomlens.cli import main
from atomlens.ensemble import (
    EnsembleCalculator,
    load_ensemble,
    mean_and_spread,
    predict_ensemble,
)
from atomlens.md import SPREAD_COLUMNS, run_md
from atomlens.models import load_model, save_model
from atomlens.training import train_ensemble, train_model
from atomlens.training.ensemble import MANIFEST
from atomlens.training.train import fit_statistics


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("base")
    train_model(tiny_config(root, max_epochs=1), data=data)
    return root / "run" / "model"


def test_fine_tune_frozen_representation_keeps_weights_and_statistics(tmp_path, data, base):
    before = load_model(base)
    config = tiny_config(
        tmp_path,
        max_epochs=2,
        init_from=str(base),
        freeze_representation=True,
        model={"representation": "dtnn"},
    )  # replaced by the saved model's
    train_model(config, data=data)
    after = load_model(tmp_path / "run" / "model")
    assert after.config.representation == "schnet"
    for key, value in before.representation.state_dict().items():
        torch.testing.assert_close(after.representation.state_dict()[key], value, msg=key)
    assert not torch.equal(after.head[0].weight, before.head[0].weight)  # the head trained
    torch.testing.assert_close(after.atomref, before.atomref)  # statistics kept
    assert float(after.scale) == float(before.scale)


def test_fine_tune_refits_statistics_on_new_data(tmp_path, data, base):
    new = data.subset(np.arange(40))
    new.targets = {"U0": np.asarray(new.targets["U0"]) + 0.5 * new.n_atoms_per}  # 0.5 eV/atom
    config = tiny_config(
        tmp_path, max_epochs=1, init_from=str(base), refit_statistics=True, lr=1e-9
    )
    train_model(config, data=new)
    tuned = load_model(tmp_path / "run" / "model")
    expected = load_model(base)
    split = np.load(tmp_path / "run" / "split.npz")
    fit_statistics(expected, new, split["train"])
    torch.testing.assert_close(tuned.atomref, expected.atomref)
    assert not torch.allclose(tuned.atomref, load_model(base).atomref)


def test_fine_tune_on_another_target_of_the_same_kind(tmp_path, data, base):
    """A U0 model tuned on another extensive energy in eV (an MD17 file's "energy", here
    QM9's U): it predicts the new name, with statistics refit to it; refused without the
    refit, and for a quantity of another kind (intensive homo: mean pooling)."""
    with pytest.raises(ValueError, match="--refit-statistics"):
        train_model(tiny_config(tmp_path, target="U", init_from=str(base)), data=data)
    with pytest.raises(ValueError, match="sum pooling.*'homo' needs mean pooling"):
        config = tiny_config(tmp_path, target="homo", init_from=str(base), refit_statistics=True)
        train_model(config, data=data)
    config = tiny_config(
        tmp_path, max_epochs=1, target="U", init_from=str(base), refit_statistics=True
    )
    metrics = train_model(config, data=data, overwrite=True)
    assert "U_mae" in metrics
    tuned = load_model(tmp_path / "run" / "model")
    assert tuned.target == "U" and tuned.config.representation == "schnet"
    train_idx = np.load(tmp_path / "run" / "split.npz")["train"]
    for target in ("U", "U0"):  # the statistics are U's, not the base model's U0
        expected = load_model(base)
        expected.config = dataclasses.replace(expected.config, target=target)
        fit_statistics(expected, data, train_idx)
        same = torch.allclose(tuned.atomref, expected.atomref, rtol=1e-6, atol=1e-9)
        assert same == (target == "U")


def test_train_ensemble_shares_the_split_and_differs_in_seed(tmp_path, data):
    metrics = train_ensemble(tiny_config(tmp_path, max_epochs=1, seed=5), 2, data=data)
    assert len(metrics) == 2
    out = tmp_path / "run"
    a, b = (np.load(out / f"model_{k}" / "split.npz") for k in (0, 1))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a[name], b[name])
    models = load_ensemble(out)
    assert len(models) == 2
    assert not torch.equal(models[0].head[0].weight, models[1].head[0].weight)
    assert yaml.safe_load((out / "model_1" / "train_config.yaml").read_text())["seed"] == 6


def two_energy_models():
    return [random_model("schnet", seed=s, target="energy") for s in (0, 1)]


def test_ensemble_calculator_mean_and_spread():
    models = two_energy_models()
    atoms = molecule("CH3OH")
    singles = [Calculator(m) for m in models]
    energies = np.array([c.get_potential_energy(atoms) for c in singles])
    forces = np.stack([c.get_forces(atoms) for c in singles])
    calc = EnsembleCalculator(models)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), abs=1e-9)
    # two members: the population standard deviation is half their difference
    assert calc.get_property("energy_std") == pytest.approx(
        abs(energies[0] - energies[1]) / 2, abs=1e-9
    )
    np.testing.assert_allclose(atoms.get_forces(), forces.mean(0), atol=1e-9)
    np.testing.assert_allclose(
        calc.get_property("forces_std"), np.abs(forces[0] - forces[1]) / 2, atol=1e-9
    )
    per_atom = np.linalg.norm(np.abs(forces[0] - forces[1]) / 2, axis=1)
    assert calc.get_property("max_force_std") == pytest.approx(per_atom.max(), abs=1e-9)
    out = predict_ensemble(models, [atoms], forces=True)
    assert out["energy_std"][0] == pytest.approx(calc.get_property("energy_std"), abs=1e-9)
    np.testing.assert_allclose(out["forces"], forces.mean(0), atol=1e-6)
    np.testing.assert_allclose(out["forces_std"], np.abs(forces[0] - forces[1]) / 2, atol=1e-6)
    assert "forces" not in predict_ensemble(models, atoms)  # energies only by default
    with pytest.raises(ValueError, match="at least two"):
        EnsembleCalculator(models[:1])
    mean, spread = mean_and_spread([np.float32([1.0, 2.0]), np.float32([2.0, 5.0])])
    assert mean.dtype == spread.dtype == np.float64  # float32 members, float64 statistics
    np.testing.assert_array_equal(spread, [0.5, 1.5])


def test_ensemble_says_compiling_once(monkeypatch, caplog):
    """Each member compiles its own function, but the user reads one notice, naming the
    number of models."""
    import logging

    import atomlens.calculator

    compiled = []

    def fake_compile(
        function, device, mode=None
    ):  # the eager function: no minute-long compile here
        compiled.append(function)
        return function

    monkeypatch.setattr(atomlens.calculator, "compile_fixed_shapes", fake_compile)
    atoms = molecule("CH3OH")
    with caplog.at_level(logging.INFO, logger="atomlens"):
        atoms.calc = EnsembleCalculator(
            two_energy_models() + [random_model("schnet", seed=2, target="energy")], compile=True
        )
        atoms.get_potential_energy()
        atoms.positions[0, 0] += 0.01
        atoms.get_forces()
    assert len(compiled) == 3 and all(m._use_compiled for m in atoms.calc.members)
    assert caplog.text.count("compiling energy and forces") == 1
    assert "compiling energy and forces for CH4O (6 atoms; 3 models;" in caplog.text


def test_md_logs_the_ensemble_spread(tmp_path):
    models = two_energy_models()
    atoms = molecule("CH3OH")
    start = [Calculator(m).get_potential_energy(atoms.copy()) for m in models]
    log = run_md(models, atoms, steps=4, interval=2, logfile=tmp_path / "md.csv", dtype="float64")
    table = np.genfromtxt(tmp_path / "md.csv", delimiter=",", names=True)
    assert set(SPREAD_COLUMNS) <= set(table.dtype.names)
    assert log.energy_std[0] == pytest.approx(abs(start[0] - start[1]) / 2, abs=1e-8)
    np.testing.assert_allclose(table["energy_std_eV"], log.energy_std, rtol=1e-8)
    np.testing.assert_allclose(
        log.arrays()["max_force_std_eV_A"], table["max_force_std_eV_A"], rtol=1e-8
    )
    assert (table["max_force_std_eV_A"] > 0).all()


def test_md_of_a_committee_of_one_runs_its_model(tmp_path):
    """An ensemble folder of one member (train --ensemble 1) or a list of one model: MD runs
    that model alone (the ensemble calculator had refused it with fewer than two models,
    while batched MD took it)."""
    import json

    from atomlens.models.io import save_model

    model = two_energy_models()[0]
    save_model(model, tmp_path / "ens" / "model_0")
    (tmp_path / "ens" / MANIFEST).write_text(json.dumps({"members": ["model_0"]}))
    alone = run_md(model, molecule("CH3OH"), steps=2, dtype="float64", compile=False)
    for source in (tmp_path / "ens", [model]):
        log = run_md(source, molecule("CH3OH"), steps=2, dtype="float64", compile=False)
        assert log.etot == pytest.approx(alone.etot, rel=1e-12)


def test_ensemble_members_in_parallel_and_the_committee(tmp_path, data):
    """Two members trained at once in their own processes: both evaluate the same test
    structures, and the committee's errors are those of the mean of the members' models."""
    import json

    from atomlens.models.inference import predict_dataset
    from atomlens.runtime import available_cpus

    config = tiny_config(tmp_path, max_epochs=1, n_test=10, test_subset=6, seed=3)
    metrics = train_ensemble(config, 2, data=data, parallel=2)
    assert len(metrics) == 2 and all(m["n_test_evaluated"] == 6 for m in metrics)
    out = tmp_path / "run"
    saved = [np.load(out / f"model_{k}" / "test_predictions.npz") for k in (0, 1)]
    np.testing.assert_array_equal(saved[0]["indices"], saved[1]["indices"])
    indices = np.sort(saved[0]["indices"])
    threads = max(1, available_cpus() // 2)  # cores // parallel
    for k in (0, 1):
        member = yaml.safe_load((out / f"model_{k}" / "train_config.yaml").read_text())
        assert member["threads"] == threads and member["seed"] == 3 + k
    # float32 models: totals of ~1e4 eV round to ~1e-3 eV, batched in another order here
    ATOL = 2e-3
    models = load_ensemble(out)
    predicted = np.stack([predict_dataset(m, data, indices)["U0"] for m in models])
    reference = np.asarray(data.targets["U0"])[indices]
    committee = json.loads((out / "ensemble.json").read_text())["committee"]
    assert committee["n_evaluated"] == 6 and committee["n_members"] == 2
    np.testing.assert_allclose(
        committee["U0_mae"], np.abs(predicted.mean(0) - reference).mean(), atol=ATOL
    )
    np.testing.assert_allclose(
        committee["U0_rmse"], np.sqrt(((predicted.mean(0) - reference) ** 2).mean()), atol=ATOL
    )
    np.testing.assert_allclose(
        committee["member_U0_mae"], np.abs(predicted - reference).mean(1), atol=ATOL
    )
    np.testing.assert_allclose(committee["U0_spread_mean"], predicted.std(0).mean(), atol=ATOL)
    for k in (0, 1):
        np.testing.assert_allclose(metrics[k]["U0_mae"], committee["member_U0_mae"][k], atol=ATOL)


def test_committee_uses_the_structures_every_member_evaluated(tmp_path):
    from atomlens.training.ensemble import committee_metrics

    ref = np.array([1.0, 2.0, 3.0, 4.0])
    rows = {  # member: (indices in its evaluation order, predictions)
        "a": ([3, 0, 2, 1], [4.5, 1.0, 3.0, 2.0]),
        "b": ([1, 3, 2], [2.0, 3.5, 4.0]),  # cut short by a budget: no structure 0
    }
    for name, (idx, pred) in rows.items():
        (tmp_path / name).mkdir()
        np.savez(
            tmp_path / name / "test_predictions.npz",
            indices=np.array(idx),
            predicted=np.array(pred),
            reference=ref[idx],
            target="U0",
            unit="eV",
        )
    c = committee_metrics([tmp_path / "a", tmp_path / "b"])
    # structures 1, 2, 3: members (2.0, 3.0, 4.5) and (2.0, 4.0, 3.5); means 2, 3.5, 4
    assert c["n_evaluated"] == 3 and c["unit"] == "eV"
    assert c["target"] == "U0" and c["n_members"] == 2
    np.testing.assert_allclose(c["U0_mae"], (0 + 0.5 + 0) / 3)
    np.testing.assert_allclose(c["U0_rmse"], np.sqrt(0.25 / 3))
    np.testing.assert_allclose(c["member_U0_mae"], [0.5 / 3, 1.5 / 3])
    np.testing.assert_allclose(c["U0_spread_mean"], (0 + 0.5 + 0.5) / 3)
    assert committee_metrics([tmp_path / "a", tmp_path / "missing"]) == {}
    np.savez(  # an object array would need pickle to load: refused, never unpickled
        tmp_path / "b" / "test_predictions.npz",
        indices=np.array([1, 3, 2]),
        predicted=np.array([2.0, None, 4.0], dtype=object),
        reference=ref[[1, 3, 2]],
        target="U0",
        unit="eV",
    )
    with pytest.raises(ValueError, match="pickle"):
        committee_metrics([tmp_path / "a", tmp_path / "b"])


def test_committee_force_errors_follow_each_members_order(tmp_path):
    """Forces are packed per atom in each member's own evaluation order; the committee
    compares the same atoms of the structures every member evaluated."""
    from atomlens.training.ensemble import committee_metrics

    counts = np.array([2, 1, 3])  # atoms of structures 0, 1, 2
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(n, 3)) for n in counts]
    noise = {
        "a": [rng.normal(size=(n, 3)) for n in counts],
        "b": [rng.normal(size=(n, 3)) for n in counts],
    }
    order = {"a": [2, 0, 1], "b": [1, 2]}  # b was cut short: no structure 0
    for name, idx in order.items():
        (tmp_path / name).mkdir()
        np.savez(
            tmp_path / name / "test_predictions.npz",
            indices=np.array(idx),
            predicted=np.zeros(len(idx)),
            reference=np.zeros(len(idx)),
            target="energy",
            unit="eV",
            n_atoms=counts[idx],
            forces_predicted=np.concatenate([ref[m] + noise[name][m] for m in idx]),
            forces_reference=np.concatenate([ref[m] for m in idx]),
        )
    c = committee_metrics([tmp_path / "a", tmp_path / "b"])
    na = np.concatenate([noise["a"][m] for m in (1, 2)])  # structures 1, 2 in both
    nb = np.concatenate([noise["b"][m] for m in (1, 2)])
    err = (na + nb) / 2
    np.testing.assert_allclose(c["forces_mae"], np.abs(err).mean())
    np.testing.assert_allclose(c["forces_rmse"], np.sqrt((err**2).mean()))
    np.testing.assert_allclose(c["member_forces_mae"], [np.abs(na).mean(), np.abs(nb).mean()])
    spread = np.abs(na - nb) / 2  # two members: the population deviation per component
    np.testing.assert_allclose(c["forces_spread_mean"], np.linalg.norm(spread, axis=1).mean())


def test_an_interrupted_ensemble_resumes(tmp_path, data, capsys):
    """--resume of an ensemble (refused before, and the hint after a Ctrl-C said to use it):
    a finished member is kept, an interrupted one goes on from its checkpoint, and the
    manifest is written at the end."""
    import json
    import shutil

    config = tiny_config(tmp_path, max_epochs=1, seed=5)
    train_ensemble(config, 2, data=data)
    out = tmp_path / "run"
    # member 1 stopped after its first epoch: its checkpoint written, its model not yet
    shutil.rmtree(out / "model_1" / "model")
    (out / "model_1" / "metrics.json").unlink()
    (out / MANIFEST).unlink()
    kept = json.loads((out / "model_0" / "metrics.json").read_text())
    metrics = train_ensemble(config.updated(max_epochs=2), 2, data=data, resume=True)
    assert metrics[0] == kept  # not trained again
    assert metrics[1]["epochs"] == 2  # one more epoch after the checkpoint's one
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["committee"]["n_members"] == 2 and manifest["metrics"][1]["epochs"] == 2
    with pytest.raises(ValueError, match="give one"):
        train_ensemble(config, 2, data=data, resume=True, overwrite=True)
    # other settings: refused before any training (kept members had not been checked: a
    # committee of two learning rates and two splits)
    (out / "model_1" / "metrics.json").unlink()
    with pytest.raises(ValueError, match=r"model_0: --resume of an ensemble .*lr: 0.003 -> 0.05"):
        train_ensemble(config.updated(max_epochs=2, lr=0.05), 2, data=data, resume=True)
    assert not (out / "model_1" / "metrics.json").exists()  # nothing trained
    # --overwrite removes the manifest first: a kill before the end leaves no mixed
    # committee named in it (the old manifest had named old and new members together)
    from atomlens.training import ensemble

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    original = ensemble.committee_metrics
    ensemble.committee_metrics = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            train_ensemble(config.updated(lr=0.05), 2, data=data, overwrite=True)
    finally:
        ensemble.committee_metrics = original
    assert not (out / MANIFEST).exists()


def test_ensemble_budget_is_shared_by_the_rounds(tmp_path, data, monkeypatch):
    """--minutes bounds the whole ensemble: each round gets its share of the time left."""
    from atomlens.training import train as train_module

    calls = []

    def fake_train(config, **kw):
        calls.append((config.max_minutes, kw["started"], kw["test_seed"]))
        return {}

    monkeypatch.setattr(train_module, "train", fake_train)
    start = __import__("time").monotonic()
    train_ensemble(tiny_config(tmp_path, max_minutes=3.0, seed=4), 3, data=data, started=start)
    shares = [c[0] for c in calls]
    np.testing.assert_allclose(shares, [1.0, 1.5, 3.0], rtol=1e-3)  # 3/3, then 3/2, then 3/1
    assert all(c[1] >= start for c in calls) and {c[2] for c in calls} == {4}
    with pytest.raises(ValueError, match="parallel"):
        train_ensemble(tiny_config(tmp_path), 2, data=data, parallel=0)


def test_cli_ensemble_train_predict(tmp_path, data, capsys):
    packed = data.save(tmp_path / "packed")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(tmp_path, data=str(packed), max_epochs=1).to_dict())
    )
    assert main(["train", str(config), "--ensemble", "2", "--out", str(tmp_path / "ens")]) == 0
    assert (tmp_path / "ens" / "ensemble.json").is_file()
    _check_ensemble_evaluate(tmp_path / "ens", capsys)
    xyz = tmp_path / "mols.xyz"
    ase.io.write(xyz, [molecule("CH4"), molecule("H2O")])
    result = tmp_path / "pred.extxyz"
    assert main(["predict", str(tmp_path / "ens"), str(xyz), "--out", str(result)]) == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    for atoms in ase.io.read(result, ":"):
        assert atoms.info["atomlens_U0_std"] >= 0
        assert atoms.arrays["atomlens_atomic_U0_std"].shape == (len(atoms),)
    # fine-tuning from the command line, the target taken from the model
    assert (
        main(
            [
                "train",
                "--data",
                str(packed),
                "--init-from",
                str(tmp_path / "ens" / "model_0"),
                "--freeze-representation",
                "--epochs",
                "1",
                "--n-train",
                "20",
                "--n-val",
                "10",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(tmp_path / "tuned"),
            ]
        )
        == 0
    )
    assert load_model(tmp_path / "tuned").target == "U0"


def _check_ensemble_evaluate(ens, capsys):
    """``atomlens evaluate`` of an ensemble folder scores the members' mean on their shared
    test split (the committee in ensemble.json, computed from the members' saved test
    predictions) and refuses members trained on different splits."""
    import json
    import shutil

    capsys.readouterr()
    assert main(["evaluate", str(ens), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    saved = json.loads((ens / MANIFEST).read_text())["committee"]
    assert scored["split"] == "test" and scored["n_members"] == 2
    assert scored["n_evaluated"] == saved["n_evaluated"] == scored["n"] > 0
    for key in ("U0_mae", "U0_rmse", "U0_spread_mean"):  # float32, batched in another order
        np.testing.assert_allclose(scored[key], saved[key], atol=2e-3)
    np.testing.assert_allclose(scored["member_U0_mae"], saved["member_U0_mae"], atol=2e-3)
    assert main(["evaluate", str(ens)]) == 0
    text = capsys.readouterr().out
    assert "committee of 2 models" in text and "MEMBERS MAE" in text and "MEAN SPREAD" in text
    # one member's split changed: its test structures are not the other's
    mixed = ens.parent / "mixed"
    shutil.copytree(ens, mixed)
    split_file = mixed / "model_1" / "model" / "split.npz"
    with np.load(split_file) as f:
        split = {k: f[k].copy() for k in f.files}
    split["train"][0], split["test"][0] = split["test"][0], split["train"][0]
    np.savez(split_file, **split)
    assert main(["evaluate", str(mixed)]) == 2
    assert "trained on another split" in capsys.readouterr().err
    # a committee of one is scored as a committee (the same JSON keys whatever K)
    manifest = json.loads((mixed / MANIFEST).read_text())
    (mixed / MANIFEST).write_text(json.dumps(dict(manifest, members=["model_0"])))
    assert main(["evaluate", str(mixed), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["n_members"] == 1 and single["U0_spread_mean"] == 0.0
    np.testing.assert_allclose(single["U0_mae"], scored["member_U0_mae"][0], atol=1e-6)
    # commands that take one model name a member of a finished ensemble
    with pytest.raises(FileNotFoundError, match="an ensemble: this command takes one model"):
        load_model(ens)


def test_ensemble_members_from_paths(tmp_path):
    for k, model in enumerate(two_energy_models()):
        save_model(model, tmp_path / f"m{k}")
    assert len(load_ensemble([tmp_path / "m0", tmp_path / "m1"])) == 2


def test_a_member_with_cut_metrics_is_not_finished(tmp_path):
    """An ensemble member whose metrics.json a kill cut (written in place before) counts as
    started, so --resume runs it again instead of failing to parse it; metrics.json is now
    written whole or not at all."""
    from atomlens.training import run_folder
    from atomlens.training.ensemble import _member_state

    member = tmp_path / "model_1"
    (member / "model").mkdir(parents=True)
    (member / "checkpoints").mkdir()
    (member / "checkpoints" / "last.ckpt").write_bytes(b"")
    (member / "metrics.json").write_text("")
    assert _member_state(member) == "started"
    (member / "metrics.json").write_text('{"test": {}}')
    assert _member_state(member) == "done"
    (member / "checkpoints" / "last.ckpt").unlink()
    (member / "metrics.json").write_text('{"te')
    (member / run_folder.FINGERPRINT).write_text("{}")
    assert _member_state(member) == "empty"
