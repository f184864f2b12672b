"""``atomlens train`` and ``evaluate``: bad inputs refused by option name before the run
folder is touched, failed runs that do not block the next, and splits scored only on the
data they index."""

import json
import shutil

import numpy as np
import pytest
from ase.build import molecule

from atomlens.cli import main

#: seconds of training: a one-block SchNet of 8 features, one epoch of 6 water molecules
TINY = ["--n-train", "6", "--n-val", "3", "--n-test", "3", "--epochs", "1", "--batch-size", "3"]
TINY += ["--no-progress", "--threads", "1"]
TINY_MODEL = (
    "model: {representation: schnet, head_hidden: 4, representation_kwargs: "
    "{n_atom_basis: 8, n_interactions: 1, n_filters: 8, n_rbf: 6, cutoff: 4.0}}\n"
)


def water(n: int = 12, seed: int = 0):
    """``n`` rattled water molecules with energies in eV (units stated in the file)."""
    from atomlens.data.dataset import PackedDataset

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        frames.append(atoms)
    return PackedDataset.from_structures(
        [(a.numbers, a.positions) for a in frames],
        {"energy": rng.normal(-2000.0, 0.1, n)},
        {"energy": "eV"},
    )


def train_argv(root, out, *extra: str) -> list[str]:
    """A tiny training of the module's water file into the folder ``out``."""
    config = root / "tiny.yaml"
    config.write_text(f"data: {root / 'water.extxyz'}\ntarget: energy\n{TINY_MODEL}")
    return ["train", str(config), *TINY, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from atomlens.data.sources.ase_files import write_ase

    root = tmp_path_factory.mktemp("inputs")
    write_ase(root / "water.extxyz", water())
    write_ase(root / "other.extxyz", water(seed=1))
    assert main(train_argv(root, root / "run")) == 0
    return root


def refused(capsys, argv, *words) -> str:
    """Run ``argv``: a one-line error naming ``words``, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


# ----------------------------------------------------------------- 1, 2, 7: option values
@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--stress", "--stress-weight", "-1"], "--stress-weight must be >= 0"),
        (["--stress", "--stress-weight", "nan"], "--stress-weight must be >= 0"),
        (["--stress", "--stress-weight", "inf"], "--stress-weight must be >= 0"),
        (["--forces", "--rho", "-0.5"], "--rho must be in [0, 1]"),
        (["--stress-weight", "5"], "--stress-weight weighs a term"),  # without --stress
        (["--rho", "0.5"], "--rho weighs a term"),  # without --forces
        (["--ensemble", "0"], "--ensemble must be at least 1"),
        (["--ensemble", "-2"], "--ensemble must be at least 1"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["--seed", str(2**32)], "--seed must be in"),
        (["--n-val", "0"], "--n-val must be > 0"),
        (["--n-val", "0.01"], "--n-val 0.01"),  # a fraction of 12 structures: none
        (["--device", "foo"], "--device must be one of"),
        (["--strategy", "foo"], "strategy 'foo': unknown"),
        (["--devices", "0,x"], "--devices must be"),
    ],
)
def test_bad_train_options_are_refused_before_the_folder(root, tmp_path, capsys, options, named):
    out = tmp_path / "out"
    refused(capsys, train_argv(root, out, *options), named)
    assert not out.exists()


def test_a_weight_of_a_trained_term_is_fine_from_a_config(root, tmp_path, capsys):
    """The weight checks look at the final config: ``forces: true`` in the file counts."""
    from atomlens.cli import build_parser
    from atomlens.cli.train import config_from_args

    config = tmp_path / "c.yaml"
    config.write_text(f"data: {root / 'water.extxyz'}\nforces: true\nstress: true\n")
    args = build_parser().parse_args(["train", str(config), "--rho", "0.2", "--stress-weight", "0"])
    settings = config_from_args(args)
    assert (settings.rho, settings.stress_weight) == (0.2, 0.0)
    config.write_text(f"data: {root / 'water.extxyz'}\nstress_weight: -5.0\n")
    refused(capsys, ["train", str(config)], "stress_weight must be >= 0")


@pytest.mark.parametrize(
    ("line", "named"), [("precision: foo", "precision must be one of"), ("seed: -3", "seed must")]
)
def test_bad_config_values_are_refused_before_the_folder(root, tmp_path, capsys, line, named):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {root / 'water.extxyz'}\ntarget: energy\n{TINY_MODEL}{line}\n")
    out = tmp_path / "out"
    refused(capsys, ["train", str(config), *TINY, "--out", str(out)], named)
    assert not out.exists()


# ----------------------------------------------------------------- 5: YAML 1.1 numbers
def test_yaml_exponent_numbers_are_numbers(root, tmp_path, capsys):
    """``lr: 1e-3`` is the string '1e-3' to PyYAML (YAML 1.1): taken as the number."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(
        f"data: {root / 'water.extxyz'}\ntarget: energy\nlr: 1e-3\nn_train: 6e0\n"
        f'weight_decay: "1e-5"\n{TINY_MODEL}'.replace("cutoff: 4.0", "cutoff: 4e0")
    )
    argv = ["train", str(config), *TINY[2:], "--n-train", "6", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "r" / "train_config.yaml").read_text())
    assert (saved["lr"], saved["weight_decay"]) == (1e-3, 1e-5)
    assert saved["model"]["representation_kwargs"]["cutoff"] == 4.0
    config.write_text(f"data: {root / 'water.extxyz'}\nlr: 1e-3x\n")
    refused(capsys, ["train", str(config)], "lr must be a number")


