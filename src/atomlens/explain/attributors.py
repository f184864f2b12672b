"""Attributors: how the (modified) gradient is taken and combined.

* :func:`modified_gradient` -- one backward pass from the selected output ``f_c(x)``,
  through whatever rules a composite attached;
* :func:`integrated_gradients` -- ``(x - x') * int_0^1 df_c/dx(x' + t (x - x')) dt``
  (Sundararajan et al. 2017) with Gauss-Legendre quadrature in ``t``;
* :func:`smoothgrad` -- ``E_{e ~ N(0, sigma^2)}[df_c/dx(x + e)]`` (Smilkov et al. 2017)
  with ``sigma = noise_level * (max x - min x)`` per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from .rules import Composite

GradientFunction = Callable[[Tensor], Tensor]


def select_targets(output: Tensor, target: int | Tensor | None) -> Tensor:
    """Per-sample output index: ``target`` broadcast, or the arg-max when ``None``."""
    if output.dim() == 1:
        output = output[:, None]
    n = output.shape[0]
    if target is None:
        return output.argmax(1)
    return torch.as_tensor(target, device=output.device).long().expand(n).clone()


def modified_gradient(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    composite: Composite | None = None,
    start_with_output: bool = False,
) -> Tensor:
    """``d f_c / d x`` with the composite's rules, seeded with 1 (or with ``f_c(x)``)."""
    composite = composite or Composite()
    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), composite.context(model):
        output = model(x)
        if output.dim() == 1:
            output = output[:, None]
        selected = output.gather(1, target[:, None].to(output.device))
        seed = selected.detach() if start_with_output else torch.ones_like(selected)
        (grad,) = torch.autograd.grad(selected, x, seed)
    return grad


def integrated_gradients(
    gradient: GradientFunction,
    inputs: Tensor,
    baseline: Tensor | float = 0.0,
    n_steps: int = 50,
) -> Tensor:
    """``(x - x') * sum_k w_k grad(x' + t_k (x - x'))`` with Gauss-Legendre nodes on [0, 1]."""
    baseline = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    baseline = baseline.expand_as(inputs)
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    total = torch.zeros_like(inputs)
    for t, w in zip((nodes + 1) / 2, weights / 2):
        total += float(w) * gradient(baseline + float(t) * (inputs - baseline))
    return (inputs - baseline) * total


def smoothgrad(
    gradient: GradientFunction,
    inputs: Tensor,
    n_samples: int = 16,
    noise_level: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """Mean gradient over ``n_samples`` Gaussian perturbations of the input."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    flat = inputs.reshape(inputs.shape[0], -1)
    sigma = noise_level * (flat.max(1).values - flat.min(1).values)
    sigma = sigma.reshape((-1,) + (1,) * (inputs.dim() - 1))
    total = torch.zeros_like(inputs)
    for _ in range(n_samples):
        noise = torch.randn(inputs.shape, generator=generator).to(inputs)
        total += gradient(inputs + sigma * noise)
    return total / n_samples
