"""Tests of atomlens.explain: the paper's toy problem, closed forms, agreement with
Captum and Zennit, conservation, streaming pattern statistics, canonizer, molecular
heads and the CLI."""

from __future__ import annotations

import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from atomlens.explain import (
    METHODS,
    Explainer,
    Patterns,
    PatternStatistics,
    canonized,
    explain,
    explain_atomwise,
    fit_patterns,
    perturbation_curve,
    quality_table,
    signal_quality,
)

torch.set_num_threads(2)


def small_cnn(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 10, bias=bias),
        nn.ReLU(),
        nn.Linear(10, 5, bias=bias),
    ).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def toy_data(n: int = 20000):
    """x = a_s y + a_d eps with the filter w = (1, -1): w^T a_d = 0, w^T a_s = 1."""
    generator = torch.Generator().manual_seed(0)
    signal_direction = torch.tensor([1.0, 0.0])
    distractor_direction = torch.tensor([1.0, 1.0])
    y = torch.randn(n, generator=generator)
    eps = torch.randn(n, generator=generator)
    x = y[:, None] * signal_direction + eps[:, None] * distractor_direction
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    return model, x, y, signal_direction


def test_linear_toy_problem():
    model, x, y, signal_direction = toy_data()
    assert torch.allclose(model(x)[:, 0], y, atol=1e-5)  # the filter recovers y
    gradient = explain(model, x[:5], "gradient", target=0)
    assert torch.allclose(gradient, torch.tensor([1.0, -1.0]).expand(5, 2))  # w, not a_s
    patterns = fit_patterns(model, x.split(1000))
    assert torch.allclose(patterns[""]["a"][0], signal_direction, atol=0.03)
    signal = explain(model, x[:5], "patternnet", target=0, patterns=patterns)
    assert torch.allclose(signal, y[:5, None] * signal_direction, atol=0.05)
    rho = {e: signal_quality(model, "", e, x, patterns).mean for e in ("x", "w", "a", "a+-")}
    assert rho["a"] > 0.97 and rho["a+-"] > 0.97
    # S_w leaves d = (1, 1)(y / 2 + eps): corr(y, d) = 0.5 / sqrt(1.25)
    assert rho["w"] == pytest.approx(1 - 0.5 / math.sqrt(1.25), abs=0.02)
    assert rho["w"] < rho["a"] - 0.4
    assert math.isnan(rho["x"])  # S_x leaves no distractor: the criterion is undefined


