"""Quality of a signal estimator (Kindermans et al. 2018, Sec. 4):

    rho(S) = 1 - max_v corr(w^T x, v^T (x - S(x)))

A good estimator leaves no information about the output ``y = w^T x`` in the estimated
distractor ``d = x - S(x)``; ``v`` is found by least squares (the maximal correlation of
``y`` with a linear function of ``d`` is that of ``y`` with its least-squares fit).

Estimators: ``"x"`` (``S_x(x) = x``), ``"w"`` (``S_w(x) = w w^T x / w^T w``), ``"a"``
(``S_a(x) = a w^T x``) and ``"a+-"`` (``a_+ w^T x`` where the pre-activation is positive,
``a_- w^T x`` elsewhere). For ``S_x`` the distractor is identically zero and the
correlation is undefined: its quality is returned as NaN (the criterion cannot judge an
estimator that calls everything signal).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .canonizers import canonized
from .patterns import Patterns, batches, fit_patterns, layer_rows
from .rules import LINEAR_TYPES

ESTIMATORS = ("x", "w", "a", "a+-")


@dataclass
class SignalQuality:
    """``rho`` per output neuron (filter) of one layer, and its mean over neurons."""

    layer: str
    estimator: str
    per_neuron: Tensor
    mean: float


def _layer_rows(model: nn.Module, module: nn.Module, data, max_rows: int):
    xs, zs = [], []

    def hook(module, inputs, output):
        x, z = layer_rows(module, inputs[0].detach(), output.detach())
        xs.append(x.double())
        zs.append(z.double())

    with torch.no_grad(), canonized(model):
        handle = module.register_forward_hook(hook)
        try:
            for inputs in batches(data):
                model(inputs)
        finally:
            handle.remove()
        weight = module.weight.detach().double().reshape(module.weight.shape[0], -1).clone()
    x, z = torch.cat(xs), torch.cat(zs)
    if x.shape[0] > max_rows:  # a fixed random subset keeps the least squares cheap
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        x, z = x[keep], z[keep]
    return x, z, weight


def _correlation(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = a.norm() * b.norm()
    return float((a @ b) / norm) if norm > 0 else 0.0


def _max_correlation(y: Tensor, d: Tensor, cross_fit: bool = True) -> float:
    """``max_v corr(y, v^T d)`` by least squares; 0 when ``d`` carries no variance.

    ``cross_fit``: ``v`` fitted on every other row and the correlation taken on the rows
    between, both ways, averaged (at least 0). Fitted and scored on the same rows, least
    squares finds a correlation of about sqrt(p / n) in noise alone (p features, n rows:
    0.12 for a 72-wide input over 5,000 rows, 0.48 for a 4,608-wide one over 20,000), which
    caps rho of wide layers whatever the estimator."""
    y, d = y - y.mean(), d - d.mean(0)
    if d.abs().max() <= 1e-12 * (1 + y.abs().max()):
        return 0.0

    def fitted(rows: slice, other: slice) -> float:
        centre = d[rows].mean(0)
        v = torch.linalg.lstsq(
            d[rows] - centre, (y[rows] - y[rows].mean())[:, None], rcond=1e-10, driver="gelsd"
        ).solution
        return _correlation(((d[other] - centre) @ v)[:, 0], y[other])

    if not cross_fit or len(y) < 4:
        return fitted(slice(None), slice(None))
    halves = (slice(0, None, 2), slice(1, None, 2))
    return max(0.0, 0.5 * (fitted(*halves) + fitted(*halves[::-1])))


def signal_quality(
    model: nn.Module,
    layer: str | nn.Module,
    estimator: str,
    data: Tensor | Iterable,
    patterns: Patterns | None = None,
    max_rows: int = 20000,
    cross_fit: bool = True,
) -> SignalQuality:
    """``rho(S)`` of ``estimator`` for every output neuron of ``layer`` over ``data``.

    ``layer`` is a Linear/Conv module of ``model`` or its name; for convolutions every
    position is a sample. Patterns for ``"a"``/``"a+-"`` are fitted on ``data`` when not
    given (on the patterns' own data ``S_a`` and ``S_a+-`` leave no covariance with ``y`` by
    construction: pass other data to compare them). ``cross_fit``: the least-squares ``v``
    fitted and scored on alternate rows (:func:`_max_correlation`); False: on the same
    rows. A neuron whose output does not vary (zero weights, a zero pattern) has no
    defined correlation: NaN, left out of the layer's mean.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    modules = dict(model.named_modules())
    name = layer if isinstance(layer, str) else next(n for n, m in modules.items() if m is layer)
    module = modules[name]
    if not isinstance(module, LINEAR_TYPES):
        raise TypeError(f"{name!r} is not a Linear/Conv layer")
    x, z, weight = _layer_rows(model, module, data, max_rows)
    y = x @ weight.T  # w^T x, the bias does not change any correlation
    if estimator == "x":
        rho = torch.full((weight.shape[0],), float("nan"), dtype=torch.float64)
        return SignalQuality(name, estimator, rho, float("nan"))
    if estimator in ("a", "a+-"):
        if patterns is None:
            patterns = fit_patterns(model, data, layers=[name])
        layer_patterns = {
            k: p.double().reshape(weight.shape[0], -1) for k, p in patterns[name].items()
        }
    rho = torch.full((weight.shape[0],), float("nan"), dtype=torch.float64)
    for k in range(weight.shape[0]):
        if not weight[k].abs().max() > 0:
            continue  # y = 0: no correlation to measure (a pruned neuron)
        if estimator == "w":
            direction = (weight[k] / (weight[k] @ weight[k]))[None, :]
        elif estimator == "a":
            direction = layer_patterns["a"][k][None, :]
        else:
            direction = torch.where(
                (z[:, k] > 0)[:, None], layer_patterns["a_plus"][k], layer_patterns["a_minus"][k]
            )
        if estimator != "w":  # w^T a = 1 holds analytically, restore it after float32 storage
            scale = direction @ weight[k]
            if not (scale.abs() > 0).all():
                continue  # a zero pattern (its output never varied): no signal direction
            direction = direction / scale[:, None]
        distractor = x - y[:, k : k + 1] * direction
        # w^T d = 0 analytically for every estimator; drop the rounding residue, which
        # least squares would otherwise find perfectly correlated with y
        unit = weight[k] / weight[k].norm()
        distractor = distractor - (distractor @ unit)[:, None] * unit
        rho[k] = 1.0 - _max_correlation(y[:, k], distractor, cross_fit)
    return SignalQuality(name, estimator, rho, float(torch.nanmean(rho)))


def quality_table(
    model: nn.Module, data: Tensor | Iterable, patterns: Patterns | None = None, **kwargs
) -> list[dict]:
    """Mean ``rho`` for every Linear/Conv layer and every estimator: rows of a table."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES):
            row = {"layer": name}
            for estimator in ESTIMATORS:
                row[estimator] = signal_quality(
                    model, name, estimator, data, patterns, **kwargs
                ).mean
            rows.append(row)
    return rows
