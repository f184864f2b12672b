"""Signal patterns (Kindermans et al. 2018) fitted from data in one streaming pass.

For a neuron ``y = w^T x`` (per filter and over all positions for a convolution, where
``x`` is an unfolded input patch) the linear signal estimator ``S_a(x) = a w^T x`` uses

    a = cov[x, y] / (w^T cov[x, y])

and the two-component estimator ``S_a+-`` uses, for the samples with ``y > 0``,

    a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T E_+[x y] - w^T E_+[x] E[y])

and likewise ``a_-`` for ``y <= 0``. ``E_+`` averages over the samples of the regime but
``E[y]`` over *all* samples: the form follows from requiring ``cov[x - S(x), y] = 0``
over all samples, split by regime (as in the authors' iNNvestigate 1.x ``PatternComputer``).
``y`` is the pre-activation, bias included; the bias cancels in both estimators. Each
pattern is stored with the shape of the layer's weight. The co-moments are accumulated per regime in float64 and merged batch
by batch with the pairwise update of Chan et al., so one pass gives the same result as
a single pass over all data at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .canonizers import canonized
from .rules import LINEAR_TYPES

PATTERN_KEYS = ("a", "a_plus", "a_minus")


def layer_rows(module: nn.Module, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``(x_r, y_r)`` with ``y_r = w^T x_r + b``: inputs unfolded to patches for convs.

    Returns ``X`` of shape (rows, fan_in) and ``Y`` of shape (rows, out_features).
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
    if module.groups != 1:
        raise NotImplementedError("patterns for grouped convolutions are not supported")
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        options = {
            "kernel_size": (1, module.kernel_size[0]),
            "dilation": (1, module.dilation[0]),
            "padding": (0, module.padding[0]),
            "stride": (1, module.stride[0]),
        }
    else:
        options = {
            "kernel_size": module.kernel_size,
            "dilation": module.dilation,
            "padding": module.padding,
            "stride": module.stride,
        }
    patches = F.unfold(x, **options)  # (N, fan_in, positions), same order as the output
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return rows, z.reshape(z.shape[0], z.shape[1], -1).transpose(1, 2).reshape(-1, z.shape[1])


class Moments:
    """Count, means and co-moment ``C_k = sum_i m_ik (x_i - mean_x_k)(y_ik - mean_y_k)``
    of K neurons over the rows selected by a mask ``m``, in float64."""

    def __init__(self, n_out: int, n_in: int) -> None:
        self.count = torch.zeros(n_out, dtype=torch.float64)
        self.mean_x = torch.zeros(n_out, n_in, dtype=torch.float64)
        self.mean_y = torch.zeros(n_out, dtype=torch.float64)
        self.comoment = torch.zeros(n_out, n_in, dtype=torch.float64)

    def update(self, x: Tensor, y: Tensor, mask: Tensor) -> None:
        """Merge a batch: ``x`` (rows, n_in), ``y`` and ``mask`` (rows, n_out), float64."""
        count = mask.sum(0)
        shift = x.mean(0)  # any constant; subtracting it keeps the batch sums small
        xs = x - shift
        mean_x = (mask.T @ xs) / count.clamp(min=1)[:, None] + shift
        mean_y = (mask * y).sum(0) / count.clamp(min=1)
        comoment = (mask * (y - mean_y)).T @ xs
        total = self.count + count
        weight = (count / total.clamp(min=1))[:, None]
        delta_x, delta_y = mean_x - self.mean_x, mean_y - self.mean_y
        self.comoment += comoment + delta_x * delta_y[:, None] * (self.count[:, None] * weight)
        self.mean_x += delta_x * weight
        self.mean_y += delta_y * weight[:, 0]
        self.count = total

    def pattern(self, weight: Tensor, mean_y_all: Tensor | None = None) -> Tensor:
        """``a_k = c_k / (w_k^T c_k)``, zero where ``w_k^T c_k`` vanishes.

        ``c_k = E_r[x y_k] - E_r[x] E[y_k]`` with ``E_r`` over the rows of this regime and
        ``E`` over all rows (``mean_y_all``; by default this regime's own mean, which makes
        ``c_k`` the covariance): ``c_k = cov_r[x, y_k] + E_r[x] (E_r[y_k] - E[y_k])``.
        """
        covariance = self.comoment / self.count.clamp(min=1)[:, None]
        if mean_y_all is not None:
            covariance = covariance + self.mean_x * (self.mean_y - mean_y_all)[:, None]
        # for a regime w^T c_k can be negative (strongly negative bias), so test its size
        scale = (covariance * weight).sum(1, keepdim=True)
        valid = scale.abs() > 1e-12
        return torch.where(valid, covariance / torch.where(valid, scale, 1.0), 0.0)


class LayerStatistics:
    """The three :class:`Moments` of one layer: all rows, ``y > 0`` and ``y <= 0``."""

    def __init__(self, n_out: int, n_in: int) -> None:
        self.regimes = {key: Moments(n_out, n_in) for key in PATTERN_KEYS}

    def update(self, x: Tensor, y: Tensor) -> None:
        x, y = x.double(), y.double()
        positive = (y > 0).double()
        self.regimes["a"].update(x, y, torch.ones_like(y))
        self.regimes["a_plus"].update(x, y, positive)
        self.regimes["a_minus"].update(x, y, 1 - positive)

    def patterns(self, weight: Tensor) -> dict[str, Tensor]:
        flat = weight.detach().double().reshape(weight.shape[0], -1)
        mean_y_all = self.regimes["a"].mean_y  # E[y] over all rows, for both regimes
        return {
            key: moments.pattern(flat, None if key == "a" else mean_y_all)
            .reshape(weight.shape)
            .to(weight.dtype)
            for key, moments in self.regimes.items()
        }


#: the ``format`` entry of a patterns file's safetensors metadata
PATTERNS_FORMAT = "atomlens.patterns/1"


class MissingPattern(KeyError, ValueError):
    """A layer the patterns were not fitted for (patterns of another model): a user error
    (``ValueError``) as well as a lookup's (``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names and float32 values): patterns
    are fitted for these weights, and another model's would explain nothing."""
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return sha.hexdigest()