def correlated_data(n: int, dim: int, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    return torch.randn(n, dim, generator=generator) @ mixing + offset


def test_patternattribution_closed_form_one_layer():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = correlated_data(4000, 5)
    patterns = fit_patterns(model, x)
    # the pattern is a = cov[x, y] / (w^T cov[x, y]), computed here directly
    with torch.no_grad():
        y = model(x).double()
    xd = x.double() - x.double().mean(0)
    covariance = (y - y.mean(0)).T @ xd / len(x)
    expected = covariance / (covariance * model.weight.double()).sum(1, keepdim=True)
    assert torch.allclose(patterns[""]["a"].double(), expected, atol=1e-5)
    inputs, target = x[:7], 2
    relevance = explain(model, inputs, "patternattribution", target, patterns, pattern_type="a")
    with torch.no_grad():
        output = model(inputs)[:, target]
    closed_form = model.weight[target] * patterns[""]["a"][target] * output[:, None]
    assert torch.allclose(relevance, closed_form.detach(), atol=1e-5)
    assert torch.allclose(relevance.sum(1), output, atol=1e-4)  # w^T a = 1: conserved
    # two-component patterns: a_+ where the output is positive, a_- elsewhere
    relevance = explain(model, inputs, "patternattribution", target, patterns)
    chosen = torch.where(
        (output > 0)[:, None], patterns[""]["a_plus"][target], patterns[""]["a_minus"][target]
    )
    assert torch.allclose(relevance, (model.weight[target] * chosen * output[:, None]).detach())


def test_convolution_patterns_equal_patterns_of_explicit_patches():
    """A convolution's pattern is the linear pattern of its patches: every output position is
    a sample x = the input patch (built here with explicit loops over a padded copy),
    y = the filter's response there. a = cov[x, y] / (w^T cov[x, y]), in numpy."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(20, 2, 7, 7, generator=torch.Generator().manual_seed(9)) + 0.5
    patterns = fit_patterns(conv, x)[""]
    padded = np.pad(x.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = np.array(
        [
            padded[n, :, i : i + 3, j : j + 3].ravel()
            for n in range(20)
            for i in range(0, 7, 2)
            for j in range(0, 7, 2)
        ]
    )
    w = conv.weight.detach().double().numpy().reshape(3, -1)
    y = rows @ w.T + conv.bias.detach().double().numpy()
    centred = rows - rows.mean(0)
    covariance = (y - y.mean(0)).T @ centred / len(rows)
    expected = covariance / (covariance * w).sum(1, keepdims=True)
    ours = patterns["a"].double().numpy().reshape(3, -1)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
    # the same for a 1-D convolution (stride 1, dilation 2)
    conv1 = nn.Conv1d(2, 3, 3, padding=2, dilation=2)
    x1 = torch.randn(30, 2, 9, generator=torch.Generator().manual_seed(10)) + 0.5
    padded1 = np.pad(x1.double().numpy(), ((0, 0), (0, 0), (2, 2)))
    rows1 = np.array([padded1[n, :, i : i + 5 : 2].ravel() for n in range(30) for i in range(9)])
    w1 = conv1.weight.detach().double().numpy().reshape(3, -1)
    y1 = rows1 @ w1.T
    covariance1 = (y1 - y1.mean(0)).T @ (rows1 - rows1.mean(0)) / len(rows1)
    expected1 = covariance1 / (covariance1 * w1).sum(1, keepdims=True)
    ours1 = fit_patterns(conv1, x1)[""]["a"].double().numpy().reshape(3, -1)
    np.testing.assert_allclose(ours1, expected1, rtol=1e-4, atol=1e-6)


def test_two_component_patterns_closed_form():
    """a_+ = (E_+[x y] - E_+[x] E[y]) / (w^T E_+[x y] - w^T E_+[x] E[y]) with E[y] over ALL
    samples (Kindermans et al. 2018), written here in numpy from the equation."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = correlated_data(3000, 4, seed=1, offset=1.5)  # E_+[y] far from E[y]: forms differ
    with torch.no_grad():  # both regimes well populated: 30 %, 50 %, 70 % positive
        projection = x @ model.weight.T
        model.bias.copy_(-projection.quantile(torch.tensor([0.7, 0.5, 0.3]), dim=0).diag())
    patterns = fit_patterns(model, x.split(700))[""]
    xs = x.double().numpy()
    w = model.weight.detach().double().numpy()
    y = xs @ w.T + model.bias.detach().double().numpy()
    for key, regime in (("a_plus", y > 0), ("a_minus", y <= 0)):
        for k in range(3):
            rows = regime[:, k]
            ex_plus, exy_plus = xs[rows].mean(0), (xs[rows] * y[rows, k : k + 1]).mean(0)
            numerator = exy_plus - ex_plus * y[:, k].mean()
            expected = numerator / (w[k] @ numerator)
            ours = patterns[key][k].double().numpy()
            np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=1e-6)
            # the earlier form with E_+[y] (the regime's own mean) is far from it here
            own = exy_plus - ex_plus * y[rows, k].mean()
            assert np.abs(own / (w[k] @ own) - expected).max() > 0.05 * np.abs(expected).max()
    # what the form guarantees: cov[x - S_a+-(x), w^T x] = 0 over all samples
    a = torch.where(
        torch.from_numpy(y > 0)[:, :, None], patterns["a_plus"], patterns["a_minus"]
    ).double()
    projection = torch.from_numpy(xs @ w.T)
    distractor = torch.from_numpy(xs)[:, None, :] - a * projection[:, :, None]
    centred = distractor - distractor.mean(0)
    covariance = (centred * (projection - projection.mean(0))[:, :, None]).mean(0)
    assert covariance.abs().max() < 1e-4 * projection.std(0).max() * torch.from_numpy(xs).std()


def test_conservation():
    model = small_cnn(bias=False)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model(x)
    target = output.argmax(1)
    relevance = explain(model, x, "lrp_epsilon", target=target, epsilon=1e-9)
    selected = output.gather(1, target[:, None])[:, 0]
    assert torch.allclose(relevance.sum((1, 2, 3)), selected, rtol=1e-4, atol=1e-5)
    # PatternAttribution conserves through linear layers (w^T a = 1 for every neuron)
    torch.manual_seed(0)
    deep_linear = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    data = correlated_data(3000, 6)
    patterns = fit_patterns(deep_linear, data.split(500))
    relevance = explain(deep_linear, data[:5], "patternattribution", 1, patterns, pattern_type="a")
    with torch.no_grad():
        assert torch.allclose(relevance.sum(1), deep_linear(data[:5])[:, 1], atol=1e-4)


def test_agrees_with_captum(images):
    captum = pytest.importorskip("captum.attr")
    model = small_cnn()
    target = model(images).argmax(1)
    reference = {
        "gradient": captum.Saliency(model).attribute(images, target=target, abs=False),
        "integrated_gradients": captum.IntegratedGradients(model).attribute(
            images, target=target, n_steps=20
        ),
        "guided_backprop": captum.GuidedBackprop(model).attribute(images, target=target),
        "deconvnet": captum.Deconvolution(model).attribute(images, target=target),
    }
    for method, expected in reference.items():
        ours = explain(model, images, method, target=target, n_steps=20)
        assert torch.allclose(ours, expected.detach(), atol=1e-5), method


