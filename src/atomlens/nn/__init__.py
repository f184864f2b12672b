"""Building blocks shared by the representations: activations, radial bases, cutoffs."""

from __future__ import annotations

import math

import torch
from torch import nn

from .cfconv import cfconv_symmetric
from .hermite import hermite_coefficients, hermite_lookup

LN2 = math.log(2.0)

__all__ = [
    "LN2",
    "CosineCutoff",
    "GaussianRBF",
    "ShiftedSoftplus",
    "activation",
    "cfconv_symmetric",
    "hermite_coefficients",
    "hermite_lookup",
    "scatter_sum",
    "shifted_softplus",
]


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


class GaussianRBF(nn.Module):
    """e_k(d) = exp(-gamma (d - mu_k)^2), mu_k evenly spaced from ``start`` to ``stop``.

    ``gamma`` in 1/Angstrom^2; by default 1 / (2 spacing^2), i.e. Gaussians of width one
    spacing. SchNet (NeurIPS): 300 centres on 0-30 Angstrom, gamma = 10. DTNN: centres every
    0.2 Angstrom, sigma = 0.2 (gamma = 12.5).
    """

    def __init__(self, n_rbf: int, stop: float, start: float = 0.0, gamma: float | None = None):
        super().__init__()
        self.start, self.stop = float(start), float(stop)
        spacing = (stop - start) / max(n_rbf - 1, 1)
        self.gamma = float(gamma) if gamma is not None else 0.5 / spacing**2
        self.register_buffer("centres", torch.linspace(start, stop, n_rbf))

    def _apply(self, fn, recurse=True):
        # a float32 linspace converted to float64 keeps its float32 rounding (up to 1e-6
        # Angstrom): lay the centres out again in the new dtype when it changes
        dtype = self.centres.dtype
        super()._apply(fn, recurse)
        if self.centres.dtype != dtype and self.centres.is_floating_point():
            self.centres = torch.linspace(
                self.start,
                self.stop,
                len(self.centres),
                dtype=self.centres.dtype,
                device=self.centres.device,
            )
        return self

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.gamma * (d[:, None] - self.centres) ** 2)

    def value_and_derivative(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e(d), de/dd)``, both ``(len(d), n_rbf)``."""
        diff = d[:, None] - self.centres
        e = torch.exp(-self.gamma * diff**2)
        return e, -2.0 * self.gamma * diff * e


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


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[k] = sum of values[n] with index[n] == k; ``size`` rows."""
    out = values.new_zeros((size,) + values.shape[1:])
    return out.index_add_(0, index, values)
