"""Type and range checks of configurations, run whenever a config is built or read.

Each field is checked against its annotation in the dataclass (``int`` refuses ``"32"`` and
``True``; ``float`` takes integers too), then against a range rule, so a wrong value fails
when the config is read, with its name and value, not as a traceback deep in training.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import fields

_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "a mapping",
    type(None): "null",
}


def _matches(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never a count or a rate here
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # nested dataclasses are checked on their own


def _kinds(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (typing.get_origin(hint) or hint,)


def check_types(obj, where: str) -> None:
    """Raise ValueError naming the first field whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, kinds = getattr(obj, f.name), _kinds(hints[f.name])
        if not any(_matches(value, kind) for kind in kinds):
            expected = " or ".join(_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
            raise ValueError(
                f"{where}{f.name} must be {expected}, not {type(value).__name__} {value!r}"
            )


def check_ranges(obj, rules: dict, where: str) -> None:
    """``rules``: field -> (test, description); None values pass (optional fields)."""
    for name, (test, description) in rules.items():
        value = getattr(obj, name)
        if value is None:
            continue
        ok = test(value) if not isinstance(value, float) or math.isfinite(value) else False
        if not ok:
            raise ValueError(f"{where}{name} must be {description}, not {value!r}")


#: how ``TrainConfig.output_scale`` names the fitted scales (see training.train.fit_statistics)
OUTPUT_SCALES = ("auto", "std", "forces")


#: ``TrainConfig.device``: the accelerators atomlens runs on ("gpu" is "cuda"; Lightning's
#: others, mps and tpu, failed with a traceback after the run folder was written)
DEVICES = ("auto", "cpu", "gpu", "cuda")
#: ``TrainConfig.precision``: Lightning's precision names (checked here: Lightning's own
#: error came after the run folder was written)
PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISIONS += ("32", "64", "16", "bf16")  # the older names Lightning still takes
#: the largest seed NumPy and Lightning take (member k of an ensemble: seed + k)
MAX_SEED = 2**32 - 1


def positive(value) -> bool:
    return value > 0


def at_least_one(value) -> bool:
    return value >= 1


def non_negative(value) -> bool:
    return value >= 0


TRAIN_RULES = {
    "rho": (lambda v: 0 <= v <= 1, "in [0, 1] (the energy weight of the loss)"),
    # a negative weight would reward stress errors
    "stress_weight": (non_negative, ">= 0 (the weight of the stress term of the loss)"),
    "n_train": (positive, "> 0 (a count, or a fraction of the data set)"),
    # validation picks the best epoch, stops early and steers the plateau schedule
    "n_val": (positive, "> 0 (a count, or a fraction of the data set; training validates)"),
    "n_test": (non_negative, ">= 0"),
    "max_structures": (at_least_one, ">= 1"),
    # refused with the config, before the run folder (it had failed after writing it)
    "test_subset": (at_least_one, ">= 1 (test structures evaluated; --full-test for all)"),
    # NumPy's and Lightning's seeds are unsigned 32-bit integers
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in [0, {MAX_SEED}]"),
    "batch_size": (at_least_one, ">= 1"),
    "lr": (positive, "> 0"),
    "lr_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
    "lr_patience": (non_negative, ">= 0"),
    "lr_min": (non_negative, ">= 0"),
    "lr_schedule": (lambda v: v in ("plateau", "cosine"), "'plateau' or 'cosine'"),
    "loss": (lambda v: v in ("mse", "mae"), "'mse' or 'mae'"),
    "weight_decay": (non_negative, ">= 0"),
    "output_scale": (
        lambda v: v in OUTPUT_SCALES if isinstance(v, str) else v > 0,
        "'auto', 'std', 'forces' or a positive number (the target's unit)",
    ),
    "max_epochs": (at_least_one, ">= 1"),
    "max_minutes": (positive, "> 0"),
    "early_stopping_patience": (non_negative, ">= 0"),
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "check_val_every": (at_least_one, ">= 1"),
    "devices": (
        lambda v: re.fullmatch(r"auto|\d+(,\d+)*", v) if isinstance(v, str) else v >= 1,
        ">= 1, 'auto', or GPU indices such as '0,1'",
    ),
    "device": (lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "num_nodes": (at_least_one, ">= 1"),
    "threads": (at_least_one, ">= 1"),
    "num_workers": (non_negative, ">= 0"),
    "data": (bool, "a non-empty string"),
    "target": (bool, "a non-empty string"),
    "out": (bool, "a non-empty string"),
}

MODEL_RULES = {
    "head_hidden": (at_least_one, ">= 1"),
    "aggregation": (lambda v: v in ("sum", "mean"), "'sum' or 'mean'"),
    "max_z": (lambda v: 1 <= v <= 118, "in [1, 118]"),
}

#: representation_kwargs: counts and lengths (Angstrom), None allowed where the class allows
KWARG_RULES = {
    **{
        name: (at_least_one, "an integer >= 1")
        for name in ("n_atom_basis", "n_interactions", "n_filters", "n_rbf", "n_factors")
    },
    **{
        name: (positive, "a positive number")
        for name in ("cutoff", "rbf_stop", "rbf_gamma", "filter_spacing")
    },
}


def check_train_config(config) -> None:
    """Types and ranges of a :class:`TrainConfig` and of its model configuration."""
    check_types(config, "training config: ")
    check_ranges(config, TRAIN_RULES, "training config: ")
    default_min = type(config).__dataclass_fields__["lr_min"].default
    if config.lr_min > config.lr and config.lr_min != default_min:
        # a floor above the start: the cosine would raise the rate. The default floor
        # above a small rate (fine-tuning) is that rate (training.module)
        raise ValueError(
            f"training config: lr_min ({config.lr_min:g}) is above lr ({config.lr:g}); the "
            f"learning rate decays from lr down to lr_min"
        )
    check_model_config(config.model, "training config: model.")


def _check_kwarg_names(model, where: str) -> None:
    """The representation's own settings only, named before any run folder is written (a
    misspelt one had failed inside the model class after the run folder was made)."""
    import difflib
    import inspect

    from .models.base import representation_class

    try:
        cls = representation_class(model.representation)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}representation: {err}") from None
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "max_z"}
    for name in model.representation_kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where}representation_kwargs.{name}: not a setting of "
                f"{model.representation!r}{hint}; its settings: {', '.join(sorted(known))}"
            )


def check_model_config(model, where: str = "model config: ") -> None:
    """Types and ranges of a :class:`~atomlens.models.ModelConfig` and its representation's
    sizes and lengths (:data:`KWARG_RULES`): when a model is built (``build_model``: from a
    training config, or from a saved ``config.json``, perhaps edited by hand)."""
    check_types(model, where)
    check_ranges(model, MODEL_RULES, where)
    _check_kwarg_names(model, where)
    for name, value in model.representation_kwargs.items():
        if name not in KWARG_RULES or value is None:
            continue  # (unknown names: refused by _check_kwarg_names above)
        test, description = KWARG_RULES[name]
        integer = description.startswith("an integer")
        wrong_type = isinstance(value, bool) or not isinstance(
            value, int if integer else (int, float)
        )
        if wrong_type or not math.isfinite(value) or not test(value):
            raise ValueError(
                f"{where}representation_kwargs.{name} must be {description}, not {value!r}"
            )
