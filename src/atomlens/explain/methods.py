"""The explanation methods by name, and :class:`Explainer` that runs them.

Every method is a composite (which rules go on which layers), an attributor (plain,
Integrated Gradients, SmoothGrad), the seed of the backward pass (1, or the selected
output ``y`` so that relevances are in the output's units), and whether the result is
multiplied by the input (``R = x * g``).

| method                 | kind        | Linear/Conv        | activation | pooling  | seed | x * |
|------------------------|-------------|--------------------|------------|----------|------|-----|
| gradient               | function    | gradient           | gradient   | gradient | 1    | no  |
| gradient_x_input       | attribution | gradient           | gradient   | gradient | 1    | yes |
| integrated_gradients   | attribution | gradient           | gradient   | gradient | 1    | yes |
| smoothgrad             | function    | gradient           | gradient   | gradient | 1    | no  |
| deconvnet              | signal      | gradient           | max(g, 0)  | gradient | 1    | no  |
| guided_backprop        | signal      | gradient           | +gate      | gradient | 1    | no  |
| lrp_epsilon            | attribution | epsilon            | f(z)/z     | gradient | 1    | yes |
| lrp_alphabeta (1, 0)   | attribution | alpha-beta         | f(z)/z     | gradient | 1    | yes |
| lrp_alpha2_beta1       | attribution | alpha-beta (2, 1)  | f(z)/z     | gradient | 1    | yes |
| patternnet             | signal      | pattern a          | f(z)/z     | gradient | y    | no  |
| patternattribution     | attribution | w * a              | f(z)/z     | gradient | y    | no  |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .attributors import integrated_gradients, modified_gradient, select_targets, smoothgrad
from .canonizers import canonized
from .patterns import MissingPattern, Patterns
from .rules import (
    LINEAR_TYPES,
    AlphaBeta,
    Composite,
    DeconvReLU,
    Epsilon,
    GuidedReLU,
    Pattern,
    Ratio,
    is_activation,
)


def _plain(options: dict) -> Composite:
    return Composite()


def _relu_rule(rule) -> Callable[[dict], Composite]:
    return lambda options: Composite([(nn.ReLU, rule)])


def _lrp(make_rule: Callable[[dict], Any]) -> Callable[[dict], Composite]:
    return lambda options: Composite([(LINEAR_TYPES, make_rule(options)), (is_activation, Ratio())])


def _pattern(attribution: bool) -> Callable[[dict], Composite]:
    def composite(options: dict) -> Composite:
        patterns, pattern_type = options.get("patterns"), options.get("pattern_type", "a+-")
        if patterns is None:
            raise ValueError("pattern methods need patterns=fit_patterns(model, data)")

        def rule(name: str, module: nn.Module) -> Pattern:
            if name not in patterns:
                raise MissingPattern(f"no pattern fitted for layer {name!r}")
            return Pattern(patterns[name], attribution, pattern_type)

        return Composite([(LINEAR_TYPES, rule), (is_activation, Ratio())])

    return composite


@dataclass(frozen=True)
class Method:
    """One explanation method: see the table in this module's docstring."""

    name: str
    kind: str  # "function", "signal" or "attribution"
    composite: Callable[[dict], Composite]
    attributor: str = "gradient"  # or "integrated_gradients", "smoothgrad"
    start_with_output: bool = False
    times_input: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("gradient", "function", _plain),
        Method("gradient_x_input", "attribution", _plain, times_input=True),
        Method("integrated_gradients", "attribution", _plain, "integrated_gradients"),
        Method("smoothgrad", "function", _plain, "smoothgrad"),
        Method("deconvnet", "signal", _relu_rule(DeconvReLU())),
        Method("guided_backprop", "signal", _relu_rule(GuidedReLU())),
        Method(
            "lrp_epsilon",
            "attribution",
            _lrp(lambda o: Epsilon(o.get("epsilon", 0.01))),
            times_input=True,
        ),
        Method(
            "lrp_alphabeta",
            "attribution",
            _lrp(lambda o: AlphaBeta(o.get("alpha", 1.0), o.get("beta", 0.0))),
            times_input=True,
        ),
        Method(
            "lrp_alpha2_beta1", "attribution", _lrp(lambda o: AlphaBeta(2, 1)), times_input=True
        ),
        Method("patternnet", "signal", _pattern(False), start_with_output=True),
        Method("patternattribution", "attribution", _pattern(True), start_with_output=True),
    ]
}


class Explainer:
    """Explain the outputs of an unmodified ``model`` with one method.

    >>> explainer = Explainer(model, "patternattribution", patterns=fit_patterns(model, x))
    >>> relevance = explainer(x, target=3)  # same shape as x

    Options: ``epsilon`` (lrp_epsilon, default 0.01), ``alpha``/``beta`` (lrp_alphabeta,
    default 1/0), ``patterns`` and ``pattern_type`` ("a+-", "a", "relu") for the pattern
    methods, ``n_steps`` and ``baseline`` (integrated_gradients), ``n_samples``,
    ``noise_level`` and ``seed`` (smoothgrad). ``canonize`` folds BatchNorm layers
    (and puts the model in eval mode) for the duration of the call.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        patterns: Patterns | None = None,
        canonize: bool = True,
        **options: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        self.model, self.method, self.canonize = model, METHODS[method], canonize
        self.options = dict(options, patterns=patterns)
        self.composite = self.method.composite(self.options)

    def __call__(self, inputs: Tensor, target: int | Tensor | None = None) -> Tensor:
        """Relevance (or signal) of each input element for output ``target`` (default:
        the arg-max), shape of ``inputs``."""
        if self.canonize:
            with canonized(self.model):
                return self._explain(inputs, target)
        return self._explain(inputs, target)

    def _explain(self, inputs: Tensor, target: int | Tensor | None) -> Tensor:
        method, options = self.method, self.options
        if isinstance(target, Tensor) and target.dim() == 1:
            target = target.long()
        else:
            target = select_targets(self.model(inputs.detach()).detach(), target)

        def gradient(x: Tensor) -> Tensor:
            return modified_gradient(
                self.model, x, target, self.composite, method.start_with_output
            )

        if method.attributor == "integrated_gradients":
            return integrated_gradients(
                gradient, inputs, options.get("baseline", 0.0), options.get("n_steps", 50)
            )
        if method.attributor == "smoothgrad":
            return smoothgrad(
                gradient,
                inputs,
                options.get("n_samples", 16),
                options.get("noise_level", 0.1),
                options.get("seed", 0),
            )
        result = gradient(inputs)
        return inputs.detach() * result if method.times_input else result


def explain(
    model: nn.Module,
    inputs: Tensor,
    method: str,
    target: int | Tensor | None = None,
    patterns: Patterns | None = None,
    **options: Any,
) -> Tensor:
    """Explain ``model(inputs)[:, target]`` with ``method`` (a key of :data:`METHODS`).

    Returns a tensor of the shape of ``inputs``. See :class:`Explainer` for options.
    """
    return Explainer(model, method, patterns=patterns, **options)(inputs, target)