def _import_zennit():
    """Zennit imports torchvision at import time for its ResNet canonizers only; stub
    the two classes it names when torchvision is absent (not a dependency here)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = {
            name: types.ModuleType(name)
            for name in ("torchvision", "torchvision.models", "torchvision.models.resnet")
        }
        stub["torchvision.models.resnet"].Bottleneck = type("Bottleneck", (nn.Module,), {})
        stub["torchvision.models.resnet"].BasicBlock = type("BasicBlock", (nn.Module,), {})
        for name, module in stub.items():
            sys.modules.setdefault(name, module)
    return pytest.importorskip("zennit")


def test_agrees_with_zennit(images):
    _import_zennit()
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite
    from zennit.rules import AlphaBeta, Epsilon, Norm

    model = small_cnn()
    with torch.no_grad():
        output = model(images)
    cases = [
        ("lrp_epsilon", Epsilon(0.01), {"epsilon": 0.01}),
        ("lrp_epsilon", Epsilon(0.5), {"epsilon": 0.5}),  # large: eps sign z visibly matters
        ("lrp_alphabeta", AlphaBeta(1.0, 0.0), {}),
        ("lrp_alpha2_beta1", AlphaBeta(2.0, 1.0), {}),
    ]
    # the arg-max and the arg-min class: the smallest output is negative for most images, so
    # negative z_j reach the output layer's rule (where eps * sign(z) and beta matter)
    targets = (output.argmax(1), output.argmin(1))
    assert (output.gather(1, targets[1][:, None]) < 0).any()
    for target, (method, rule, options) in itertools.product(targets, cases):
        seed = torch.zeros_like(output).scatter(
            1, target[:, None], output.gather(1, target[:, None])
        )
        # average pooling is a linear layer: Zennit's Norm rule is our gradient through it
        composite = LayerMapComposite([((nn.Linear, nn.Conv2d), rule), (nn.AvgPool2d, Norm())])
        with Gradient(model, composite) as attributor:
            _, expected = attributor(images.clone().requires_grad_(True), seed)
        ours = explain(model, images, method, target=target, **options)
        assert torch.allclose(ours, expected, atol=1e-5), (method, options)


def test_streaming_statistics_equal_one_pass():
    from atomlens.explain.patterns import LayerStatistics

    # the accumulator itself, in float64, on data far from zero mean
    x = correlated_data(1000, 5, offset=1e4).double()
    y = x @ torch.randn(5, 3, dtype=torch.float64) - 2e4
    whole, streamed = LayerStatistics(3, 5), LayerStatistics(3, 5)
    whole.update(x, y)
    for rows in torch.arange(1000).split(37):
        streamed.update(x[rows], y[rows])
    for key, moments in whole.regimes.items():
        other = streamed.regimes[key]
        assert torch.equal(moments.count, other.count)
        assert torch.allclose(moments.mean_x, other.mean_x, rtol=1e-12)
        scale = moments.comoment.abs().max()
        assert torch.allclose(moments.comoment, other.comoment, rtol=1e-9, atol=1e-9 * scale)
    # through the model hooks: one pass over batches against one batch
    model = small_cnn()
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    streamed = PatternStatistics(model)
    for batch in data.split(7):
        streamed.update(batch)
    whole = PatternStatistics(model)
    whole.update(data)
    patterns, streamed_patterns = whole.patterns(), streamed.patterns()
    for name in patterns:
        assert (
            whole.statistics[name]
            .regimes["a"]
            .count.equal(streamed.statistics[name].regimes["a"].count)
        )
        for key, pattern in patterns[name].items():
            assert torch.allclose(pattern, streamed_patterns[name][key], rtol=1e-4, atol=1e-5)


def test_patterns_save_load(tmp_path):
    model = small_cnn()
    patterns = fit_patterns(model, torch.rand(16, 1, 8, 8))
    patterns.save(tmp_path / "patterns.safetensors")
    loaded = Patterns.load(tmp_path / "patterns.safetensors")
    assert loaded.keys() == patterns.keys()
    for name in patterns:
        assert patterns[name]["a_plus"].shape == dict(model.named_modules())[name].weight.shape
        for key in patterns[name]:
            assert torch.equal(loaded[name][key], patterns[name][key])


def test_patterns_file_is_checked_and_layer_names_may_hold_slashes(tmp_path):
    from safetensors.torch import save_file

    patterns = Patterns({"enc/0": {"a": torch.ones(2, 3)}, "": {"a_plus": torch.zeros(1, 2)}})
    patterns.save(tmp_path / "p.safetensors")
    loaded = Patterns.load(tmp_path / "p.safetensors")
    assert loaded.keys() == {"enc/0", ""} and torch.equal(loaded["enc/0"]["a"], torch.ones(2, 3))
    save_file({"0.weight": torch.ones(2, 2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not an atomlens patterns file"):
        Patterns.load(tmp_path / "weights.safetensors")
    save_file({"x/a": torch.ones(2)}, str(tmp_path / "other.safetensors"), {"format": "other/1"})
    with pytest.raises(ValueError, match="'other/1'"):
        Patterns.load(tmp_path / "other.safetensors")


def test_quality_table_is_signal_quality_per_layer_and_estimator():
    """Every Linear/Conv layer, every estimator, with the given patterns and settings passed
    through (patterns fitted on other data than the table's, a row limit)."""
    model = small_cnn()
    data = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    patterns = fit_patterns(model, torch.rand(40, 1, 8, 8) * 2)
    table = quality_table(model, data, patterns, max_rows=50)
    assert [row["layer"] for row in table] == ["0", "3", "7", "9"]
    for row in table:
        for estimator in ("w", "a", "a+-"):
            expected = signal_quality(model, row["layer"], estimator, data, patterns, max_rows=50)
            assert row[estimator] == expected.mean, (row["layer"], estimator)
        assert math.isnan(row["x"])
    assert table[0]["a"] != signal_quality(model, "0", "a", data).mean  # patterns matter
    assert table[0]["w"] != signal_quality(model, "0", "w", data).mean  # max_rows matters


def multiple_correlation(y: np.ndarray, d: np.ndarray) -> float:
    """R of y on the columns of d: corr(y, its least-squares fit with an intercept)."""
    design = np.column_stack([d, np.ones(len(y))])
    fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    return float(np.corrcoef(y, fit)[0, 1])


def test_max_correlation_is_the_multiple_correlation_with_intercept():
    """max_v corr(y, v^T d) = the multiple correlation R of y on d (least squares with an
    intercept), written here in numpy; y and d with non-zero and unequal means."""
    from atomlens.explain.quality import _max_correlation

    generator = np.random.default_rng(0)
    y = generator.normal(5.0, 2.0, 500)
    d = np.stack([0.3 * y + generator.normal(7.0, 1.0, 500), generator.normal(-3.0, 4.0, 500)], 1)
    expected = multiple_correlation(y, d)
    ours = _max_correlation(torch.from_numpy(y), torch.from_numpy(d), cross_fit=False)
    assert ours == pytest.approx(expected, rel=1e-9) and 0.3 < ours < 0.95
    assert _max_correlation(torch.from_numpy(y), torch.zeros(500, 2, dtype=torch.float64)) == 0.0

    # cross-fitted: v (with intercept) from the even rows scored on the odd ones and back
    def scored(fit, other):
        design = np.column_stack([d[fit], np.ones(len(fit))])
        coefficients = np.linalg.lstsq(design, y[fit], rcond=None)[0]
        return float(np.corrcoef(y[other], d[other] @ coefficients[:-1])[0, 1])

    even, odd = np.arange(0, 500, 2), np.arange(1, 500, 2)
    crossed = 0.5 * (scored(even, odd) + scored(odd, even))
    ours = _max_correlation(torch.from_numpy(y), torch.from_numpy(d))
    assert ours == pytest.approx(crossed, rel=1e-9) and ours < expected


def test_cross_fitting_removes_the_correlation_least_squares_finds_in_noise():
    """y unrelated to 60 columns of d over 400 rows: fitted and scored on the same rows,
    least squares finds R ~ sqrt(60 / 400) (rho capped near 0.6 whatever the estimator);
    cross-fitted it finds next to nothing."""
    from atomlens.explain.quality import _max_correlation

    generator = torch.Generator().manual_seed(3)
    y = torch.randn(400, generator=generator, dtype=torch.float64)
    d = torch.randn(400, 60, generator=generator, dtype=torch.float64)
    assert 0.3 < _max_correlation(y, d, cross_fit=False) < 0.5
    assert _max_correlation(y, d) < 0.1


def test_signal_quality_of_a_neuron_that_never_varies_is_nan():
    """A neuron with zero weights (pruned) has no correlation to measure: NaN for it, for
    every estimator, and the layer's mean over the others (the division by w^T w = 0 had
    sent NaN into least squares, which failed for the whole table)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[1] = 0.0
    x = correlated_data(2000, 4, seed=2, offset=0.5)
    patterns = fit_patterns(model, x)
    for estimator in ("w", "a", "a+-"):
        quality = signal_quality(model, "", estimator, x, patterns)
        assert (
            torch.isnan(quality.per_neuron[1]) and not torch.isnan(quality.per_neuron[[0, 2]]).any()
        )
        assert quality.mean == pytest.approx(float(quality.per_neuron[[0, 2]].mean()))


def test_signal_quality_of_each_estimator_in_numpy():
    """rho(S) = 1 - R(y, d), d = x - S(x), S_w = w y / w^T w, S_a = a y, S_a+- = a_+ y where
    the pre-activation is positive and a_- y elsewhere, R the multiple correlation; computed
    here in numpy for a Linear layer with a bias (both regimes populated)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = correlated_data(3000, 4, seed=8, offset=0.5)
    patterns = fit_patterns(model, x)
    xs = x.double().numpy()
    w = model.weight.detach().double().numpy()
    z = xs @ w.T + model.bias.detach().double().numpy()
    y = xs @ w.T
    found = {}
    for estimator in ("w", "a", "a+-"):
        quality = signal_quality(model, "", estimator, x, patterns, cross_fit=False)
        assert quality.estimator == estimator and quality.layer == ""
        for k in range(2):
            if estimator == "w":
                direction = np.broadcast_to(w[k] / (w[k] @ w[k]), xs.shape)
            elif estimator == "a":
                direction = np.broadcast_to(patterns[""]["a"][k].double().numpy(), xs.shape)
            else:
                plus = patterns[""]["a_plus"][k].double().numpy()
                minus = patterns[""]["a_minus"][k].double().numpy()
                direction = np.where((z[:, k] > 0)[:, None], plus, minus)
            direction = direction / (direction @ w[k])[:, None]  # w^T a = 1
            d = xs - y[:, k : k + 1] * direction
            correlation = multiple_correlation(y[:, k], d)
            # compared as 1 - rho: S_a and S_a+- both leave R ~ 1e-7 here (both zero the
            # covariance of d and y), but not the same 1e-7
            assert 1.0 - float(quality.per_neuron[k]) == pytest.approx(correlation, rel=1e-3)
        found[estimator] = quality.mean
    assert abs(found["w"] - found["a"]) > 0.5, found


def test_signal_quality_of_a_one_input_layer():
    """With one input, S_w(x) = x: the distractor is zero and holds no information about y,
    so rho(S_w) = 1 (the no-variance branch)."""
    model = nn.Linear(1, 2)
    x = torch.randn(100, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(signal_quality(model, "", "w", x).per_neuron, torch.ones(2).double())


def test_signal_quality_takes_a_module_or_its_name_and_refuses_others():
    model = small_cnn()
    data = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    by_module = signal_quality(model, model[3], "w", data)
    assert by_module.layer == "3"
    assert torch.equal(by_module.per_neuron, signal_quality(model, "3", "w", data).per_neuron)
    assert signal_quality(model, "3", "x", data).per_neuron.dtype == torch.float64
    with pytest.raises(ValueError, match="unknown estimator 'v'"):
        signal_quality(model, "3", "v", data)
    with pytest.raises(TypeError, match="'1' is not a Linear/Conv layer"):
        signal_quality(model, "1", "w", data)


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (2.0, 1.0)])
def test_alpha_beta_closed_form_with_mixed_signs(alpha, beta):
    """R_i = sum_j (alpha (x_i w_ij)^+ / z_j^+ - beta (x_i w_ij)^- / z_j^-) R_j with
    z_j^+- = sum_i (x_i w_ij)^+- + b_j^+-, written in numpy; inputs of both signs and a bias of
    both signs, so that every part of the rule counts."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    target = 1
    relevance = explain(model, x, "lrp_alphabeta", target, alpha=alpha, beta=beta)
    xs, w = x.double().numpy(), model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    contributions = xs[:, None, :] * w[None, :, :]  # (sample, j, i)
    positive, negative = contributions.clip(min=0), contributions.clip(max=0)
    z_pos = positive.sum(2) + b.clip(min=0)
    z_neg = negative.sum(2) + b.clip(max=0)
    r_out = np.zeros((4, 3))
    r_out[:, target] = xs @ w[target] + b[target]
    expected = (alpha * positive / z_pos[:, :, None] - beta * negative / z_neg[:, :, None]) * r_out[
        :, :, None
    ]
    np.testing.assert_allclose(relevance.double().numpy(), expected.sum(1), rtol=1e-4, atol=1e-6)


def test_alpha_beta_parameters():
    from atomlens.explain.rules import AlphaBeta

    rule = AlphaBeta()
    assert (rule.alpha, rule.beta) == (1.0, 0.0)  # LRP-alpha1-beta0 by default
    for alpha, beta in ((3.0, 1.0), (0.5, -0.5)):
        with pytest.raises(ValueError, match="alpha - beta must be 1 with beta >= 0"):
            AlphaBeta(alpha, beta)


def test_relu_pattern_type_always_uses_a_plus():
    """pattern_type="relu" (iNNvestigate's choice) back-projects with a_+ for every output,
    also those with z <= 0, where "a+-" would take a_-."""
    from atomlens.explain.rules import Pattern

    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = correlated_data(2000, 5, seed=3)
    patterns = fit_patterns(model, x)
    inputs = x[:16]
    with torch.no_grad():
        output = model(inputs)
    negative = output[:, 0] <= 0
    assert negative.any() and (~negative).any()
    for attribution, method in ((True, "patternattribution"), (False, "patternnet")):
        ours = explain(model, inputs, method, 0, patterns, pattern_type="relu")
        pattern = patterns[""]["a_plus"][0] * (model.weight[0] if attribution else 1)
        expected = (pattern * output[:, :1]).detach()
        assert torch.allclose(ours, expected, atol=1e-5), method
        two = explain(model, inputs, method, 0, patterns, pattern_type="a+-")
        assert not torch.allclose(two[negative], ours[negative], atol=1e-3)
    with pytest.raises(ValueError, match="unknown pattern_type 'b'"):
        Pattern(patterns[""], True, "b")


def test_strided_and_grouped_convolutions_conserve_relevance():
    """LRP through a convolution with stride 2 and 2 groups (the backward pass re-runs the
    layer with its stride, padding, dilation and groups): with a tiny epsilon and no biases
    the relevance sums to the output."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3, bias=False),
    ).eval()
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        output = model(x).max(1).values
    for method in ("lrp_epsilon", "lrp_alphabeta"):  # the layer through autograd, and re-run
        relevance = explain(model, x, method, epsilon=1e-9)
        assert torch.allclose(relevance.sum((1, 2, 3)), output, rtol=1e-4, atol=1e-6), method
    with pytest.raises(NotImplementedError, match="grouped convolutions"):
        fit_patterns(model, x)


