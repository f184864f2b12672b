"""Tabulated SchNet filters: the same model as the direct evaluation, to float32 rounding."""

import math

import numpy as np
import pytest
import torch
from helpers import qm9_sample, random_model

from atomlens.data import PackedDataset
from atomlens.nn import hermite_coefficients, hermite_lookup
from atomlens.runtime import tune_allocator


@pytest.fixture(scope="module")
def data():
    return qm9_sample()


def sharp_model(spacing):
    """A SchNet with filter networks sharper than at initialisation (a harder table)."""
    model = random_model("schnet")
    with torch.no_grad():
        for block in model.representation.interactions:
            for layer in (block.filter_network[0], block.filter_network[2]):
                layer.weight.mul_(3.0)
    model.representation.filter_spacing = spacing
    return model


def reference_cubic(table, x):
    k = x.detach().floor().clamp(max=table.shape[0] - 1)
    t = (x - k)[:, None]
    c = table[k.long()]
    return c[:, 0] + t * (c[:, 1] + t * (c[:, 2] + t * c[:, 3]))


def check_lookup(gen):
    """hermite_lookup is the cubic and has exact first and second derivatives; the table."""
    table = torch.randn(6, 4, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
    x = (torch.rand(9, dtype=torch.float64, generator=gen) * 5.8 + 0.1).requires_grad_(True)
    torch.testing.assert_close(hermite_lookup(table, x), reference_cubic(table, x))
    assert torch.autograd.gradcheck(hermite_lookup, (table, x))
    assert torch.autograd.gradgradcheck(hermite_lookup, (table, x))
    return table


def test_hermite_lookup_is_the_cubic_and_differentiable_twice():
    gen = torch.Generator().manual_seed(0)
    table = check_lookup(gen)
    # beyond the last node: the last node's value, no gradient
    far = torch.tensor([6.0, 9.0], dtype=torch.float64, requires_grad=True)
    out = hermite_lookup(table, far)
    torch.testing.assert_close(out[1], out[0])
    (grad,) = torch.autograd.grad(out[1].sum(), far)
    assert grad[1] == 0


def test_hermite_lookup_of_nan_is_nan_from_a_valid_row(always_fused):
    """A NaN distance reads a valid row (compiled kernels do not bounds-check) and gives NaN;
    the other pairs are unaffected."""
    table = torch.randn(5, 4, 3, dtype=torch.float64)
    x = torch.tensor([float("nan"), 1.5, 2.5], dtype=torch.float64)
    values = hermite_lookup(table, x)
    assert torch.isnan(values[0]).all()
    torch.testing.assert_close(values[1:], reference_cubic(table, x[1:]))
    # rows stay inside the table in low precision too (bfloat16 rounds 499 up to 500)
    from atomlens.nn.hermite import _weights

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        grid = torch.tensor([0.0, 250.3, 499.5, 500.0, 1e4, float("nan")], dtype=dtype)
        rows, _ = _weights(grid, 500, 0)
        assert 0 <= int(rows.min()) and int(rows.max()) < 4 * 500, dtype


def test_fused_cfconv_refuses_pair_indices_out_of_range(always_fused):
    """The compiled kernels do not bounds-check rows: the public wrapper does, once."""
    from atomlens.nn import cfconv_symmetric

    x, filters = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(IndexError, match="cfconv pair indices out of range: 0..4 for 4 rows"):
        cfconv_symmetric(x, filters, torch.tensor([0, 1, 4, 2]), torch.tensor([4, 2, 0, 1]))


def test_hermite_table_reproduces_a_function_and_its_derivative():
    grid = torch.linspace(0.0, 5.0, 501, dtype=torch.float64)
    f = torch.stack([torch.sin(3 * grid), torch.exp(-(grid**2))], 1)
    df = torch.stack([3 * torch.cos(3 * grid), -2 * grid * torch.exp(-(grid**2))], 1)
    table = hermite_coefficients(f, df * 0.01)
    r = torch.linspace(0.003, 4.99, 997, dtype=torch.float64, requires_grad=True)
    values = hermite_lookup(table, r / 0.01)
    exact = torch.stack([torch.sin(3 * r), torch.exp(-(r**2))], 1)
    assert (values - exact).abs().max() < 1e-8
    (slope,) = torch.autograd.grad(values[:, 0].sum(), r)
    assert (slope - 3 * torch.cos(3 * r)).abs().max() < 1e-5


def test_tabulated_model_matches_direct_evaluation(data):
    batch = data.batch(range(8), 5.0, torch.float64)
    direct = sharp_model(None)(batch, forces=True)
    errors = {}
    for spacing in (0.02, 0.01):
        tabulated = sharp_model(spacing)(batch, forces=True)
        torch.testing.assert_close(tabulated["energy"], direct["energy"], rtol=0, atol=1e-6)
        errors[spacing] = float((tabulated["forces"] - direct["forces"]).abs().max())
    scale = float(direct["forces"].abs().max())
    assert errors[0.01] < 1e-6 * scale
    assert errors[0.02] / errors[0.01] > 8  # cubic Hermite: error ~ spacing^4


def test_tables_by_device_type_and_frozen_models_keep_theirs(data, monkeypatch):
    """A model that is not frozen evaluates its filters from tables only on the device types
    of TABLES_ON (the CPU); elsewhere (a GPU) per pair, exactly the direct model. A frozen
    model's tables are used anywhere. Small calls on a GPU run the plain kernels."""
    from atomlens.models import schnet
    from atomlens.nn import kernels

    assert schnet.TABLES_ON == ("cpu",)
    assert kernels.min_fused_size(torch.device("cpu")) == kernels.MIN_FUSED_SIZE == 1 << 17
    assert kernels.min_fused_size(torch.device("cuda")) == kernels.MIN_FUSED_SIZE_GPU == 1 << 24
    batch = data.batch(range(8), 5.0, torch.float64)
    model = sharp_model(0.02)
    tabulated = model(batch, forces=True)["forces"]
    direct = sharp_model(None)(batch, forces=True)["forces"]
    assert (tabulated - direct).abs().max() > 1e-12  # the table error is seen ...
    monkeypatch.setattr(schnet, "TABLES_ON", ())  # ... as on a GPU: per pair
    torch.testing.assert_close(model(batch, forces=True)["forces"], direct, rtol=0, atol=0)
    r = model.representation
    frozen = r(batch.numbers, batch.positions, batch.pairs, r.freeze())  # (TABLES_ON empty)
    per_pair = r(batch.numbers, batch.positions, batch.pairs)
    assert (frozen - per_pair).abs().max() > 1e-12  # the frozen model kept its tables ...
    monkeypatch.setattr(schnet, "TABLES_ON", ("cpu",))
    tabulated = r(batch.numbers, batch.positions, batch.pairs)  # ... which are these
    torch.testing.assert_close(frozen, tabulated, rtol=0, atol=0)


def test_tabulated_training_gradients_match_direct(data):
    batch = data.batch(range(4), 5.0, torch.float64)
    grads = []
    for spacing in (None, 0.01):
        model = sharp_model(spacing).train()
        out = model(batch, forces=True)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()  # double backward
        loss.backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_tabulated_forces_are_continuous_across_grid_nodes():
    model = sharp_model(0.01)
    node = 1.37  # a grid node of the 0.01 Angstrom table
    forces = []
    for d in (node - 1e-9, node + 1e-9):
        dimer = PackedDataset(
            np.array([6, 8]), np.array([[0.0, 0, 0], [d, 0, 0]]), np.array([0, 2])
        )
        forces.append(model(dimer.batch([0], 5.0, torch.float64), forces=True)["forces"])
    torch.testing.assert_close(forces[0], forces[1], rtol=1e-6, atol=1e-9)


def test_allocator_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ATOMLENS_TUNE_MALLOC", "0")
    assert tune_allocator(force=True) is False
    monkeypatch.delenv("ATOMLENS_TUNE_MALLOC")
    import sys

    if sys.platform.startswith("linux"):
        assert tune_allocator(force=True) is True


@pytest.fixture
def always_fused(monkeypatch):
    from atomlens.nn import kernels

    monkeypatch.setattr(kernels, "MIN_FUSED_SIZE", 0)
    assert kernels.fused_enabled()
    yield kernels
    assert kernels.fused_enabled(), "the fused kernels failed to compile and were switched off"


def test_fused_kernels_have_exact_first_and_second_derivatives(always_fused):
    from atomlens.nn import cfconv_symmetric

    gen = torch.Generator().manual_seed(1)
    check_lookup(gen)

    features = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    filters = torch.randn(8, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    a, b = torch.randint(0, 6, (8,), generator=gen), torch.randint(0, 6, (8,), generator=gen)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])

    def conv(features, filters):
        return cfconv_symmetric(features, filters, pair_i, pair_j)

    expected = torch.zeros(6, 3, dtype=torch.float64).index_add_(
        0, pair_i, features[pair_j] * torch.cat([filters, filters])
    )
    torch.testing.assert_close(conv(features, filters), expected)
    assert torch.autograd.gradcheck(conv, (features, filters))
    assert torch.autograd.gradgradcheck(conv, (features, filters))
    # under a torch.func transform the Functions take autograd.Function's full apply
    loss = lambda features: conv(features, filters.detach()).pow(2).sum()
    (by_autograd,) = torch.autograd.grad(loss(features), features)
    torch.testing.assert_close(torch.func.grad(loss)(features.detach()), by_autograd)


