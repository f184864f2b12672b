"""Image degradation benchmark (Samek et al. 2017; Kindermans et al. 2018, Sec. 5).

The image is cut into ``patch x patch`` regions, the regions are ordered by the summed
relevance of an explanation (most relevant first) and replaced one after the other; the
target output ``f_c`` is recorded after each step. A faster drop, i.e. a smaller area
under the curve, means the explanation found what the model uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attributors import select_targets


@dataclass
class PerturbationResult:
    """``curve[k]``: mean target output with the ``k`` most relevant regions replaced;
    ``fractions[k] = k / n_regions``; ``auc``: trapezoidal area under ``curve`` over
    ``fractions`` (in output units, lower is better)."""

    fractions: Tensor
    curve: Tensor
    auc: float


def region_order(relevance: Tensor, patch: int) -> Tensor:
    """Region indices per image, most relevant first: shape (N, n_regions)."""
    per_pixel = relevance.sum(1, keepdim=True)  # over channels
    per_region = F.avg_pool2d(per_pixel, patch).flatten(1)
    return per_region.argsort(dim=1, descending=True)


@torch.no_grad()
def perturbation_curve(
    model: nn.Module,
    inputs: Tensor,
    relevance: Tensor,
    target: int | Tensor | None = None,
    patch: int = 2,
    replacement: str = "mean",
    seed: int = 0,
) -> PerturbationResult:
    """Degradation curve of ``model`` on images ``inputs`` (N, C, H, W) ordered by ``relevance``.

    ``replacement`` is ``"mean"`` (the per-pixel mean of ``inputs``), ``"zero"`` or
    ``"noise"`` (uniform in the value range of ``inputs``, fixed ``seed``; the choice of
    Samek et al. 2017).
    """
    training = model.training
    model.eval()
    n, _, height, width = inputs.shape
    if height % patch or width % patch:
        raise ValueError("image size must be a multiple of the patch size")
    if replacement == "mean":
        fill = inputs.mean(0, keepdim=True).expand_as(inputs)
    elif replacement == "zero":
        fill = torch.zeros_like(inputs)
    elif replacement == "noise":
        generator = torch.Generator().manual_seed(seed)
        fill = torch.rand(inputs.shape, generator=generator).to(inputs)
        fill = inputs.min() + (inputs.max() - inputs.min()) * fill
    else:
        raise ValueError(f"unknown replacement {replacement!r}")
    targets = select_targets(model(inputs), target) if not isinstance(target, Tensor) else target
    order = region_order(relevance, patch)
    n_regions = order.shape[1]
    removed = torch.zeros(n, n_regions, dtype=torch.bool)
    values = []
    for k in range(n_regions + 1):
        if k:
            removed[torch.arange(n), order[:, k - 1]] = True
        mask = removed.reshape(n, 1, height // patch, width // patch).float()
        mask = F.interpolate(mask, scale_factor=patch, mode="nearest").bool()
        output = model(torch.where(mask, fill, inputs))
        output = output[:, None] if output.dim() == 1 else output
        values.append(output.gather(1, targets[:, None].long()).mean())
    model.train(training)
    curve = torch.stack(values).cpu()
    fractions = torch.linspace(0, 1, n_regions + 1)
    return PerturbationResult(fractions, curve, float(torch.trapezoid(curve, fractions)))
