"""Activation functions of the representations and heads, selected by name in a config."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import cpu_kernels, kernels

LN2 = math.log(2.0)

#: elements from which a float32 CPU shifted softplus runs as one C++ pass
#: (:func:`atomlens.nn.cpu_kernels.shifted_softplus`); below, the autograd Function's
#: overhead per call outweighs it. PyTorch's softplus and the subtraction of ln 2 took 276-288
#: us for 1,818 x 128 values (a QM9 batch's atoms), the C++ loop 126-131 us; their
#: derivatives 67-78 against 44-48 us (one thread, CPU time, 2026-12-03)
MIN_KERNEL_SIZE = 1 << 13


@torch.jit.unused  # TorchScript: ShiftedSoftplus scripts the formula (below)
def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """ssp(x) = ln(0.5 e^x + 0.5) = softplus(x) - ln 2, so that ssp(0) = 0."""
    large = x.numel() >= MIN_KERNEL_SIZE and x.dtype == torch.float32 and x.device.type == "cpu"
    if large and torch.compiler.is_compiling():
        # compiled code (MD's step) calls the C++ loop as an operator: Inductor's own
        # vectorized softplus took 95 us for 672 x 128 values (32 aspirins), the loop ~50
        if cpu_kernels.compiled_ops_ready(x):
            return cpu_kernels.ShiftedSoftplusOp.apply(x)
        return nn.functional.softplus(x) - LN2
    if (
        large
        and not torch.jit.is_tracing()  # a trace records PyTorch's operators
        and not torch._C._are_functorch_transforms_active()  # vmap, jvp: PyTorch's rules
        and cpu_kernels.available(x)
    ):
        return _ShiftedSoftplus.apply(x)
    return nn.functional.softplus(x) - LN2


class _ShiftedSoftplus(kernels.Function):
    """The shifted softplus of a float32 CPU tensor by the C++ loops; a backward pass that
    builds a graph (force training) uses PyTorch's differentiable ``softplus_backward``
    instead, as ``F.softplus`` does."""

    @staticmethod
    def forward(x):
        return cpu_kernels.shifted_softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, tangent):  # forward-mode AD (torch.autograd.forward_ad)
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(tangent, x, 1.0, 20.0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled() or not torch._C._has_storage(grad):
            # PyTorch's own derivative of softplus: differentiable, and for batched
            # gradients (``is_grads_batched``) too
            return torch.ops.aten.softplus_backward(grad, x, 1.0, 20.0)
        return cpu_kernels.shifted_softplus_backward(grad, x)


class ShiftedSoftplus(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # ln 2 as a literal: TorchScript reads no module float
            return nn.functional.softplus(x) - 0.6931471805599453
        return shifted_softplus(x)


ACTIVATIONS = {"ssp": ShiftedSoftplus, "tanh": nn.Tanh, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