def test_force_training_step_is_the_same_fused_or_plain(data, always_fused):
    batch = data.batch(range(6), 5.0, torch.float64)
    grads = []
    for fused in (True, False):
        always_fused.set_fused(fused)
        model = sharp_model(0.01).train()
        out = model(batch, forces=True)
        (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    always_fused.set_fused(True)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_fused_kernel_falls_back_once_when_compiling_fails(monkeypatch):
    """No C++ compiler (or any compile error): one warning naming the error, the plain
    function's result, fused kernels off for the process (no second attempt or warning)."""
    import warnings

    from atomlens.nn import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(kernels, "MIN_FUSED_SIZE", 0)
    monkeypatch.setitem(kernels._state, "enabled", True)
    kernel = kernels.FusedKernel(lambda x: 2 * x, eager=lambda x: x + x)
    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match=r"fused kernels unavailable \(RuntimeError: no C\+\+ "):
        torch.testing.assert_close(kernel(x, size=4), 2 * x)
    assert not kernels.fused_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kernel(x, size=4), 2 * x)
    kernels.set_fused(True)
    assert kernels.fused_enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_cfconv_kernel_is_the_convolution(dtype):
    """The hand-written one-pass loop (``nn.cpu_kernels``) against the formula, on pairs
    that share atoms, a pair of an atom with itself and a feature width that is no multiple
    of the vector width; ``None`` (the Inductor kernel's turn) when it does not apply."""
    from atomlens.nn import cpu_kernels, kernels

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 13, generator=gen).to(dtype)
    w = torch.randn(9, 13, generator=gen).to(dtype)
    a = torch.tensor([0, 0, 1, 2, 3, 3, 5, 6, 4])
    b = torch.tensor([1, 2, 2, 6, 4, 5, 6, 6, 4])
    expected = torch.zeros_like(x).index_add_(0, a, x[b] * w).index_add_(0, b, x[a] * w)
    y = cpu_kernels.cfconv(x, w, a, b)
    assert y is not None, "the C++ kernel did not compile"
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)
    # strided inputs are made contiguous, not read wrongly
    wide = torch.randn(9, 26, generator=gen).to(dtype)
    torch.testing.assert_close(
        cpu_kernels.cfconv(x, wide[:, ::2], a, b),
        torch.zeros_like(x)
        .index_add_(0, a, x[b] * wide[:, ::2])
        .index_add_(0, b, x[a] * wide[:, ::2]),
        rtol=tolerance,
        atol=tolerance,
    )
    assert cpu_kernels.cfconv(x.half(), w.half(), a, b) is None
    kernels.set_fused(False)
    try:
        assert cpu_kernels.cfconv(x, w, a, b) is None  # ATOMLENS_FUSED=0
    finally:
        kernels.set_fused(True)