def test_only_zero_padding_is_explained():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten())
    with pytest.raises(NotImplementedError, match="only zero padding"):
        explain(model.eval(), torch.rand(1, 1, 4, 4), "lrp_alphabeta", target=0)


def test_fit_patterns_inputs_layers_and_shapes():
    """Patterns from (x, label) batches equal those from the bare tensor; ``layers`` limits
    the layers fitted; a Linear on (batch, atoms, features) inputs is fitted per row."""
    from atomlens.explain.rules import Epsilon

    model = small_cnn()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    labels = torch.zeros(32, dtype=torch.long)
    whole = fit_patterns(model, x)
    from_pairs = fit_patterns(model, [(x[:16], labels[:16]), [x[16:], labels[16:]]])
    for name in whole:
        for key in whole[name]:
            assert torch.allclose(from_pairs[name][key], whole[name][key], atol=1e-5)
    assert list(fit_patterns(model, x, layers=["3"])) == ["3"]
    torch.manual_seed(0)
    linear = nn.Linear(4, 2)
    rows = correlated_data(600, 4, seed=7)
    three_d = fit_patterns(linear, rows.reshape(100, 6, 4))[""]
    flat = fit_patterns(linear, rows)[""]
    for key in flat:
        assert torch.allclose(three_d[key], flat[key], atol=1e-5)
    assert Epsilon().epsilon == 1e-6


