"""Sums over index groups (atoms into structures, pair messages into atoms)."""

from __future__ import annotations

import torch


def scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[k] = sum of values[n] with index[n] == k; ``size`` rows."""
    out = values.new_zeros((size,) + values.shape[1:])
    return out.index_add_(0, index, values)