def test_the_kernel_build_finds_the_environments_own_ninja(monkeypatch, tmp_path):
    """With the virtual environment not activated, ``ninja`` (a dependency) sits beside the
    interpreter but not on PATH: the build gets that folder on PATH, and PATH is restored."""
    import os
    import shutil

    from atomlens.nn import cpu_kernels

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "ninja").write_text("#!/bin/sh\n")
    (folder / "ninja").chmod(0o755)
    monkeypatch.setattr(cpu_kernels.sys, "executable", str(folder / "python"))
    monkeypatch.setenv("PATH", "/nowhere")
    real_which = shutil.which
    monkeypatch.setattr(
        cpu_kernels.shutil, "which", lambda cmd, path=None: real_which(cmd, path=path)
    )
    with cpu_kernels._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep) == [str(folder), "/nowhere"]
    assert os.environ["PATH"] == "/nowhere"
    monkeypatch.setenv("PATH", str(folder))  # already on PATH: nothing to add
    with cpu_kernels._ninja_on_path():
        assert os.environ["PATH"] == str(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_table_scatter_is_the_lookups_transpose(dtype):
    """The one-pass C++ scatter into the Hermite table against ``_scatter_plain`` for every
    derivative order, at the grid's ends, beyond it, between nodes and for a NaN distance
    (row 0, NaN through the weights that depend on t)."""
    from atomlens.nn import cpu_kernels
    from atomlens.nn.hermite import _scatter_plain

    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(40, 13, generator=gen).to(dtype)
    x = (torch.rand(40, generator=gen) * 10).to(dtype)
    x[:5] = torch.tensor([0.0, 10.0, float("nan"), 9.9999, 12.5], dtype=dtype)
    for order in range(5):
        got = cpu_kernels.table_scatter(grad, x, order, 40)
        assert got is not None, "the C++ kernels did not compile"
        expected = _scatter_plain(grad, x, order, 40)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert (
        cpu_kernels.table_scatter(grad, x.float() if dtype == torch.float64 else x.double(), 0, 40)
        is None
    )


def test_cpp_shifted_softplus_and_its_derivatives():
    """The C++ shifted softplus (its own vectorized exp and log1p, one vector at a time and
    one value at a time after the last whole vector) against float64's
    softplus(x) - ln 2 over -100..100 and at 0, +-tiny, +-88, +-inf and NaN, to float32's
    rounding of max(1, |ssp|); its derivative grad * sigmoid(x) likewise; through
    ``shifted_softplus`` the Function is used for large float32 inputs, and a backward pass
    that builds a graph gives the exact second derivative."""
    from atomlens.nn import cpu_kernels, kernels, shifted_softplus
    from atomlens.nn.activations import MIN_KERNEL_SIZE

    special = [0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 88.0, -88.0, 200.0, -200.0]
    special = torch.tensor([*special, float("inf"), -float("inf"), float("nan")])
    # the specials in the first vectors and in the rest after the last whole vector
    x = torch.cat((special, torch.linspace(-100.0, 100.0, 400_001), special))
    y = cpu_kernels.shifted_softplus(x)
    assert y is not None, "the C++ kernels did not compile"
    torch.testing.assert_close(y[:13], y[-13:], rtol=0, atol=0, equal_nan=True)
    x64 = x.double()
    want = torch.nn.functional.softplus(x64) - math.log(2.0)
    finite = torch.isfinite(x)
    scale = want[finite].abs().clamp(min=1.0)
    assert ((y.double()[finite] - want[finite]).abs() / scale).max() < 1.5e-7
    assert y[-3] == float("inf") and y[-2] == pytest.approx(-math.log(2.0)) and y[-1].isnan()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    dy = cpu_kernels.shifted_softplus_backward(grad, x)
    want_dy = grad.double() * torch.sigmoid(x64)
    assert (dy.double()[finite] - want_dy[finite]).abs().max() < 1e-6
    assert dy[-3] == grad[-3] and dy[-2] == 0.0 and dy[-1].isnan()
    # a strided input is read correctly; float64 is not this kernel's
    wide = torch.randn(300, 40, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        cpu_kernels.shifted_softplus(wide[:, ::2]),
        (torch.nn.functional.softplus(wide[:, ::2].double()) - math.log(2.0)).float(),
    )
    assert cpu_kernels.shifted_softplus(x64) is None

    # the autograd Function: first derivatives by the C++ loop, second ones differentiable
    z = (torch.randn(MIN_KERNEL_SIZE // 64 + 1, 64) * 6).requires_grad_(True)
    out = shifted_softplus(z)
    assert type(out.grad_fn).__name__ == "_ShiftedSoftplusBackward"
    g = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, z, g, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    s = torch.sigmoid(z.detach().double())
    torch.testing.assert_close(first.detach().double(), g.double() * s, rtol=0, atol=1e-6)
    torch.testing.assert_close(second.double(), g.double() * s * (1 - s), rtol=0, atol=1e-6)
    (plain,) = torch.autograd.grad(shifted_softplus(z), z, g)
    torch.testing.assert_close(plain.double(), g.double() * s, rtol=0, atol=1e-6)
    import torch.autograd.forward_ad as fwad

    tangent = torch.randn_like(z)
    with fwad.dual_level():  # forward mode
        dual = shifted_softplus(fwad.make_dual(z.detach(), tangent))
        torch.testing.assert_close(
            fwad.unpack_dual(dual).tangent.double(), tangent.double() * s, rtol=0, atol=1e-6
        )
    # torch.func transforms of a function of plain tensors use PyTorch's rules
    batched = torch.func.vmap(lambda c: c * shifted_softplus(z.detach()).sum())(torch.ones(3))
    want_sum = (torch.nn.functional.softplus(z.detach().double()) - math.log(2.0)).sum()
    torch.testing.assert_close(batched.double(), want_sum.expand(3), rtol=1e-6, atol=0)
    small = torch.randn(4, 8, requires_grad=True)
    assert type(shifted_softplus(small).grad_fn).__name__ != "_ShiftedSoftplusBackward"
    kernels.set_fused(False)
    try:
        assert type(shifted_softplus(z).grad_fn).__name__ == "SubBackward0"
    finally:
        kernels.set_fused(True)


def test_compiled_code_calls_the_shifted_softplus_operator_with_its_derivatives():
    """Inside ``torch.compile`` (MD's compiled step differentiates with ``torch.func``) a
    large float32 shifted softplus is the operator ``atomlens::shifted_softplus``, its
    derivative (a backward pass that builds no graph) ``atomlens::shifted_softplus_backward``;
    both equal float64's formula to float32 rounding. Small inputs and float64 keep the
    formula."""
    from atomlens.nn import cpu_kernels, shifted_softplus
    from atomlens.nn.activations import MIN_KERNEL_SIZE

    cpu_kernels.prepare("cpu")
    if not cpu_kernels.compiled_ops_ready(torch.ones(1)):
        pytest.skip("the C++ kernels did not compile")
    # (applied to an intermediate, as in a model: torch 2.13's Dynamo drops an autograd
    # Function's derivative when its input is torch.func.grad's own argument)
    grad_and_value = torch.func.grad_and_value(lambda v: (shifted_softplus(3.0 * v) * v).sum())
    compiled = torch.compile(grad_and_value, backend="aot_eager", fullgraph=True, dynamic=False)
    z = torch.randn(MIN_KERNEL_SIZE // 64 + 1, 64, generator=torch.Generator().manual_seed(5))
    with torch.profiler.profile() as profile, torch.no_grad():  # as MD's step
        gradient, value = compiled(z)
    called = {event.key for event in profile.key_averages()}
    assert {"atomlens::shifted_softplus", "atomlens::shifted_softplus_backward"} <= called
    z64 = z.double()
    ssp = torch.nn.functional.softplus(3.0 * z64) - math.log(2.0)
    want = ssp + 3.0 * z64 * torch.sigmoid(3.0 * z64)  # d/dz (ssp(3z) z)
    torch.testing.assert_close(gradient.double(), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(value.double(), (ssp * z64).sum(), rtol=1e-6, atol=0)
    for small in (z[:4], z64):
        torch._dynamo.reset()
        with torch.profiler.profile() as profile:
            compiled(small)
        assert "atomlens::shifted_softplus" not in {e.key for e in profile.key_averages()}


def _tabulated_case(dtype, n_intervals=6, width=13):
    """Pairs sharing atoms (atoms with themselves, alone and within a run of pairs of one
    first atom), grid coordinates at both ends, between nodes, beyond the grid on either
    side (beyond the end also first in a run of two, whose second pair the loops must still
    take) and NaN; by default a width no multiple of the vector width."""
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(7, width, generator=gen).to(dtype)
    table = torch.randn(n_intervals, 4, width, generator=gen).to(dtype)
    a = torch.tensor([0, 0, 1, 2, 3, 3, 5, 6, 4, 1, 2, 2])
    b = torch.tensor([1, 2, 2, 6, 4, 5, 6, 6, 4, 5, 3, 2])
    grid = (torch.rand(12, generator=gen) * n_intervals).to(dtype)
    grid[:5] = torch.tensor([0.0, float(n_intervals), 2.0, n_intervals + 1.5, -0.25], dtype=dtype)
    grid[10] = n_intervals + 0.25  # the run of atom 2: pairs 10 and 11 (2 with itself)
    return h, table, grid, a, b


def _lookup_then_cfconv(h, table, grid, a, b):
    """The same convolution from the public pieces: filters from the table (clamped below
    the grid, zero beyond its end: the tables end at the cutoff), then cfconv."""
    from atomlens.nn.cfconv import _cfconv_plain
    from atomlens.nn.hermite import _lookup_plain

    n = table.shape[0]
    w = _lookup_plain(table.reshape(4 * n, -1), grid.clamp(0.0, float(n)), 0)
    w = torch.where((grid > n)[:, None], torch.zeros_like(w), w)
    return _cfconv_plain(h, w, a, b)


@pytest.mark.parametrize("width", [13, 77, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tabulated_cfconv_is_lookup_then_cfconv_with_its_first_derivatives(dtype, width):
    """The one-pass C++ convolution with filters read from their Hermite table, and its one-
    pass backward, against the filters looked up and convolved by the plain formulas: the
    output and its gradients w.r.t. the features, the table and the grid coordinates, each
    asked for alone, in pairs (dL/dh and dL/dx: forces) and all together; no grid gradient
    beyond the grid's ends. Widths below one chunk of features, chunks and a rest, whole
    chunks (the runs of pairs of one atom keep its rows in registers a chunk at a time)."""
    from atomlens.nn import cpu_kernels
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(dtype, width=width)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    assert cpu_kernels.available(h, table, grid), "the C++ kernels did not compile"
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    g = torch.randn(h.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    for wanted in ([0], [1], [2], [0, 2], [0, 1], [1, 2], [0, 1, 2]):  # [0, 2]: forces
        inputs = [t.clone().requires_grad_(k in wanted) for k, t in enumerate((h, table, grid))]
        got = cfconv_tabulated(*inputs, pair_i, pair_j)
        expected = _lookup_then_cfconv(*inputs, a, b)
        assert got.grad_fn.name() == "_TabulatedCFConvBackward"
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        leaves = [inputs[k] for k in wanted]
        for x, y in zip(
            torch.autograd.grad(got, leaves, g), torch.autograd.grad(expected, leaves, g)
        ):
            torch.testing.assert_close(x, y, rtol=tolerance, atol=tolerance)
    grid_grad = torch.autograd.grad(
        cfconv_tabulated(h, table, inputs[2], pair_i, pair_j), inputs[2], g
    )[0]
    assert (
        grid_grad[3] == grid_grad[4] == grid_grad[10] == 0 and grid_grad[1] != 0
    )  # beyond; the end


def _interval_kernels_or_skip():
    from atomlens.nn import cpu_kernels

    probe = torch.zeros(1)
    if (
        cpu_kernels.interval_order(
            probe, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 1, 1
        )
        is None
    ):
        pytest.skip("no AVX-512 build: the by-interval path is off")


def test_interval_order_sorts_by_atom_block_then_interval_stably():
    """The by-interval kernels' order: a permutation of the pairs, by block of
    2^INTERVAL_BLOCK_SHIFT first atoms, then by grid interval (clamped: below the grid
    interval 0, its end and beyond the last, NaN 0), the pairs of one key in their order."""
    from atomlens.nn import cpu_kernels

    _interval_kernels_or_skip()
    gen = torch.Generator().manual_seed(5)
    # a coarse grid (a counting sort) and a fine one beside few pairs (a stable sort)
    for n_pairs, n_intervals in ((5000, 40), (300, 20000)):
        a = torch.randint(0, 1100, (n_pairs,), generator=gen)
        b = torch.randint(0, 1100, (n_pairs,), generator=gen)
        x = torch.rand(n_pairs, generator=gen) * (n_intervals + 4) - 2
        x[:3] = torch.tensor([float("nan"), float(n_intervals), -0.5])
        for dtype in (torch.float32, torch.float64):
            xs, as_, bs = cpu_kernels.interval_order(x.to(dtype), a, b, n_intervals, 1100)
            k = torch.nan_to_num(x, nan=0.0).floor().clamp(0, n_intervals - 1).long()
            key = (a >> cpu_kernels.INTERVAL_BLOCK_SHIFT) * n_intervals + k
            order = torch.argsort(key, stable=True)
            assert torch.equal(as_, a[order]) and torch.equal(bs, b[order])
            torch.testing.assert_close(xs, x.to(dtype)[order], rtol=0, atol=0, equal_nan=True)
    assert cpu_kernels.INTERVAL_BLOCK_SHIFT == 8
    empty = torch.zeros(0, dtype=torch.int64)
    assert all(t.numel() == 0 for t in cpu_kernels.interval_order(x[:0], empty, empty, 3, 0))
    # atoms outside [0, atoms), up to int64's largest, are refused (no key overflows)
    for bad in (1100, 2**63 - 1, -1):
        for which in (0, 1):
            pair = [a.clone(), b.clone()]
            pair[which][7] = bad
            with pytest.raises(RuntimeError, match="outside"):
                cpu_kernels.interval_order(x, *pair, n_intervals, 1100)


@pytest.mark.parametrize("width", [13, 77, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tabulated_cfconv_by_interval_is_lookup_then_cfconv(dtype, width):
    """The by-interval loops (forward: chunks of 4 vectors of features, backward: 2, then
    the rest pair by pair) on the pairs in interval order: the plain formulas' output and
    first derivatives w.r.t. the features and the table, each alone and both; a backward
    pass that builds a graph (second derivatives) goes through the general path, as exact.
    Many pairs per interval, several atom blocks, an atom paired with itself."""
    from atomlens.nn.cfconv import IntervalPairs, cfconv_tabulated

    _interval_kernels_or_skip()
    gen = torch.Generator().manual_seed(3)
    n_atoms, n_pairs, n_intervals = 600, 3000, 7
    h = torch.randn(n_atoms, width, generator=gen).to(dtype)
    table = torch.randn(n_intervals, 4, width, generator=gen).to(dtype)
    a = torch.randint(0, n_atoms, (n_pairs,), generator=gen)
    b = torch.randint(0, n_atoms, (n_pairs,), generator=gen)
    b[:4] = a[:4]  # periodic self-images: both halves on one row
    grid = (torch.rand(n_pairs, generator=gen) * (n_intervals + 1) - 0.5).to(dtype)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    by_interval = IntervalPairs.sort(grid, pair_i, pair_j, n_intervals, n_atoms)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    g = torch.randn(h.shape, dtype=dtype, generator=gen)
    for wanted in ([0], [1], [0, 1]):
        inputs = [t.clone().requires_grad_(k in wanted) for k, t in enumerate((h, table))]
        got = cfconv_tabulated(*inputs, grid, pair_i, pair_j, by_interval)
        expected = _lookup_then_cfconv(*inputs, grid, a, b)
        assert got.grad_fn.name() == "_IntervalCFConvBackward"
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        leaves = [inputs[k] for k in wanted]
        for x, y in zip(
            torch.autograd.grad(got, leaves, g), torch.autograd.grad(expected, leaves, g)
        ):  # a table row adds up ~400 pairs' terms, in another order: tolerance by scale
            scale = float(y.abs().max())
            torch.testing.assert_close(x, y, rtol=tolerance, atol=tolerance * scale)
    # with a graph (the table's gradient of |dL/dh|^2): the general path, the same numbers
    second = []
    for by in (by_interval, None):
        h1, t1 = h.clone().requires_grad_(True), table.clone().requires_grad_(True)
        y = cfconv_tabulated(h1, t1, grid, pair_i, pair_j, by)
        (gh,) = torch.autograd.grad(y, h1, g, create_graph=True)
        second.append(torch.autograd.grad(gh.pow(2).sum(), t1)[0])
    torch.testing.assert_close(
        second[0], second[1], rtol=tolerance, atol=tolerance * float(second[1].abs().max())
    )
    # grid coordinates that need a gradient (forces) take the first-atom path, and so do
    # pairs sorted from other tensors (a hook that replaced the grid, other pairs or rows)
    moving = grid.clone().requires_grad_(True)
    y = cfconv_tabulated(h, table, moving, pair_i, pair_j, by_interval)
    assert y.grad_fn.name() == "_TabulatedCFConvBackward"
    h1 = h.clone().requires_grad_(True)
    for args in (
        (h1, table, grid * 0.5, pair_i, pair_j),
        (h1, table, grid, pair_i.clone(), pair_j),
        (h1, table, grid, pair_i, pair_j.clone()),
        (h1[:599], table, grid, pair_i.clamp(max=598), pair_j.clamp(max=598)),
    ):
        y = cfconv_tabulated(*args, by_interval)
        assert y.grad_fn.name() == "_TabulatedCFConvBackward"
        torch.testing.assert_close(
            y, _lookup_then_cfconv(args[0], table, args[2], args[3][:n_pairs], args[4][:n_pairs])
        )


def test_interval_pairs_only_for_plain_eager_calls_without_forces(monkeypatch):
    """The pairs are reordered for eager calls whose grid needs no gradient, with enough
    pairs and filters; never while tracing (``torch.jit.trace`` would keep the order of the
    example as a constant), compiling or under functorch transforms."""
    from atomlens.nn import cfconv

    _interval_kernels_or_skip()
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 500, (3000,), generator=gen)
    b = torch.randint(0, 500, (3000,), generator=gen)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    grid = torch.rand(3000, generator=gen) * 10
    got = cfconv.interval_pairs(grid, pair_i, pair_j, 10, 128, 500)
    assert (
        got is not None and got.grid.shape == grid.shape and got.serves(grid, pair_i, pair_j, 500)
    )
    assert cfconv.interval_pairs(grid, pair_i, pair_j, 10, 64, 500) is None
    assert cfconv.interval_pairs(grid.requires_grad_(True), pair_i, pair_j, 10, 128, 500) is None
    grid = grid.detach()
    assert cfconv.interval_pairs(grid[:1000], pair_i[:2000], pair_j[:2000], 10, 128, 500) is None
    assert cfconv.interval_pairs(grid, pair_i.int(), pair_j.int(), 10, 128, 500) is None
    with monkeypatch.context() as patch:
        patch.setattr(torch.jit, "is_tracing", lambda: True)
        assert cfconv.interval_pairs(grid, pair_i, pair_j, 10, 128, 500) is None
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert cfconv.interval_pairs(grid, pair_i, pair_j, 10, 128, 500) is None
    found = torch.func.vmap(
        lambda g: torch.tensor(cfconv.interval_pairs(g, pair_i, pair_j, 10, 128, 500) is None)
    )(grid[None])
    assert bool(found.all())


def test_schnet_trains_on_the_by_interval_path_with_the_same_gradients(data, monkeypatch):
    """A SchNet step without forces on a batch of at least MIN_INTERVAL_PAIRS pairs runs
    the by-interval convolution (once-sorted pairs shared by the blocks); its energies and
    parameter gradients are those of the first-atom path. With forces, for small batches
    and for fewer than MIN_INTERVAL_WIDTH filters, the first-atom path."""
    from atomlens.nn import cfconv

    _interval_kernels_or_skip()
    model = sharp_model(0.02).float().train()
    assert cfconv.MIN_INTERVAL_WIDTH == 128
    assert model.representation.interactions[0].in2f.out_features < 128  # the small model
    monkeypatch.setattr(cfconv, "MIN_INTERVAL_WIDTH", 16)
    batch = data.batch(range(40), 5.0, torch.float32)
    assert batch.pairs.i.shape[0] // 2 >= cfconv.MIN_INTERVAL_PAIRS
    seen = []
    spy = cfconv.interval_pairs

    def spying(*args):
        seen.append(spy(*args))
        return seen[-1]

    monkeypatch.setattr("atomlens.models.schnet.interval_pairs", spying)
    results = []
    for threshold in (cfconv.MIN_INTERVAL_PAIRS, 10**9):
        monkeypatch.setattr(cfconv, "MIN_INTERVAL_PAIRS", threshold)
        model.zero_grad()
        energy = model(batch)["energy"]
        energy.pow(2).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((energy.detach(), grads))
    assert seen[0] is not None and seen[1] is None
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(cfconv, "MIN_INTERVAL_PAIRS", 1)
    model(batch, forces=True)
    small = data.batch(range(2), 5.0, torch.float32)
    monkeypatch.setattr(cfconv, "MIN_INTERVAL_PAIRS", 2048)
    model(small)
    monkeypatch.setattr(cfconv, "MIN_INTERVAL_WIDTH", 128)
    model(batch)
    assert seen[2] is None and seen[3] is None and seen[4] is None


@pytest.mark.parametrize("width", [13, 77])
def test_tabulated_cfconv_nan_distance_gives_nan_on_its_atoms_only(width):
    """A NaN grid coordinate (a NaN distance) reads row 0 and makes its two atoms' outputs
    NaN, as the lookup does; the other atoms stay finite. Backward (forces): its own dL/dx
    and its atoms' dL/dh are NaN, the rest finite (NaN is never skipped as beyond)."""
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(torch.float32, width=width)
    grid[9] = float("nan")  # pair (1, 5)
    h.requires_grad_(True)
    grid.requires_grad_(True)
    y = cfconv_tabulated(h, table, grid, torch.cat([a, b]), torch.cat([b, a]))
    assert torch.isnan(y[[1, 5]]).all()
    assert torch.isfinite(y[[0, 2, 3, 4, 6]]).all()
    grad_h, grad_grid = torch.autograd.grad(y, (h, grid), torch.ones_like(y))
    assert torch.isnan(grad_grid[9]) and torch.isfinite(grad_grid[torch.arange(12) != 9]).all()
    assert torch.isnan(grad_h[[1, 5]]).all()
    assert torch.isfinite(grad_h[[0, 2, 3, 4, 6]]).all()


def test_public_kernel_operators_refuse_atom_indices_out_of_range():
    """torch.ops.atomlens.tabulated_cfconv(_backward) and cpu_kernels.cfconv are public: an
    atom index outside the feature rows (6 of 6, or -1) is an error, not a write outside
    the buffer (heap corruption)."""
    from atomlens.nn import cpu_kernels

    h, table, grid, a, b = _tabulated_case(torch.float32, width=4)
    rows = h.shape[0]
    for bad in (rows, -1):
        wrong = b.clone()
        wrong[0] = bad
        with pytest.raises(RuntimeError, match="atom index outside"):
            torch.ops.atomlens.tabulated_cfconv(h, table.reshape(-1, h.shape[1]), grid, a, wrong)
        with pytest.raises(RuntimeError, match="atom index outside"):
            torch.ops.atomlens.tabulated_cfconv_backward(
                torch.ones_like(h),
                h,
                table.reshape(-1, h.shape[1]),
                grid,
                wrong,
                b,
                True,
                True,
                True,
            )
        filters = torch.randn(len(a), 4)
        with pytest.raises(RuntimeError, match="atom index outside"):
            cpu_kernels.cfconv(h, filters, a, wrong)


def test_compiled_operator_refuses_a_second_derivative():
    """The operator the compiled MD step calls has first derivatives only: a second one
    (a loss on forces) is an error, not the zero it had silently been."""
    from atomlens.nn import cpu_kernels

    h, table, grid, a, b = _tabulated_case(torch.float32, width=4)
    h.requires_grad_(True)
    table = table.reshape(-1, h.shape[1]).requires_grad_(True)
    grid.requires_grad_(True)
    y = cpu_kernels.TabulatedCFConvOp.apply(h, table, grid, a, b)
    (grad_grid,) = torch.autograd.grad(y.square().sum(), grid, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative of its own"):
        torch.autograd.grad(grad_grid.square().sum(), table)


def test_tabulated_cfconv_derivatives_of_every_order():
    """gradcheck and gradgradcheck (float64): the one-pass backward is exact, and force
    training's double backward (composed Functions) is too."""
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(torch.float64, width=5)
    grid[:5] = torch.tensor([0.5, 5.5, 2.5, 7.5, -0.25], dtype=torch.float64)  # off the kinks
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    inputs = tuple(t.requires_grad_(True) for t in (h, table, grid))

    def convolution(h, table, grid):
        return cfconv_tabulated(h, table, grid, pair_i, pair_j)

    assert convolution(*inputs).grad_fn.name() == "_TabulatedCFConvBackward"
    assert torch.autograd.gradcheck(convolution, inputs)
    assert torch.autograd.gradgradcheck(convolution, inputs)


def test_tabulated_cfconv_falls_back_to_lookup_and_cfconv():
    """Where the C++ kernels do not apply (fused kernels off, half precision) the lookup
    and the convolution run instead, with the same result."""
    from atomlens.nn import kernels
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(torch.float64)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    expected = _lookup_then_cfconv(h, table, grid, a, b)
    kernels.set_fused(False)
    try:
        y = cfconv_tabulated(h.requires_grad_(True), table, grid, pair_i, pair_j)
    finally:
        kernels.set_fused(True)
    assert y.grad_fn.name() != "_TabulatedCFConvBackward"
    torch.testing.assert_close(y, expected)
    half = cfconv_tabulated(
        h.detach().bfloat16(), table.bfloat16(), grid.bfloat16(), pair_i, pair_j
    )
    torch.testing.assert_close(half.double(), expected, rtol=0.1, atol=0.2)


def test_kernel_build_is_named_for_the_processor(monkeypatch, tmp_path):
    """The build uses the processor's vector units (-march=native) under a name that carries
    a digest of its instruction-set flags, so a build cached for one processor is never
    loaded on another; unreadable flags give a generic build."""
    from atomlens.nn import cpu_kernels

    def target(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        real_open = open
        monkeypatch.setattr(
            "builtins.open",
            lambda f, *a, **k: real_open(path if f == "/proc/cpuinfo" else f, *a, **k),
        )
        return cpu_kernels._build_target()

    avx2 = target("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512 = target("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n")
    arm = target("processor\t: 0\nFeatures\t: fp asimd sve\n")
    generic = target("processor\t: 0\n")
    assert "-march=native" in avx2[1] and "-march=native" in arm[1]
    assert len({avx2[0], avx512[0], arm[0], generic[0]}) == 4
    assert generic == (
        f"{cpu_kernels._NAME}_generic",
        ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-Wno-psabi"],
    )
    assert avx2 == target("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")  # stable


def _float32_model():
    from atomlens.models import build_model

    torch.manual_seed(3)
    kwargs = {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 1, "cutoff": 5.0}
    return build_model({"representation": "schnet", "representation_kwargs": kwargs})


@pytest.mark.parametrize(
    "dtype, operator",
    [
        (torch.float64, "atomlens::tabulated_cfconv_backward"),
        # the dense layers' oneDNN operator (float32; 300+ atoms: oneDNN-sized products)
        (torch.float32, "atomlens::linear"),
    ],
)
def test_compiled_energy_training_calls_the_cpp_operators_with_the_same_gradients(
    data, dtype, operator
):
    """Energy training with a compiled representation (``compile: true``) runs the tabulated
    convolution (first derivatives, the table's included) and, in float32, the dense layers
    as their operators, and gives the eager model's parameter gradients. Float32 is what
    training runs: Dynamo traces the layers' Functions there (the apply that skips argument
    binding steps aside while tracing; it had failed)."""
    from atomlens.nn import cpu_kernels

    float64 = dtype == torch.float64
    batch = data.batch(range(6 if float64 else 20), 5.0, dtype)
    grads = []
    for compiled in (False, True):
        model = (random_model("schnet", seed=4) if float64 else _float32_model()).train()
        if compiled:
            cpu_kernels.prepare("cpu")
            model.representation.compile(dynamic=True)
        with torch.profiler.profile() as profile:
            model(batch)["energy"].pow(2).sum().backward()
        called = {event.key for event in profile.key_averages()}
        assert (operator in called) == compiled
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    tolerance = (1e-9, 1e-11) if float64 else (2e-4, 1e-4 * float(grads[0].abs().max()))
    torch.testing.assert_close(grads[1], grads[0], rtol=tolerance[0], atol=tolerance[1])


def test_force_training_second_pass_of_the_tabulated_cfconv():
    """Forces' part of force training: the derivatives w.r.t. the features and the grid
    (create_graph, no table gradient asked for) are one differentiable Function whose
    backward is one C++ pass; gradcheck checks that pass against finite differences (every
    input, the table's included), gradgradcheck the third derivatives (composed Functions),
    and the plain formulas give the same second pass."""
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(torch.float64, width=5)
    grid[:5] = torch.tensor([0.5, 5.5, 2.5, 7.5, -0.25], dtype=torch.float64)  # off the kinks
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    gen = torch.Generator().manual_seed(8)
    r = torch.randn(h.shape, dtype=torch.float64, generator=gen)

    def first_derivatives(h, table, grid, convolution=None, upstream=r):
        y = (convolution or (lambda *t: cfconv_tabulated(*t, pair_i, pair_j)))(h, table, grid)
        return torch.autograd.grad(y, (h, grid), upstream, create_graph=True)

    inputs = tuple(t.requires_grad_(True) for t in (h, table, grid))
    grad_h, grad_grid = first_derivatives(*inputs)
    assert grad_h.grad_fn.name() == "_TabulatedCFConvGradBackward"
    assert torch.autograd.gradcheck(first_derivatives, inputs)
    # w.r.t. the upstream gradient too (the terms in A and c h W' of the second pass)
    upstream = r.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda g, *t: first_derivatives(*t, upstream=g), (upstream, *inputs)
    )
    assert torch.autograd.gradgradcheck(first_derivatives, inputs)
    s = torch.randn(h.shape, dtype=torch.float64, generator=gen)
    q = torch.randn(grid.shape, dtype=torch.float64, generator=gen)
    plain = first_derivatives(*inputs, lambda *t: _lookup_then_cfconv(*t, a, b))
    for got, expected in zip(
        torch.autograd.grad((grad_h * s).sum() + (grad_grid * q).sum(), inputs),
        torch.autograd.grad((plain[0] * s).sum() + (plain[1] * q).sum(), inputs),
    ):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_kernel_build_falls_back_to_a_generic_build_then_to_the_compiled_kernels(monkeypatch):
    """A compiler that refuses the processor's flags gets the generic build; when that
    fails too, one warning names both errors and the callers use Inductor's kernels."""
    import warnings

    from atomlens.nn import cpu_kernels

    built = []

    def build(name, cflags):
        built.append(name)
        if "-march=native" in cflags:
            raise RuntimeError("unknown -march")
        return "generic module"

    monkeypatch.setattr(cpu_kernels, "_build", build)
    monkeypatch.setattr(cpu_kernels, "_build_target", lambda: ("native_build", ["-march=native"]))
    monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "failed": False})
    assert cpu_kernels._module() == "generic module"
    assert built == ["native_build", f"{cpu_kernels._NAME}_generic"]

    def broken(name, cflags):
        raise RuntimeError(f"no compiler for {name}")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "failed": False})
    with pytest.warns(UserWarning, match="no compiler for native_build.*no compiler for"):
        assert cpu_kernels._module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels._module() is None  # said once
    assert not cpu_kernels.available(torch.zeros(2, 2))


def test_kernel_build_says_compiling_only_when_it_compiles(monkeypatch, caplog):
    """The one-off compile is said (the CLI prints it as "atomlens: ..."); a library that
    torch's cache already holds is loaded without the notice."""
    import logging

    from atomlens.nn import cpu_kernels

    assert not cpu_kernels._built("atomlens_no_such_build")
    monkeypatch.setattr(cpu_kernels, "_build", lambda name, cflags: "module")
    for cached in (True, False):
        monkeypatch.setattr(cpu_kernels, "_built", lambda name, cached=cached: cached)
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "failed": False})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="atomlens"):
            assert cpu_kernels._module() == "module"
        said = [r.getMessage() for r in caplog.records]
        assert said == ([] if cached else ["compiling the C++ pair kernels (once; cached on disk)"])


def test_without_a_compiler_one_warning_and_no_compile_attempts_after_it(monkeypatch):
    """No working C++ compiler: both builds fail alike, and torch.compile's kernels and the
    calculator's automatic compiling would each fail and warn again (with torch's long
    message). One warning says it all (the build's error once); the compiled kernels and
    automatic compiling stay off. With a compiler that works (our build failing for another
    reason) torch.compile's kernels stay on."""
    import warnings

    from atomlens.nn import cpu_kernels, kernels

    def broken(name, cflags):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setenv("ATOMLENS_COMPILE", "1")  # the tests' default is off
    for works in (False, True):
        monkeypatch.setattr(cpu_kernels, "_compiler_works", lambda works=works: works)
        monkeypatch.setattr(cpu_kernels, "_state", {"module": None, "failed": False})
        monkeypatch.setattr(kernels, "_state", {"enabled": True})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernels._module() is None
            assert cpu_kernels._module() is None  # said once
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and said[0].count("no compiler here") == 1
        assert ("no working C++ compiler" in said[0]) == (not works)
        assert kernels.fused_enabled() == works
        assert kernels.auto_compile_enabled() == works


def test_tabulated_cfconv_graph_building_paths_agree_with_the_one_pass_kernels():
    """With ``create_graph`` the derivatives come from differentiable Functions (the
    composed ones when the table's gradient is asked for): the same values as the one-pass
    kernels, zero w.r.t. grid coordinates beyond the grid included; and a third derivative
    where only the features require grad."""
    from atomlens.nn.cfconv import cfconv_tabulated

    h, table, grid, a, b = _tabulated_case(torch.float64)
    pair_i, pair_j = torch.cat([a, b]), torch.cat([b, a])
    g = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inputs = tuple(t.requires_grad_(True) for t in (h, table, grid))
    one_pass = torch.autograd.grad(cfconv_tabulated(*inputs, pair_i, pair_j), inputs, g)
    graph = torch.autograd.grad(
        cfconv_tabulated(*inputs, pair_i, pair_j), inputs, g, create_graph=True
    )
    assert graph[2][3] == 0 and graph[2][4] == 0  # beyond the grid's ends
    for x, y in zip(graph, one_pass):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)

    def third(convolution):
        x = h.detach().requires_grad_(True)  # table and grid fixed
        (gh,) = torch.autograd.grad((convolution(x) * g).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad((gh * gh).sum() + x.pow(3).sum(), x, create_graph=True)
        return second

    torch.testing.assert_close(
        third(lambda x: cfconv_tabulated(x, table.detach(), grid.detach(), pair_i, pair_j)),
        third(lambda x: _lookup_then_cfconv(x, table.detach(), grid.detach(), a, b)),
    )


def _stacked_filter_weights(model):
    nets = [block.filter_network for block in model.representation.interactions]
    return [
        torch.stack([net[layer].weight if kind == "w" else net[layer].bias for net in nets])
        .detach()
        .requires_grad_(True)
        for layer, kind in ((0, "w"), (0, "b"), (2, "w"), (2, "b"))
    ]


def _grid_terms(rep, dtype):
    n = math.ceil(rep.cutoff / rep.filter_spacing - 1e-9)
    grid = torch.linspace(0.0, rep.cutoff, n + 1, dtype=dtype)
    e, de = rep.rbf.value_and_derivative(grid)
    fc, dfc = rep.cutoff_fn.value_and_derivative(grid)
    return grid, torch.cat((e, de)), fc, dfc, grid[1] - grid[0]


def _block_table(block, rbf, cutoff_fn, grid):
    """One block's table by the formulas, written out (the reference)."""
    first, _, second = block.filter_network
    n = grid.shape[0]
    e, de = rbf.value_and_derivative(grid)
    a = torch.cat((e, de)) @ first.weight.T
    a_v, a_d = a[:n] + first.bias, a[n:]
    h = torch.nn.functional.softplus(a_v) - math.log(2.0)
    dh = torch.sigmoid(a_v) * a_d
    w = torch.cat((h, dh)) @ second.weight.T
    w_v, w_d = w[:n] + second.bias, w[n:]
    f, df = cutoff_fn.value_and_derivative(grid)
    v, s = w_v * f[:, None], (w_d * f[:, None] + w_v * df[:, None]) * (grid[1] - grid[0])
    v0, v1, s0, s1 = v[:-1], v[1:], s[:-1], s[1:]
    return torch.stack([v0, s0, 3 * (v1 - v0) - 2 * s0 - s1, 2 * (v0 - v1) + s0 + s1], 1)


def test_filter_tables_of_all_blocks_are_each_blocks_table_with_their_gradients():
    """The batched formulas (``plain_filter_tables``) and the C++ loops with oneDNN's products
    (float32) give every block's Hermite table and the weights' gradients as the block's
    own ``filter_table`` does, in float64 and float32; SchNet.filter_tables is them."""
    from atomlens.nn import cpu_kernels
    from atomlens.nn.filter_tables import _FilterTables, filter_tables, plain_filter_tables

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        model = sharp_model(0.01).to(dtype)
        rep = model.representation
        grid, e_de, fc, dfc, spacing = _grid_terms(rep, dtype)
        weights = _stacked_filter_weights(model)
        expected = [_block_table(block, rep.rbf, rep.cutoff_fn, grid) for block in rep.interactions]
        gen = torch.Generator().manual_seed(3)
        probes = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in expected]
        params = [p for block in rep.interactions for p in block.filter_network.parameters()]
        want = torch.autograd.grad(sum((t * g).sum() for t, g in zip(expected, probes)), params)
        want = [torch.stack(want[k::4]) for k in range(4)]  # w1, b1, w2, b2 of every block
        scale = max(float(t.abs().max()) for t in expected)
        paths = {"plain": plain_filter_tables}
        if dtype == torch.float32:
            assert cpu_kernels.available(e_de), "the C++ kernels did not compile"
            paths["fused"] = lambda *a: list(_FilterTables.apply(*a[:3], float(a[3]), *a[4:]))
        for name, fn in paths.items():
            tables = fn(e_de, fc, dfc, spacing, *weights)
            assert [t.shape for t in tables] == [t.shape for t in expected], name
            for got, exp in zip(tables, expected):
                assert (got - exp).abs().max() <= tol * scale, name
            got = torch.autograd.grad(sum((t * p).sum() for t, p in zip(tables, probes)), weights)
            for g, w in zip(got, want):
                assert (g - w).abs().max() <= tol * 10 * max(float(w.abs().max()), 1.0), name
        with torch.no_grad():
            for got, exp, block in zip(rep.filter_tables(), expected, rep.interactions):
                assert (got - exp).abs().max() <= tol * scale
                one = block.filter_table(rep.rbf, rep.cutoff_fn, grid)
                assert (one - exp).abs().max() <= tol * scale
        if dtype == torch.float32:  # the dispatcher picks the Function for float32 CPU
            out = filter_tables(e_de, fc, dfc, spacing, *weights)
            assert all(type(t.grad_fn).__name__ == "_FilterTablesBackward" for t in out)


def test_filter_tables_second_derivatives_and_frozen_weights():
    """Through the C++ path a backward pass that builds a graph gives the batched formulas'
    second derivatives (gradient of a gradient norm); weights that do not require grad get
    none and the others' gradients do not change."""
    from atomlens.nn.filter_tables import filter_tables, plain_filter_tables

    model = sharp_model(0.01).float()
    _, e_de, fc, dfc, spacing = _grid_terms(model.representation, torch.float32)
    weights = _stacked_filter_weights(model)
    assert e_de.dtype == weights[0].dtype == torch.float32
    out = filter_tables(e_de, fc, dfc, spacing, *weights)
    assert type(out[0].grad_fn).__name__ == "_FilterTablesBackward", "not the C++ path"
    gen = torch.Generator().manual_seed(4)
    probe = [
        torch.randn(t.shape, generator=gen) for t in filter_tables(e_de, fc, dfc, spacing, *weights)
    ]

    def probed(tables):
        return sum((t * p).sum() for t, p in zip(tables, probe))

    results = []
    for fn in (filter_tables, plain_filter_tables):
        first = torch.autograd.grad(
            probed(fn(e_de, fc, dfc, spacing, *weights)), weights, create_graph=True
        )
        second = torch.autograd.grad(
            sum(g.pow(2).sum() for g in first), weights, allow_unused=True
        )  # b2's first derivative does not depend on the weights
        results.append([torch.zeros_like(w) if g is None else g for g, w in zip(second, weights)])
    assert float(results[1][0].abs().max()) > 0
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    frozen = [weights[0].detach(), weights[1], weights[2].detach(), weights[3]]
    tables = filter_tables(e_de, fc, dfc, spacing, *frozen)
    got = torch.autograd.grad(probed(tables), [frozen[1], frozen[3]])
    want = torch.autograd.grad(
        probed(plain_filter_tables(e_de, fc, dfc, spacing, *weights)), [weights[1], weights[3]]
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("onednn", [False, True])
def test_filter_tables_function_at_the_end_nodes_on_both_products(onednn, monkeypatch):
    """The C++ Function against the batched formulas with a cutoff whose value and
    derivative are random at every node (the end nodes too, where the real cutoff vanishes),
    every subset of weights requiring grad, and the products on oneDNN (threshold 0: the
    strided per-block views of the real 128/6 case) or PyTorch's."""
    from atomlens.nn import cpu_kernels
    from atomlens.nn import linear as onednn_linear
    from atomlens.nn.filter_tables import _FilterTables, plain_filter_tables

    if onednn:
        monkeypatch.setattr(onednn_linear, "ONEDNN_MIN_WORK", 0)
    gen = torch.Generator().manual_seed(5)
    n_blocks, width, n_rbf, m = 3, 16, 5, 9
    e_de = torch.randn(2 * m, n_rbf, generator=gen)
    fc, dfc = torch.randn(m, generator=gen), torch.randn(m, generator=gen)
    weights = [
        torch.randn(shape, generator=gen)
        for shape in (
            (n_blocks, width, n_rbf),
            (n_blocks, width),
            (n_blocks, width, width),
            (n_blocks, width),
        )
    ]
    assert cpu_kernels.available(e_de), "the C++ kernels did not compile"
    probes = [torch.randn(m - 1, 4, width, generator=gen) for _ in range(n_blocks)]
    for mask in range(1, 16):
        leaves = [w.clone().requires_grad_(bool(mask >> k & 1)) for k, w in enumerate(weights)]
        wanted = [w for w in leaves if w.requires_grad]
        got = _FilterTables.apply(e_de, fc, dfc, 0.25, *leaves)
        want = plain_filter_tables(e_de, fc, dfc, 0.25, *leaves)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
        grads = torch.autograd.grad(sum((g * p).sum() for g, p in zip(got, probes)), wanted)
        expected = torch.autograd.grad(sum((w * p).sum() for w, p in zip(want, probes)), wanted)
        for g, w in zip(grads, expected):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def test_filter_tables_carry_forward_mode_tangents_and_batched_gradients():
    """Weights with forward-mode tangents take the PyTorch formulas (the C++ Function has no
    forward-mode rule): the tables' tangent is the directional derivative. Batched output
    gradients (``is_grads_batched``) go through the Function's backward as PyTorch's
    formulas: each row is the gradient of that row."""
    from torch.autograd import forward_ad

    from atomlens.nn.filter_tables import filter_tables

    model = sharp_model(0.01).float()
    _, e_de, fc, dfc, spacing = _grid_terms(model.representation, torch.float32)
    weights = [w.detach() for w in _stacked_filter_weights(model)]
    direction = torch.randn(weights[2].shape, generator=torch.Generator().manual_seed(6))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(weights[2], direction)
        tables = filter_tables(e_de, fc, dfc, spacing, weights[0], weights[1], dual, weights[3])
        tangents = [forward_ad.unpack_dual(t).tangent for t in tables]
    eps = 1e-2  # the tables are linear in the second layer's weights: exact differences
    shifted = weights[2] + eps * direction
    plus = filter_tables(e_de, fc, dfc, spacing, weights[0], weights[1], shifted, weights[3])
    base = filter_tables(e_de, fc, dfc, spacing, *weights)
    for t, p, b in zip(tangents, plus, base):
        torch.testing.assert_close(t, (p - b) / eps, rtol=1e-3, atol=1e-3 * float(t.abs().max()))
    leaves = [w.requires_grad_(True) for w in weights]
    tables = filter_tables(e_de, fc, dfc, spacing, *leaves)
    assert type(tables[0].grad_fn).__name__ == "_FilterTablesBackward"
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(2, *t.shape, generator=gen) for t in tables]
    batched = torch.autograd.grad(tables, leaves, rows, is_grads_batched=True)
    for r in range(2):
        tables = filter_tables(e_de, fc, dfc, spacing, *leaves)
        single = torch.autograd.grad(tables, leaves, [g[r] for g in rows])
        for b, s1 in zip(batched, single):
            torch.testing.assert_close(b[r], s1, rtol=1e-4, atol=1e-5 * float(s1.abs().max()))