def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(192, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.5),
        nn.Linear(4, 2),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.rand(32, 1, 8, 8) * 3 + 1)
        for module in model:
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)
    return model.eval()


def test_batchnorm_canonizer_preserves_and_restores():
    model = bn_model()
    x = torch.rand(5, 1, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        with canonized(model):
            inside = model(x)
            assert model[0].bias is not None and float(model[1].running_var.sum()) == 3.0
        after = model(x)
    assert torch.allclose(before, inside, atol=1e-5)
    assert torch.equal(before, after)
    assert model[0].bias is None
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.train()  # the explainer uses eval mode and restores the caller's mode
    explain(model, x, "lrp_epsilon")
    assert model.training


def test_hooks_are_removed_and_errors(images):
    model = small_cnn()
    patterns = fit_patterns(model, images)
    for method in METHODS:
        relevance = explain(model, images, method, patterns=patterns, n_steps=4, n_samples=2)
        assert relevance.shape == images.shape and torch.isfinite(relevance).all(), method
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="unknown method 'no_such_method'; choose one of"):
        Explainer(model, "no_such_method")
    with pytest.raises(ValueError, match=r"pattern methods need patterns=fit_patterns\(model"):
        explain(model, images, "patternnet")
    partial = {name: layer for name, layer in patterns.items() if name != "0"}
    with pytest.raises(KeyError, match="no pattern fitted for layer '0'"):
        explain(model, images, "patternnet", patterns=partial)
    gradient = explain(model, images, "gradient", target=1)
    assert torch.allclose(explain(model, images, "smoothgrad", 1, noise_level=0.0), gradient)


