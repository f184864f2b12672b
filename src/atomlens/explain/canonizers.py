"""Canonizers: temporary, exactly output-preserving rewrites of a model's parameters.

The only one needed here folds an eval-mode BatchNorm into the Linear/Conv layer in
front of it, so that rules and patterns see a single affine layer:

    BN(W x + b) = gamma (W x + b - mu) / sqrt(var + eps) + beta = W' x + b'
    W' = s W,  b' = s (b - mu) + beta,  s = gamma / sqrt(var + eps)

while the BatchNorm itself is set to the identity (gamma=1, beta=0, mu=0, var=1, eps=0).
Everything is restored on exit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .rules import LINEAR_TYPES

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def batchnorm_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, batchnorm) pairs that follow each other inside an ``nn.Sequential``."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for layer, norm in itertools.pairwise(children):
                if isinstance(layer, LINEAR_TYPES) and isinstance(norm, BATCHNORM_TYPES):
                    pairs.append((layer, norm))
    return pairs


@contextmanager
def merged_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Fold every (Linear|Conv, BatchNorm) pair of ``model`` for the ``with`` block.

    Needs the BatchNorm in eval mode (running statistics); the outputs of ``model``
    are unchanged up to floating point rounding.
    """
    saved = []
    try:
        for layer, norm in batchnorm_pairs(model):
            if norm.training or norm.running_mean is None:
                raise RuntimeError("BatchNorm folding needs eval mode with running statistics")
            saved.append(_fold(layer, norm))
        yield model
    finally:
        for restore in reversed(saved):
            restore()


def _fold(layer: nn.Module, norm: nn.Module):
    had_bias = layer.bias is not None
    weight, bias = layer.weight.data.clone(), None if not had_bias else layer.bias.data.clone()
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm_eps = norm.eps
    with torch.no_grad():
        gamma = norm.weight if norm.affine else torch.ones_like(norm.running_var)
        beta = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        scale = gamma / torch.sqrt(norm.running_var + norm.eps)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        old_bias = layer.bias if had_bias else torch.zeros_like(norm.running_mean)
        new_bias = scale * (old_bias - norm.running_mean) + beta
        layer.weight.mul_(scale.reshape(shape))
        if had_bias:
            layer.bias.copy_(new_bias)
        else:
            layer.bias = nn.Parameter(new_bias.to(layer.weight))
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0)
        norm.eps = 0.0
        if norm.affine:
            norm.weight.fill_(1.0)
            norm.bias.zero_()

    def restore() -> None:
        with torch.no_grad():
            layer.weight.copy_(weight)
            if had_bias:
                layer.bias.copy_(bias)
            else:
                layer.bias = None
            norm.load_state_dict(state)
            norm.eps = norm_eps

    return restore


@contextmanager
def canonized(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and folded BatchNorm for the ``with`` block; the mode is restored."""
    training = model.training
    model.eval()
    try:
        with merged_batchnorm(model):
            yield model
    finally:
        model.train(training)
