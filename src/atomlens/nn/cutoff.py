"""Cutoff functions: interactions that fade smoothly to zero at the cutoff radius."""

from __future__ import annotations

import math

import torch
from torch import nn


class CosineCutoff(nn.Module):
    """f(d) = 0.5 (cos(pi d / r_c) + 1) for d < r_c, else 0 (smooth at the cutoff)."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        f = 0.5 * (torch.cos(d * (math.pi / self.cutoff)) + 1.0)
        return f * (d < self.cutoff).to(d.dtype)

    def value_and_derivative(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(d), df/dd)`` for ``d <= cutoff`` (both vanish at the cutoff)."""
        phase = d * (math.pi / self.cutoff)
        return 0.5 * (torch.cos(phase) + 1.0), (-0.5 * math.pi / self.cutoff) * torch.sin(phase)
