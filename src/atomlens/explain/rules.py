"""Backward rules, composites and the one hook mechanism that attaches them.

An explanation method is a *modified gradient*: the forward pass of the unchanged
``nn.Module`` is kept, but selected layers get a different backward pass (a *rule*).
A *composite* decides which rule goes on which layer type. Rules are attached with
forward hooks that route the layer's output through :class:`_RuleFunction`, a custom
autograd function whose backward calls ``rule.backward(module, x, z, g)``; the hooks
are removed when the context exits, so the model is never copied or rewritten.

Convention: the quantity flowing backwards is always gradient-like, ``g = dR/dx``
style, so that attributions are ``x * g`` (LRP) or ``g`` itself (PatternNet,
PatternAttribution). For LRP, the relevance at a layer output ``z`` is
``R_z = z * g_z``; with this convention LRP-epsilon on piecewise linear networks is
the gradient times input up to the ``z / (z + eps sign z)`` factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Layers with weights that the LRP and pattern rules replace.
LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Layers whose ordinary gradient is already the right backward pass for every method.
STRUCTURAL_TYPES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)


def is_activation(module: nn.Module) -> bool:
    """A leaf module that is neither a weight layer nor structural: an element-wise
    nonlinearity (ReLU, tanh, a shifted softplus defined elsewhere, ...)."""
    return not any(True for _ in module.children()) and not isinstance(
        module, LINEAR_TYPES + STRUCTURAL_TYPES
    )


def linear_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None = None):
    """Forward pass of a Linear/Conv ``module`` with its weight replaced by ``weight``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError("only zero padding is supported")
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def vector_jacobian(function: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Tensor:
    """``J_f(x)^T grad`` by autograd (for a linear ``function`` this is its transpose)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (result,) = torch.autograd.grad(function(x), x, grad)
    return result


def stabilize(z: Tensor, epsilon: float) -> Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = +1``: a denominator that is never 0."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)


class Rule:
    """A per-layer backward pass: ``backward(module, x, z, g) -> g_x``.

    ``x`` is the layer input, ``z`` its output and ``g`` the modified gradient arriving
    at ``z``; the return value is the modified gradient at ``x``.
    """

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, grad: Tensor) -> Tensor:
        raise NotImplementedError


class Epsilon(Rule):
    """LRP-epsilon: ``R_i = sum_j x_i w_ij R_j / (z_j + eps sign z_j)`` with ``z`` incl. bias.

    In gradient form, ``g_x = W^T (g_z * z / (z + eps sign z))`` and ``R_x = x * g_x``.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = epsilon

    def backward(self, module, x, z, grad):
        # module.forward, not module(): calling the module would re-enter the rule hook
        return vector_jacobian(module.forward, x, grad * z / stabilize(z, self.epsilon))


class AlphaBeta(Rule):
    """LRP-alpha-beta: ``R_i = sum_j (alpha (x_i w_ij)^+ / z_j^+ - beta (x_i w_ij)^- / z_j^-) R_j``

    with ``z_j^+ = sum_i (x_i w_ij)^+ + b_j^+`` and ``z_j^- = sum_i (x_i w_ij)^- + b_j^-``,
    ``alpha - beta = 1``. Returned in gradient form, ``g_x`` with ``x * g_x = R_x``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, stabilizer: float = 1e-6) -> None:
        if alpha - beta != 1.0 or beta < 0:
            raise ValueError("alpha - beta must be 1 with beta >= 0")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer

    def _part(self, module, x_pos, x_neg, w_same, w_other, bias, relevance):
        # gradient of z^{+/-} = f(x+; w_same, b) + f(x-; w_other) with respect to x+ and x-
        with torch.enable_grad():
            xp = x_pos.detach().requires_grad_(True)
            xn = x_neg.detach().requires_grad_(True)
            z = linear_forward(module, xp, w_same, bias) + linear_forward(module, xn, w_other)
            gp, gn = torch.autograd.grad(z, (xp, xn), relevance / stabilize(z, self.stabilizer))
        return torch.where(x_pos > 0, gp, gn)

    def backward(self, module, x, z, grad):
        relevance = z * grad
        w, b = module.weight, module.bias
        w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
        b_pos = None if b is None else b.clamp(min=0)
        x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
        result = self.alpha * self._part(module, x_pos, x_neg, w_pos, w_neg, b_pos, relevance)
        if self.beta:
            b_neg = None if b is None else b.clamp(max=0)
            result = result - self.beta * self._part(
                module, x_pos, x_neg, w_neg, w_pos, b_neg, relevance
            )
        return result


class Ratio(Rule):
    """Element-wise activation ``a = f(z)`` passed with the gate ``f(z) / z``.

    In relevance terms this is LRP's pass rule ``R_z = R_a``: ``z * g_z = a * g_a``.
    For ReLU the gate is exactly the gradient's ``1[z > 0]``; for a smooth ``f`` with
    ``f(0) = 0`` (tanh, shifted softplus) it is an approximation of the chain rule, and
    ``f'(0)`` is used where ``z = 0``.
    """

    def backward(self, module, x, z, grad):
        derivative = vector_jacobian(module.forward, x, torch.ones_like(z))
        nonzero = x.abs() > 1e-12
        return grad * torch.where(nonzero, z / torch.where(nonzero, x, 1.0), derivative)


class GuidedReLU(Rule):
    """Guided BackProp: ``g_x = max(g, 0) * 1[z > 0]`` (forward gate and backward gate)."""

    def backward(self, module, x, z, grad):
        return grad.clamp(min=0) * (z > 0)


class DeconvReLU(Rule):
    """DeConvNet: ``g_x = max(g, 0)`` (the ReLU applied to the backward signal only)."""

    def backward(self, module, x, z, grad):
        return grad.clamp(min=0)


class Pattern(Rule):
    """PatternNet (``attribution=False``) and PatternAttribution (``attribution=True``).

    PatternNet back-projects with the pattern ``a`` in place of the weights,
    ``g_x = A^T g_z``; PatternAttribution with ``w * a``, ``g_x = (W * A)^T g_z``. With
    ``pattern_type="a+-"`` the pattern is ``a_+`` for outputs with ``z > 0`` and ``a_-``
    otherwise (the paper's two-component estimator); ``"a"`` uses the linear pattern,
    ``"relu"`` always ``a_+`` (iNNvestigate's choice; identical to ``"a+-"`` on layers
    followed by a ReLU, whose gate removes the ``z <= 0`` outputs anyway).
    """

    def __init__(self, layer_patterns: dict[str, Tensor], attribution: bool, pattern_type: str):
        if pattern_type not in ("a", "a+-", "relu"):
            raise ValueError(f"unknown pattern_type {pattern_type!r}")
        self.layer_patterns, self.attribution = layer_patterns, attribution
        self.pattern_type = pattern_type

    def backward(self, module, x, z, grad):
        if self.pattern_type == "a":
            regimes = [("a", None)]
        elif self.pattern_type == "relu":
            regimes = [("a_plus", None)]
        else:
            positive = (z > 0).to(grad)
            regimes = [("a_plus", positive), ("a_minus", 1 - positive)]
        result = torch.zeros_like(x)
        for key, mask in regimes:
            weight = self.layer_patterns[key].to(x)
            if self.attribution:
                weight = weight * module.weight
            g = grad if mask is None else grad * mask
            result = result + vector_jacobian(
                lambda x_, w=weight: linear_forward(module, x_, w), x, g
            )
        return result


class _RuleFunction(torch.autograd.Function):
    """Identity on a layer output whose backward is ``rule.backward`` to the layer input."""

    @staticmethod
    def forward(ctx, rule, module, x, output):
        ctx.rule, ctx.module = rule, module
        ctx.x, ctx.z = x.detach(), output.detach()
        return output.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.rule.backward(ctx.module, ctx.x, ctx.z, grad), None


def _rule_hook(rule: Rule):
    def hook(module, inputs, output):
        return _RuleFunction.apply(rule, module, inputs[0], output)

    return hook


Matcher = type | tuple | Callable[[nn.Module], bool]
RuleSpec = Rule | Callable[[str, nn.Module], Rule]


class Composite:
    """Which rule goes on which layer: an ordered list of ``(matcher, rule)`` pairs.

    A matcher is a module type (or tuple of types) or a predicate; a rule is a
    :class:`Rule` or a factory ``(name, module) -> Rule`` (pattern rules need the
    layer's name). The first matching pair wins; unmatched layers keep their gradient.
    """

    def __init__(self, layer_map: Sequence[tuple[Matcher, RuleSpec]] = ()) -> None:
        self.layer_map = list(layer_map)

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        for matcher, rule in self.layer_map:
            if isinstance(matcher, (type, tuple)):
                matched = isinstance(module, matcher)
            else:
                matched = matcher(module)
            if matched:
                return rule if isinstance(rule, Rule) else rule(name, module)
        return None

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Attach the rules to ``model`` for the duration of the ``with`` block."""
        handles, inplace = [], []
        try:
            for name, module in model.named_modules():
                if getattr(module, "inplace", False):
                    # rules need the layer input, which an in-place op would overwrite
                    inplace.append(module)
                    module.inplace = False
                rule = self.rule_for(name, module)
                if rule is not None:
                    handles.append(module.register_forward_hook(_rule_hook(rule)))
            yield model
        finally:
            for handle in handles:
                handle.remove()
            for module in inplace:
                module.inplace = True