# ----------------------------------------------------------------- 6: a failed run's folder
def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(
    root, tmp_path, capsys, monkeypatch
):
    import lightning.pytorch as pl

    def fail(*args, **kwargs):
        raise ValueError("failed in the first epoch")

    out = tmp_path / "o"
    argv = train_argv(root, out)
    with monkeypatch.context() as patch:
        patch.setattr(pl.Trainer, "fit", fail)
        refused(capsys, argv, "failed in the first epoch")
    assert (out / "fingerprint.json").is_file()
    (out / "notes.txt").write_text("the user's")  # not the run's: kept
    refused(capsys, [*argv, "--resume"], "nothing to resume", "without --resume")
    assert main(argv) == 0  # takes the folder over
    assert (out / "notes.txt").read_text() == "the user's"
    assert (out / "model").is_dir() and (out / "checkpoints" / "last.ckpt").is_file()
    refused(capsys, argv, "not empty")  # a finished run is kept


# ----------------------------------------------------------------- 3, 4: evaluate's split
@pytest.fixture
def ensemble(root, tmp_path):
    """Two members sharing the run's split: copies of the run (the second's weights moved
    slightly: a plain copy is the same model twice), with a manifest."""
    from helpers import perturbed_copy

    folder = tmp_path / "ensemble"
    for name in ("model_0", "model_1"):
        shutil.copytree(root / "run", folder / name)
    shutil.rmtree(folder / "model_1" / "model")
    perturbed_copy(root / "run" / "model", folder / "model_1" / "model")
    (folder / "ensemble.json").write_text(json.dumps({"members": ["model_0", "model_1"]}))
    return folder


