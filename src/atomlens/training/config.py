"""Training configuration: one dataclass, plain YAML/JSON on disk, named presets.

A config file holds the fields of :class:`TrainConfig`; its ``model`` entry holds the fields
of :class:`~atomlens.models.ModelConfig`. Unknown keys are an error, never silently ignored.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..config_checks import KWARG_RULES, check_train_config
from ..fileio import atomic_file, check_readable
from ..models.potential import ModelConfig


@dataclass
class TrainConfig:
    #: data: "qm9", or a path to an MD17 .npz, ISO17/ASE .db, extxyz, or packed folder
    data: str = "qm9"
    #: target property; "energy" for energy(+forces) data sets
    target: str = "U0"
    #: units of a data file without unit metadata (MD17 npz: kcal/mol, Angstrom)
    energy_unit: str | None = None
    length_unit: str | None = None
    #: train on forces too: loss = rho ||E - E^||^2 + (1 - rho) <||F - F^||^2>_atoms
    forces: bool = False
    rho: float = 0.01
    #: sigma of the atom-wise output, E = sum_i (sigma e_i + mu + E_ref[Z_i]), fitted on the
    #: training split: "std" the residual's standard deviation per atom, "forces" the RMS
    #: force component times 1 Angstrom, "auto" the latter when training on forces and the
    #: former otherwise; or a number in the target's unit (data.statistics)
    output_scale: str | float = "auto"
    #: train on the stress of periodic cells too: + stress_weight <||sigma - sigma^||^2>
    #: (sigma in eV/Angstrom^3; 100 weighs a 0.01 eV/Angstrom^3 (1.6 GPa) error like a
    #: 0.1 eV/Angstrom force error)
    stress: bool = False
    stress_weight: float = 100.0
    #: "mse": the squared errors above; "mae": the same sums of absolute errors (per
    #: component for forces and stress), which weigh outliers less and fit the MAE that
    #: QM9 results are quoted in (rho and stress_weight were chosen for squared errors:
    #: with "mae" the same values weigh energy, forces and stress differently)
    loss: str = "mse"
    #: split sizes (ints, or fractions of the data set); test = the rest unless given
    n_train: float = 10000
    n_val: float = 1000
    n_test: float | None = None
    #: limit the data set to its first n structures (quick runs)
    max_structures: int | None = None
    seed: int = 0
    batch_size: int = 100
    lr: float = 5e-4
    lr_factor: float = 0.5
    lr_patience: int = 25
    lr_min: float = 1e-6
    #: "plateau": multiply the rate by lr_factor after lr_patience epochs without a better
    #: validation loss; "cosine": decay it from lr to lr_min over the run's budget (its
    #: minutes, else max_epochs), see training.budget.CosineToEnd
    lr_schedule: str = "plateau"
    #: decoupled weight decay (AdamW, Loshchilov & Hutter): every step shrinks the weights by
    #: lr * weight_decay; 0 keeps plain Adam
    weight_decay: float = 0.0
    max_epochs: int = 1000
    #: wall-clock budget of the whole run: loading, training and the final evaluation
    max_minutes: float | None = None
    #: the final evaluation uses at most this many test structures (a random subset; the
    #: metrics say how many), unless ``full_test``
    test_subset: int = 10000
    full_test: bool = False
    early_stopping_patience: int = 100
    ema_decay: float | None = None
    #: validation every n epochs
    check_val_every: int = 1
    #: "auto" (GPU when present), "cpu", "gpu"/"cuda"
    device: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    threads: int | None = None
    #: torch.compile the whole representation (energy training only: force training needs
    #: double backward). The pair operations are fused kernels already, so measure first: on
    #: the CPU a QM9 128/6 step took 47-52 ms compiled against 41-43 eager (2026-12-04).
    compile: bool = False
    num_workers: int = 0
    out: str = "runs/model"
    progress: bool = True
    #: fine-tuning: start from this saved model (folder) instead of a new one; its
    #: architecture replaces ``model`` and its statistics are kept unless refit
    init_from: str | None = None
    #: refit the atom references and shift/scale on the new training split
    refit_statistics: bool = False
    #: train the output head only (the representation's weights stay as loaded)
    freeze_representation: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        check_train_config(self)  # types and ranges, see config_checks

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        model = d.pop("model", {})
        if not isinstance(model, (dict, ModelConfig)):
            raise ValueError(  # noqa: TRY004 (a config error, reported as such)
                f"training config: model must be a mapping of model settings, "
                f"not {type(model).__name__} {model!r}"
            )
        return cls(
            **d, model=model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **overrides) -> TrainConfig:
        d = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key.startswith("model."):
                d["model"][key[6:]] = value
            elif key == "model":  # a whole ModelConfig (or its dict)
                d["model"] = value.to_dict() if isinstance(value, ModelConfig) else dict(value)
            else:
                d[key] = value
        return TrainConfig.from_dict(d)


SCHNETPACK_SCHNET = {
    "n_atom_basis": 128,
    "n_interactions": 6,
    "n_filters": 128,
    "n_rbf": 20,
    "cutoff": 5.0,
}
NEURIPS_SCHNET = {
    "n_atom_basis": 64,
    "n_interactions": 3,
    "n_filters": 64,
    "n_rbf": 300,
    "cutoff": None,
    "rbf_stop": 30.0,
    "rbf_gamma": 10.0,
}
PAPER_DTNN = {
    "n_atom_basis": 30,
    "n_interactions": 3,
    "n_factors": 60,
    "n_rbf": 101,
    "cutoff": 20.0,
    "rbf_stop": 20.0,
    "rbf_gamma": 12.5,
}

PRESETS: dict[str, dict] = {
    # SchNetPack-style SchNet on QM9 U0 (128 features, 6 interactions, 5 Angstrom cutoff);
    # the head as SchNetPack 2.1.1's Atomwise: 128 -> 64 -> 1 with SiLU. Trained at 3e-3 with a
    # cosine decay to the end of the budget: 1.17 kcal/mol in 25 minutes on one thread against
    # 1.56 for SchNetPack's 5e-4 halved on plateaus, and 1.65 for 5e-3 (docs/benchmarks.md)
    "qm9-u0-schnet": {
        "data": "qm9",
        "target": "U0",
        "batch_size": 100,
        "lr": 3e-3,
        "lr_schedule": "cosine",
        "model": {
            "representation": "schnet",
            "representation_kwargs": SCHNETPACK_SCHNET,
            "head_hidden": 64,
            "head_activation": "silu",
            "target": "U0",
        },
    },
    # the NeurIPS 2017 setting: 64 features, 3 interactions, 300 Gaussians on 0-30 A, no cutoff
    "qm9-u0-schnet-neurips": {
        "data": "qm9",
        "target": "U0",
        "batch_size": 32,
        "lr": 1e-3,
        "model": {
            "representation": "schnet",
            "representation_kwargs": NEURIPS_SCHNET,
            "head_hidden": 32,
            "target": "U0",
        },
    },
    # DTNN as in the paper: B = 30, T = 3, Gaussians every 0.2 A up to 20 A
    "qm9-u0-dtnn": {
        "data": "qm9",
        "target": "U0",
        "batch_size": 100,
        "lr": 1e-3,
        "model": {
            "representation": "dtnn",
            "representation_kwargs": PAPER_DTNN,
            "head_hidden": 15,
            "head_activation": "tanh",
            "target": "U0",
        },
    },
    # a quick CPU demo: small SchNet, a few minutes on 2 cores
    "qm9-u0-demo": {
        "data": "qm9",
        "target": "U0",
        "n_train": 10000,
        "n_val": 1000,
        "n_test": 5000,
        "batch_size": 50,
        "lr": 2e-3,
        "lr_patience": 3,
        "max_minutes": 6.0,
        "early_stopping_patience": 10,
        "model": {
            "representation": "schnet",
            "representation_kwargs": {
                "n_atom_basis": 64,
                "n_interactions": 3,
                "n_filters": 64,
                "n_rbf": 20,
                "cutoff": 5.0,
            },
            "head_hidden": 32,
            "target": "U0",
        },
    },
    # MD17 protocol: energies + forces, SchNetPack's 0.01 / 0.99 weighting; output scaled by
    # the RMS force (output_scale "auto"), which lets Adam take 10x SchNetPack's 5e-4, decayed
    # to the end of the run (aspirin, 6 min: 4e-3 and 6e-3 trained, 1e-2 diverged)
    "md17-schnet": {
        "target": "energy",
        "forces": True,
        "rho": 0.01,
        "n_train": 1000,
        "n_val": 1000,
        "batch_size": 10,
        "lr": 5e-3,
        "lr_schedule": "cosine",
        "model": {
            "representation": "schnet",
            "representation_kwargs": SCHNETPACK_SCHNET,
            "head_hidden": 64,
            "target": "energy",
        },
    },
    "md17-dtnn": {
        "target": "energy",
        "forces": True,
        "rho": 0.01,
        "n_train": 1000,
        "n_val": 1000,
        "batch_size": 10,
        "lr": 1e-3,
        "model": {
            "representation": "dtnn",
            "representation_kwargs": PAPER_DTNN,
            "head_hidden": 15,
            "head_activation": "tanh",
            "target": "energy",
        },
    },
}


def preset(name: str) -> TrainConfig:
    try:
        return TrainConfig.from_dict(copy.deepcopy(PRESETS[name]))
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML or JSON training config (``preset: name`` as a base is allowed)."""
    path = check_readable(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML/JSON ({err})") from err
    if doc is None or doc == {}:
        raise ValueError(
            f"{path}: the config file is empty; give the training settings (or "
            f"'preset: NAME' to start from a preset)"
        )
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a training config must be a mapping of keys to values")  # noqa: TRY004
    try:
        doc = _yaml_numbers(doc)
        base = doc.pop("preset", None)
        if base is None:
            return TrainConfig.from_dict(doc)
        return TrainConfig.from_dict(merge_settings(preset(base).to_dict(), doc))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def _yaml_numbers(doc: dict) -> dict:
    """``doc`` with numbers written as text taken as numbers where a setting is one.

    PyYAML follows YAML 1.1, whose floats need a decimal point: ``lr: 1e-3`` is read as the
    string '1e-3' (``1.0e-3`` is a float). A string that parses as a finite float becomes
    that float in the float settings of the config and of ``representation_kwargs``."""
    hints = typing.get_type_hints(TrainConfig)
    floats = {name for name, hint in hints.items() if float in (typing.get_args(hint) or (hint,))}
    doc = {key: _number(value) if key in floats else value for key, value in doc.items()}
    model = doc.get("model")
    if isinstance(model, dict) and isinstance(model.get("representation_kwargs"), dict):
        lengths = {name for name, (_, text) in KWARG_RULES.items() if "integer" not in text}
        kwargs = {
            key: _number(value) if key in lengths else value
            for key, value in model["representation_kwargs"].items()
        }
        doc["model"] = {**model, "representation_kwargs": kwargs}
    return doc


def _number(value):
    """``value``, or the finite float a string spells (else the string, refused later)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number):
            return number
    return value


def merge_settings(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, nested mappings key by key: overriding one
    ``representation_kwargs`` entry keeps the others. A model that switches representation
    takes its ``representation_kwargs`` whole (the other class's would not fit)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        old = merged.get(key)
        switched = (
            key == "model"
            and isinstance(value, dict)
            and "representation" in value
            and isinstance(old, dict)
            and value["representation"] != old.get("representation")
        )
        if isinstance(value, dict) and isinstance(old, dict):
            if switched:
                old = {k: v for k, v in old.items() if k != "representation_kwargs"}
            merged[key] = merge_settings(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def save_config(config: TrainConfig, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