class Patterns(dict):
    """Layer name -> ``{"a", "a_plus", "a_minus"}``, each of the layer weight's shape.

    Saved as safetensors, one tensor per ``"<layer>/<key>"``, with ``format`` metadata that
    :meth:`load` checks (a model's weights or another file are refused, not misread) and,
    when saved with the model, that model's :func:`model_digest` (patterns loaded for
    another model are refused)."""

    def save(self, path: str | Path, model: nn.Module | None = None) -> None:
        tensors = {
            f"{layer}/{key}": pattern.contiguous()
            for layer, patterns in self.items()
            for key, pattern in patterns.items()
        }
        metadata = {"format": PATTERNS_FORMAT}
        if model is not None:
            metadata["model_sha256"] = model_digest(model)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Patterns:
        patterns = cls()
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # noqa: BLE001 (safetensors' own error types)
            raise ValueError(
                f"{path}: not a safetensors file ({err}); give patterns saved by atomlens"
            ) from None
        with handle:
            metadata = handle.metadata() or {}
            found = metadata.get("format")
            if found != PATTERNS_FORMAT:
                raise ValueError(
                    f"{path}: not an atomlens patterns file (safetensors format {found!r}, "
                    f"expected {PATTERNS_FORMAT!r}); fit patterns with fit_patterns()"
                )
            fitted_for = metadata.get("model_sha256")
            if model is not None and fitted_for is not None and fitted_for != model_digest(model):
                raise ValueError(
                    f"{path}: these patterns were fitted for another model (its weights "
                    f"differ); fit them for this model (explain molecule --fit-data)"
                )
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                layer, key = name.rsplit("/", 1)  # layer names may hold "/" themselves
                patterns.setdefault(layer, {})[key] = handle.get_tensor(name)
        return patterns


def batches(data: Tensor | Iterable) -> Iterator[Tensor]:
    """Input tensors from a tensor (one batch) or an iterable of tensors/``(x, ...)`` tuples."""
    if isinstance(data, Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


class PatternStatistics:
    """Streaming statistics for every Linear/Conv layer of ``model`` (BatchNorm folded)."""

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        self.model = model
        names = None if layers is None else set(layers)
        self.layers = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, LINEAR_TYPES) and (names is None or name in names)
        }
        self.statistics: dict[str, LayerStatistics] = {}

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x, y = layer_rows(module, inputs[0].detach(), output.detach())
            if name not in self.statistics:
                self.statistics[name] = LayerStatistics(y.shape[1], x.shape[1])
            self.statistics[name].update(x, y)

        return hook

    @torch.no_grad()
    def update(self, inputs: Tensor) -> None:
        """One forward pass over a batch, accumulating every layer's moments."""
        with canonized(self.model):
            handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
            try:
                self.model(inputs)
            finally:
                for handle in handles:
                    handle.remove()

    def patterns(self) -> Patterns:
        with canonized(self.model):
            return Patterns(
                {
                    name: self.statistics[name].patterns(self.layers[name].weight)
                    for name in self.layers
                    if name in self.statistics
                }
            )


def fit_patterns(
    model: nn.Module, data: Tensor | Iterable, layers: Iterable[str] | None = None
) -> Patterns:
    """Fit the patterns of every Linear/Conv layer in one pass over ``data``.

    ``data`` is an input tensor or an iterable of batches (a ``DataLoader`` yielding
    tensors or ``(inputs, targets)`` tuples). BatchNorm layers are folded first, so the
    patterns belong to the canonized layers that the explanation rules see.
    """
    statistics = PatternStatistics(model, layers)
    for inputs in batches(data):
        statistics.update(inputs)
    return statistics.patterns()