def test_evaluate_refuses_a_split_of_changed_data(root, ensemble, tmp_path, capsys):
    from atomlens.data.sources.ase_files import write_ase

    data = root / "water.extxyz"
    original = data.read_bytes()
    old = tmp_path / "old"  # a run of an older atomlens: no fingerprint, evaluated as before
    shutil.copytree(root / "run", old)
    (old / "fingerprint.json").unlink()
    assert main(["evaluate", str(root / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    try:
        write_ase(data, water().subset(np.arange(12)[::-1]))  # the frames reordered
        for run in (root / "run", root / "run" / "model", ensemble):
            refused(capsys, ["evaluate", str(run)], "the data has changed", "fingerprint.json")
        refused(capsys, ["evaluate", str(root / "run"), "--split", "train"], "the train split")
        assert main(["evaluate", str(old), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n"] == 3
        # the changed file, scored whole, is fine
        assert main(["evaluate", str(root / "run"), "--data", str(data), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n"] == 12
    finally:
        data.write_bytes(original)
    assert main(["evaluate", str(ensemble), "--json"]) == 0


def test_evaluate_with_data_honours_a_split_only_on_the_runs_data(root, tmp_path, capsys):
    run, other, same = str(root / "run"), str(root / "other.extxyz"), str(root / "water.extxyz")
    for argv in ([run, "--data", other], [run, "--data", other, "--split", "all"]):
        assert main(["evaluate", *argv, "--json"]) == 0  # the default: the file whole
        doc = json.loads(capsys.readouterr().out)
        assert (doc["split"], doc["n"]) == ("all", 12)
    refused(capsys, ["evaluate", run, "--data", other, "--split", "test"], "--split test")
    assert main(["evaluate", run, "--data", same, "--split", "val", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["split"], doc["n"]) == ("val", 3)
    old = tmp_path / "old"
    shutil.copytree(root / "run", old)
    (old / "fingerprint.json").unlink()
    refused(capsys, ["evaluate", str(old), "--data", same, "--split", "test"], "cannot be checked")


def test_data_given_from_python_gets_the_file_checks(tmp_path):
    """train_model(config, data=...) cuts to max_structures and checks the target, as a file
    named in the config would be (the split indexed all structures, the target unchecked)."""
    from atomlens.data.splits import load_split
    from atomlens.training import TrainConfig, train_model
    from atomlens.training.config import ModelConfig

    model = ModelConfig(
        representation="schnet",
        head_hidden=4,
        representation_kwargs={"n_atom_basis": 8, "n_interactions": 1, "n_filters": 8},
    )
    common = {"n_train": 6, "n_val": 3, "max_epochs": 1, "batch_size": 3, "threads": 1}
    common["progress"] = False
    config = TrainConfig(
        target="energy", model=model, max_structures=12, out=str(tmp_path / "a"), **common
    )
    train_model(config, data=water(30))
    split = load_split(tmp_path / "a" / "split.npz")
    assert max(int(split[name].max()) for name in split if len(split[name])) < 12
    with pytest.raises(Exception, match="the data given to train..: forces requested"):
        train_model(config.updated(out=str(tmp_path / "b"), forces=True), data=water(30))


def test_lr_min_above_lr_is_refused():
    from atomlens.training import TrainConfig

    with pytest.raises(ValueError, match=r"lr_min \(0.01\) is above lr \(0.001\)"):
        TrainConfig(lr=1e-3, lr_min=1e-2)


def test_insight_split_only_on_the_runs_data(root, tmp_path, capsys):
    """insight isomers/rings --split picks molecules by the run's split indices: only on
    the data the run was trained on (its fingerprint), never on another --data file."""
    isomers = ["insight", "isomers", str(root / "run"), "--formula", "H2O", "--split", "test"]
    out = ["--out", str(tmp_path / "isomers.png")]
    refused(capsys, [*isomers, "--data", str(root / "other.extxyz"), *out], "--split test")
    assert main([*isomers, "--data", str(root / "water.extxyz"), *out]) == 0


def test_a_rate_below_the_default_floor_is_kept():
    """Fine-tuning at lr 1e-9: the default floor (1e-6) is clamped to the rate, so neither
    schedule raises it; only a floor set above the rate is an error."""
    from helpers import random_model

    from atomlens.training import TrainConfig
    from atomlens.training.module import AtomisticTask

    config = TrainConfig(lr=1e-9, lr_schedule="cosine")  # accepted: lr_min is the default
    task = AtomisticTask(random_model("schnet"), lr=config.lr, lr_min=config.lr_min)
    assert task.lr_min == 1e-9
