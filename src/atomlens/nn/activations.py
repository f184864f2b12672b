"""Activation functions of the representations and heads, selected by name in a config."""

from __future__ import annotations

import math

import torch
from torch import nn

LN2 = math.log(2.0)


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """ssp(x) = ln(0.5 e^x + 0.5) = softplus(x) - ln 2, so that ssp(0) = 0."""
    # ln 2 as a literal (== LN2): TorchScript cannot read a module-level float
    return nn.functional.softplus(x) - 0.6931471805599453


class ShiftedSoftplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_softplus(x)


ACTIVATIONS = {"ssp": ShiftedSoftplus, "tanh": nn.Tanh, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
