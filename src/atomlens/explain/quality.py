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


def _max_correlation(y: Tensor, d: Tensor) -> float:
    """``max_v corr(y, v^T d)`` by least squares; 0 when ``d`` carries no variance."""
    y, d = y - y.mean(), d - d.mean(0)
    if d.abs().max() <= 1e-12 * (1 + y.abs().max()):
        return 0.0
    v = torch.linalg.lstsq(d, y[:, None], rcond=1e-10, driver="gelsd").solution
    fit = (d @ v)[:, 0]
    norm = fit.norm() * y.norm()
    return float((fit @ y) / norm) if norm > 0 else 0.0


def signal_quality(
    model: nn.Module,
    layer: str | nn.Module,
    estimator: str,
    data: Tensor | Iterable,
    patterns: Patterns | None = None,
    max_rows: int = 20000,
) -> SignalQuality:
    """``rho(S)`` of ``estimator`` for every output neuron of ``layer`` over ``data``.

    ``layer`` is a Linear/Conv module of ``model`` or its name; for convolutions every
    position is a sample. Patterns for ``"a"``/``"a+-"`` are fitted on ``data`` when not
    given.
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
    rho = torch.empty(weight.shape[0], dtype=torch.float64)
    for k in range(weight.shape[0]):
        if estimator == "w":
            direction = (weight[k] / (weight[k] @ weight[k]))[None, :]
        elif estimator == "a":
            direction = layer_patterns["a"][k][None, :]
        else:
            direction = torch.where(
                (z[:, k] > 0)[:, None], layer_patterns["a_plus"][k], layer_patterns["a_minus"][k]
            )
        if estimator != "w":  # w^T a = 1 holds analytically, restore it after float32 storage
            direction = direction / (direction @ weight[k])[:, None]
        distractor = x - y[:, k : k + 1] * direction
        # w^T d = 0 analytically for every estimator; drop the rounding residue, which
        # least squares would otherwise find perfectly correlated with y
        unit = weight[k] / weight[k].norm()
        distractor = distractor - (distractor @ unit)[:, None] * unit
        rho[k] = 1.0 - _max_correlation(y[:, k], distractor)
    return SignalQuality(name, estimator, rho, float(rho.mean()))


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