class ShiftedSoftplus(nn.Module):
    def forward(self, x):
        return nn.functional.softplus(x) - math.log(2.0)


@pytest.mark.parametrize("activation", [ShiftedSoftplus(), nn.Tanh()])
def test_explain_atomwise(activation):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 8, bias=False), activation, nn.Linear(8, 1, bias=False))
    features = torch.randn(5, 6)
    with torch.no_grad():
        energies = head(features)[:, 0]
        zero = head(torch.zeros(1, 6))[0, 0]
    ig = explain_atomwise(head, features, "integrated_gradients")
    assert ig.shape == (5,) and torch.allclose(ig, energies - zero, atol=1e-4)
    # the ratio rule is LRP's pass rule: without biases LRP-0 conserves the energy
    lrp = explain_atomwise(head, features, "lrp_epsilon", epsilon=1e-9)
    assert torch.allclose(lrp, energies, atol=1e-4)
    gxi = explain_atomwise(head, features, "gradient_x_input")
    assert gxi.shape == (5,)
    patterns = fit_patterns(head, torch.randn(500, 6))
    pa = explain_atomwise(head, features, "patternattribution", patterns=patterns)
    assert pa.shape == (5,) and torch.isfinite(pa).all()
    torch.testing.assert_close(  # relevance of each atom: its features' relevances summed
        pa, explain(head, features, "patternattribution", target=0, patterns=patterns).sum(1)
    )
    # without patterns, they are fitted on the features themselves
    torch.testing.assert_close(
        explain_atomwise(head, features, "patternattribution"),
        explain_atomwise(
            head, features, "patternattribution", patterns=fit_patterns(head, features)
        ),
    )
    with pytest.raises(ValueError, match="method must be one of"):
        explain_atomwise(head, features, "guided_backprop")


def test_perturbation_curve(images):
    model = small_cnn()
    relevance = explain(model, images, "gradient_x_input")
    result = perturbation_curve(model, images, relevance, patch=2, replacement="noise")
    assert result.curve.shape == (17,) and math.isfinite(result.auc)
    with torch.no_grad():
        start = model(images).max(1).values.mean()
    assert torch.isclose(result.curve[0], start)


def test_perturbation_curve_equals_its_definition(images):
    """A linear two-class model on 2 x 2 patches: regions ordered by summed relevance (most
    relevant first, per image), replaced one after the other by the fill, the target output
    averaged over images, the area under it by the trapezoid rule; written out in numpy."""
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    model.train()  # the curve runs in eval mode and gives the mode back
    x = images.numpy()[:, 0]
    relevance = torch.randn(images.shape, generator=generator)
    weights = model[1].weight.detach().numpy().reshape(2, 8, 8)
    bias = model[1].bias.detach().numpy()
    uniform = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)).numpy()
    fills = {
        "mean": np.broadcast_to(x.mean(0), x.shape),
        "zero": np.zeros_like(x),
        "noise": x.min() + (x.max() - x.min()) * uniform[:, 0],  # the default seed, 0
    }
    for replacement, fill in fills.items():
        for target in (1, None):
            result = perturbation_curve(
                model, images, relevance, target=target, patch=2, replacement=replacement
            )
            assert model.training
            outputs = np.einsum("nhw,khw->nk", x, weights) + bias
            targets = outputs.argmax(1) if target is None else np.full(len(x), target)
            region_sums = relevance.numpy()[:, 0].reshape(6, 4, 2, 4, 2).sum((2, 4))
            current, curve = x.copy(), []
            orders = [np.argsort(-r.ravel(), kind="stable") for r in region_sums]
            for k in range(17):
                if k:
                    for i, order in enumerate(orders):
                        row, col = divmod(order[k - 1], 4)
                        rows, cols = slice(2 * row, 2 * row + 2), slice(2 * col, 2 * col + 2)
                        current[i, rows, cols] = fill[i, rows, cols]
                out = np.einsum("nhw,khw->nk", current, weights) + bias
                curve.append(out[np.arange(len(x)), targets].mean())
            np.testing.assert_allclose(result.curve.numpy(), curve, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(result.fractions.numpy(), np.arange(17) / 16, atol=1e-7)
            assert result.auc == pytest.approx(np.trapezoid(curve, np.arange(17) / 16), rel=1e-5)
    noise = perturbation_curve(model, images, relevance, replacement="noise", seed=4).curve
    torch.testing.assert_close(
        noise, perturbation_curve(model, images, relevance, replacement="noise", seed=4).curve
    )
    assert not torch.equal(
        noise, perturbation_curve(model, images, relevance, replacement="noise", seed=5).curve
    )
    with pytest.raises(ValueError, match="multiple of the patch size"):
        perturbation_curve(model, images, relevance, patch=3)
    with pytest.raises(ValueError, match="unknown replacement"):
        perturbation_curve(model, images, relevance, replacement="blur")


def test_digits_study_and_its_command(tmp_path, monkeypatch, capsys):
    from atomlens.cli import main
    from atomlens.explain import METHODS, digits
    from atomlens.explain.digits import Digits, digits_study, load_digits_data

    def small_digits(**kwargs) -> Digits:  # keep the test small
        data = load_digits_data(**kwargs)
        return Digits(data.x_train[:200], data.y_train[:200], data.x_test[:40], data.y_test[:40])

    monkeypatch.setattr(digits, "load_digits_data", small_digits)
    study = digits_study(tmp_path, epochs=1, n_images=2, n_perturbation=16, n_quality=100)
    assert 0.0 <= study.accuracy <= 1.0
    assert [row["method"] for row in study.perturbation] == ["random", *METHODS]
    assert all(math.isfinite(row["auc"]) for row in study.perturbation)
    assert study.quality and all("layer" in row for row in study.quality)
    assert {row["data"] for row in study.quality} == {"train", "test"}
    for name in (
        "explanations.png",
        "patterns.safetensors",
        "digits_cnn.safetensors",
        "quality.json",
        "quality.csv",
        "perturbation.json",
        "perturbation.csv",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert study.files["model"] == tmp_path / "digits_cnn.safetensors"
    # the command: the saved CNN is loaded (not trained again) and the tables printed
    model_path = tmp_path / "digits_cnn.safetensors"
    argv = ["explain", "--out", str(tmp_path / "again"), "--model", str(model_path)]
    assert main([*argv, "--n-images", "1", "--n-perturbation", "4", "--n-quality", "20"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "signal quality" in printed and "random" in printed
    assert not (tmp_path / "again" / "digits_cnn.safetensors").exists()
    # the saved CNN records its split's seed: another seed's study would test it on its
    # own training images, and is refused before any work
    assert digits.saved_split_seed(model_path) == 0
    with pytest.raises(ValueError, match="trained on the digits split of seed 0"):
        digits_study(tmp_path / "other", model_path=model_path, seed=1)
    assert not (tmp_path / "other").exists()
    # and the study leaves the caller's torch random state as it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digits_study(tmp_path / "third", model_path=model_path, n_images=1, n_perturbation=4)
    assert torch.equal(torch.rand(3), expected)


def test_digits_cnn_training_is_seeded_and_leaves_the_callers_state():
    """Two trainings with one seed give one CNN (dropout's masks too), and the caller's
    global torch random stream goes on as if they had not run."""
    from atomlens.explain.digits import Digits, load_digits_data, train_digits_cnn

    data = load_digits_data()
    small = Digits(data.x_train[:128], data.y_train[:128], data.x_test[:8], data.y_test[:8])
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = train_digits_cnn(small, epochs=1, seed=0).state_dict()
    second = train_digits_cnn(small, epochs=1, seed=0).state_dict()
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_conv1d_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(12, 4, bias=False),
    ).eval()
    x = torch.rand(5, 2, 8)
    patterns = fit_patterns(model, x)
    assert patterns["0"]["a"].shape == model[0].weight.shape
    for method in METHODS:
        relevance = explain(model, x, method, patterns=patterns, n_steps=4, n_samples=2)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all(), method
    with torch.no_grad():
        output = model(x).max(1).values
    relevance = explain(model, x, "lrp_epsilon", epsilon=1e-9)
    assert torch.allclose(relevance.sum((1, 2)), output, rtol=1e-4, atol=1e-5)


def test_batchnorm_is_folded_by_default():
    """Explainers fold BatchNorm into the preceding linear layer unless canonize=False: LRP
    of the folded network is LRP of one linear map diag(s) W, and differs from passing the
    gradient through a separate BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        norm = model[1]
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3.0)
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(8, 5)
    default = explain(model, x, "lrp_epsilon", target=1)
    folded = explain(model, x, "lrp_epsilon", target=1, canonize=True)
    plain = explain(model, x, "lrp_epsilon", target=1, canonize=False)
    torch.testing.assert_close(default, folded)
    assert not torch.allclose(plain, folded, atol=1e-3)
    with torch.no_grad():  # the folded network, built by hand
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        first = nn.Linear(5, 4)
        first.weight.copy_(model[0].weight * scale[:, None])
        first.bias.copy_((model[0].bias - norm.running_mean) * scale + norm.bias)
    by_hand = nn.Sequential(first, nn.ReLU(), model[3])
    torch.testing.assert_close(folded, explain(by_hand, x, "lrp_epsilon", target=1))
    mixed = torch.arange(8) % 3  # per-sample targets, not all the arg-max
    torch.testing.assert_close(  # nothing to fold: the same either way, targets included
        explain(by_hand, x, "lrp_epsilon", target=mixed, canonize=False),
        explain(model, x, "lrp_epsilon", target=mixed),
    )
    assert len(model) == 4 and isinstance(model[1], nn.BatchNorm1d)  # the model is unchanged


def test_integrated_gradients_and_smoothgrad_take_their_options(images):
    """The explainer passes baseline/n_steps and n_samples/noise_level/seed through, with the
    documented defaults (0, 50; 16, 0.1, 0), to the attributors over the plain gradient."""
    from atomlens.explain.attributors import integrated_gradients, smoothgrad

    model = small_cnn()
    target = torch.full((len(images),), 1)

    def gradient(x):
        return explain(model, x, "gradient", target=target)

    ig = integrated_gradients(gradient, images, 0.0, 50)
    torch.testing.assert_close(explain(model, images, "integrated_gradients", target=target), ig)
    torch.testing.assert_close(
        explain(model, images, "integrated_gradients", target=target, baseline=0.3, n_steps=7),
        integrated_gradients(gradient, images, 0.3, 7),
    )
    torch.testing.assert_close(
        explain(model, images, "smoothgrad", target=target),
        smoothgrad(gradient, images, 16, 0.1, 0),
    )
    torch.testing.assert_close(
        explain(model, images, "smoothgrad", target=target, n_samples=5, noise_level=0.3, seed=2),
        smoothgrad(gradient, images, 5, 0.3, 2),
    )


def test_attributors_against_closed_forms():
    """IG of f(x) = sum x^2 / 2 from a baseline b is (x - b)(x + b) / 2 exactly (the
    quadrature is exact for polynomials); SmoothGrad of the same f averages x + sigma * noise
    with sigma = level * (max - min) per sample and the seeded noise, in this order."""
    from atomlens.explain.attributors import integrated_gradients, smoothgrad

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    baseline = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)

    def identity(z):
        return z.clone()  # the gradient of sum z^2 / 2

    torch.testing.assert_close(
        integrated_gradients(identity, x, baseline, 3), (x - baseline) * (x + baseline) / 2
    )
    torch.testing.assert_close(integrated_gradients(identity, x), x * x / 2)  # baseline 0
    for options, (n, level, seed) in (({}, (16, 0.1, 0)), ((5, 0.3, 2), (5, 0.3, 2))):
        result = smoothgrad(identity, x, *options) if options else smoothgrad(identity, x)
        generator = torch.Generator().manual_seed(seed)
        sigma = level * (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values)
        expected = sum(x + sigma * torch.randn(x.shape, generator=generator) for _ in range(n)) / n
        torch.testing.assert_close(result, expected.to(x))


def test_batchnorm_without_affine_parameters_folds_exactly():
    from atomlens.explain import canonized

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, affine=False))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(6, 4)
    expected = model(x)
    with canonized(model):
        torch.testing.assert_close(model(x), expected)
        assert model[0].bias is not None and model[0].bias.dtype == x.dtype
    torch.testing.assert_close(model(x), expected)
