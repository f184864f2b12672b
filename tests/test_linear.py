"""Dense layers on oneDNN's float32 products (atomlens.nn.linear): the same function and
derivatives (to float32 rounding) as ``F.linear``, used only where it applies, and called
as one operator inside compiled code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ase.build import molecule
from helpers import random_model
from torch import nn

from atomlens.batched_md import BatchedMD
from atomlens.nn import cpu_kernels, kernels
from atomlens.nn import linear as onednn

pytestmark = pytest.mark.skipif(onednn._ONEDNN is None, reason="this torch has no oneDNN")


@pytest.fixture(autouse=True)
def small_products_on_onednn(monkeypatch, request):
    """These tests' products are small: let any product of 128 rows or more use oneDNN
    (except where a test checks the work threshold itself)."""
    if "little work" not in request.node.name:
        monkeypatch.setattr(onednn, "ONEDNN_MIN_WORK", 0)
        monkeypatch.setattr(onednn, "ONEDNN_MIN_WORK_COMPILED", 0)


def _called(function) -> set[str]:
    with torch.profiler.profile() as profile:
        function()
    return {event.key for event in profile.key_averages()}


def _inputs(rows: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 40, generator=generator, dtype=dtype)
    weight = torch.randn(24, 40, generator=generator, dtype=dtype) / 6
    bias = torch.randn(24, generator=generator, dtype=dtype)
    return x, weight, bias


def _derivatives(function, x, weight, bias):
    """Output, first derivatives (x, weight, bias) of a nonlinear loss, and the derivatives
    w.r.t. weight and bias of a loss on the first derivative w.r.t. x (forces' second pass)."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = function(x, weight, bias)
    first = torch.autograd.grad(y.tanh().sum(), (x, weight, bias), create_graph=True)
    second = torch.autograd.grad(first[0].pow(2).sum(), (weight, bias))
    return (y, *first, *second)


def test_onednn_linear_equals_f_linear_with_first_and_second_derivatives():
    x, weight, bias = _inputs(onednn.ONEDNN_MIN_ROWS + 72)
    ours = _derivatives(onednn.linear, x, weight, bias)
    reference = _derivatives(
        F.linear, *(t.double() for t in (x, weight, bias))
    )  # float64: the exact function
    for got, want in zip(ours, reference):
        assert got.dtype == torch.float32
        # float32 sums of 200 products: oneDNN's weight gradient rounds to ~4e-7 of its
        # largest element (MKL's to ~3e-7), above 1e-5 absolute where elements reach ~40
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
    called = _called(lambda: _derivatives(onednn.linear, x, weight, bias))
    assert "mkldnn::_linear_pointwise" in called
    assert "aten::addmm" not in called  # the forward


@pytest.mark.parametrize(
    "shape", [(1792, 128), (1002, 20), (48, 20), (20, 48), (200, 40), (33, 17), (16, 16), (1, 5)]
)
def test_the_tiled_transpose_is_exact_in_its_tiles_and_at_their_edges(shape):
    """The transpose, and with it the column sums (a bias gradient), over whole 16 x 16 tiles
    and the rows and columns past them."""
    x = torch.randn(*shape)
    got = cpu_kernels.transpose(x)
    if got is None:
        pytest.skip("no C++ kernels here")
    assert got.shape == shape[::-1] and got.is_contiguous()
    assert torch.equal(got, x.t().contiguous())
    assert torch.equal(cpu_kernels.transpose(x.t()), x)  # a transposed view: copied
    assert cpu_kernels.transpose(x.double()) is None  # float32 only
    x[:, -1] += 1000.0  # the last column's sum stands out
    both, sums = cpu_kernels.transpose_and_sums(x)
    assert torch.equal(both, x.t().contiguous())
    torch.testing.assert_close(sums, x.double().sum(0).float(), rtol=1e-5, atol=1e-4)
    if not x.t().is_contiguous():
        assert cpu_kernels.transpose_and_sums(x.t()) is None  # row-major input only
    assert cpu_kernels.transpose_and_sums(x.double()) is None


def test_the_weight_gradient_without_the_tiled_transpose_copies_with_pytorch(monkeypatch):
    """No C++ kernels (no compiler): the transposed input is made row-major by PyTorch and
    the gradients are the same (the Python Function: without a compiler there is no C++
    one)."""
    monkeypatch.setattr(onednn, "CPP_FUNCTION", False)
    x, weight, bias = _inputs(300, seed=2)
    grads = []
    for available in (True, False):
        if not available:
            monkeypatch.setattr(cpu_kernels, "transpose", lambda t: None)
            monkeypatch.setattr(cpu_kernels, "transpose_and_sums", lambda t: None)
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        onednn.linear(xr, wr, br).pow(2).sum().backward()
        grads.append((xr.grad, wr.grad, br.grad))
    for with_kernel, without in zip(*grads):
        torch.testing.assert_close(with_kernel, without, rtol=1e-6, atol=1e-5)


def test_the_weight_gradient_transposes_with_the_tiled_kernel_and_needs_no_bias(monkeypatch):
    monkeypatch.setattr(onednn, "CPP_FUNCTION", False)  # the Python Function's hooks
    x, weight, _ = _inputs(300, seed=1)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, weight))
    transposed = []
    kernel = cpu_kernels.transpose
    monkeypatch.setattr(cpu_kernels, "transpose", lambda t: transposed.append(t.shape) or kernel(t))
    onednn.linear(xr, wr).pow(2).sum().backward()
    if cpu_kernels.available(x):  # grad (rows padded or not), the weight gradient's input
        assert [tuple(s) for s in transposed] in ([(300, 24)], [(onednn._bucket(300), 24)])
    xf, wf = (t.detach().clone().double().requires_grad_() for t in (x, weight))
    F.linear(xf, wf).pow(2).sum().backward()
    torch.testing.assert_close(wr.grad.double(), wf.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xr.grad.double(), xf.grad, rtol=1e-5, atol=1e-4)
    strided = torch.randn(600, 40)[::2]  # not a dense layout: copied first
    torch.testing.assert_close(onednn.linear(strided, weight), F.linear(strided, weight))


def test_the_bias_gradient_comes_from_the_weight_gradients_transpose(monkeypatch):
    """With a bias the transpose of ``grad`` also adds up its columns: the bias gradient,
    without PyTorch's sum; rows padded to the bucket size add zeros (the Python Function's
    hooks; the C++ Function's operators: the next test)."""
    monkeypatch.setattr(onednn, "CPP_FUNCTION", False)
    summed, kernel = [], cpu_kernels.transpose_and_sums
    monkeypatch.setattr(
        cpu_kernels, "transpose_and_sums", lambda t: summed.append(t.shape) or kernel(t)
    )
    for rows in (300, 317):  # 304, 320 rows when padded
        x, weight, bias = _inputs(rows, seed=rows)
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        summed.clear()
        upstream = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows))
        called = _called(
            lambda xr=xr, wr=wr, br=br, g=upstream: onednn.linear(xr, wr, br).backward(g)
        )
        if cpu_kernels.available(x):
            # padded to the bucket size, or not where this weight's last call had these rows
            assert [tuple(s) for s in summed] in ([(rows, 24)], [(onednn._bucket(rows), 24)])
            assert "aten::sum" not in called
        xf, wf, bf = (t.detach().clone().double().requires_grad_() for t in (x, weight, bias))
        F.linear(xf, wf, bf).backward(upstream.double())
        for got, want in ((br.grad, bf.grad), (wr.grad, wf.grad), (xr.grad, xf.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def _grads(x, weight, bias, with_bias: bool, need_x: bool):
    """Output and gradients for a random upstream gradient through :func:`onednn.linear`
    (``None`` for what is not asked), and the operators it called."""
    rows = x.shape[0]
    x = x.detach().clone().requires_grad_(need_x)
    weight = weight.detach().requires_grad_()  # the same storage: the same layer
    bias = bias.detach().clone().requires_grad_() if with_bias else None
    upstream = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows + 1))

    def run():
        y = onednn.linear(x, weight, bias)
        y.backward(upstream)
        return y

    out = []
    called = _called(lambda: out.append(run()))
    return (out[0].detach(), x.grad, weight.grad, None if bias is None else bias.grad), called


def _forget_rows():
    """Both Functions' memory of each layer's last row count: the next calls pad."""
    onednn._last_rows.clear()
    cpu_kernels._module().forget_rows()


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_cpp_function_equals_the_python_function_exactly(monkeypatch, with_bias):
    """Eager code's layer is a C++ autograd Function with the Python Function's products,
    paddings and transposes: the same numbers to the last bit, rows padded (300 -> 304,
    317 -> 320, 1794 -> 1808) and, on a second call with the same rows, unpadded; with and
    without the bias, with and without dL/dx; oneDNN's operator and no PyTorch product or
    sum."""
    if not cpu_kernels.available(torch.zeros(1)):
        pytest.skip("no C++ kernels here")
    for rows, need_x in ((300, True), (317, False), (317, True), (1794, True)):
        results = {}
        for cpp in (True, False):
            monkeypatch.setattr(onednn, "CPP_FUNCTION", cpp)
            _forget_rows()
            x, weight, bias = _inputs(rows, seed=rows)
            # the first call pads, the second (the same layer and rows) does not
            results[cpp] = [_grads(x, weight, bias, with_bias, need_x) for _ in range(2)]
        for call in range(2):
            (ours, called), (python, _) = results[True][call], results[False][call]
            for got, want in zip(ours, python):
                if want is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert "mkldnn::_linear_pointwise" in called
            assert not called & {"aten::mm", "aten::addmm", "aten::matmul", "aten::sum"}
            assert not any("_OneDNNLinear" in name for name in called)  # not the Python one
            # padded: the rows copied into the bucket's (aten::copy_); repeated: no copy
            assert ("aten::copy_" in called) == (call == 0)
    reference = _derivatives(F.linear, *(t.double() for t in _inputs(317, seed=3)))
    monkeypatch.setattr(onednn, "CPP_FUNCTION", True)
    ours = _derivatives(onednn.linear, *_inputs(317, seed=3))  # second derivatives: matmul
    for got, want in zip(ours, reference):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)


def test_the_cpp_functions_bias_gradient_alone_equals_the_python_functions(monkeypatch):
    """Asked for the bias gradient alone, the C++ Function still sums the columns as the
    transpose does (PyTorch's sum would round differently)."""
    if not cpu_kernels.available(torch.zeros(1)):
        pytest.skip("no C++ kernels here")
    x, weight, bias = _inputs(304, seed=7)
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    upstream = torch.randn(304, 24, generator=torch.Generator().manual_seed(8))
    got = {}
    for cpp in (True, False):
        monkeypatch.setattr(onednn, "CPP_FUNCTION", cpp)
        _forget_rows()
        (got[cpp],) = torch.autograd.grad(onednn.linear(x, weight, bias), (bias,), upstream)
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=0)


def test_the_cpp_function_takes_batched_gradients():
    """``is_grads_batched`` (vmap over the backward pass): the C++ Function's backward gets
    gradients without storage and takes PyTorch's products, per gradient as F.linear's."""
    x, weight, bias = (t.requires_grad_() for t in _inputs(300, seed=5))
    node = onednn.linear(x, weight, bias).grad_fn.name()
    assert cpu_kernels.available(x) == (node == "torch::autograd::CppNode<OneDNNLinearFunction>")
    upstream = torch.randn(3, 300, 24, generator=torch.Generator().manual_seed(1))
    y = onednn.linear(x, weight, bias)
    got = torch.autograd.grad(y, (x, weight, bias), upstream, is_grads_batched=True)
    want = [torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), u) for u in upstream]
    for k, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([w[k] for w in want]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "case",
    [
        "few rows",
        "little work",
        "float64",
        "fused off",
        "three dimensions",
        "functorch outside compile",
    ],
)
def test_plain_products_where_onednn_does_not_apply(case):
    x, weight, bias = _inputs(onednn.ONEDNN_MIN_ROWS - 1 if case == "few rows" else 400)
    if case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
    if case == "three dimensions":
        x = x.reshape(2, -1, 40)

    def run():
        if case == "functorch outside compile":
            return torch.func.grad(lambda v: onednn.linear(v, weight, bias).sum())(x)
        return onednn.linear(x, weight, bias)

    kernels.set_fused(case != "fused off")
    try:
        called = _called(run)
    finally:
        kernels.set_fused(True)
    assert "mkldnn::_linear_pointwise" not in called


def test_linear_layer_is_an_nn_linear_with_the_same_state():
    plain = nn.Linear(40, 24)
    ours = onednn.Linear(40, 24)
    assert isinstance(ours, nn.Linear)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(onednn.ONEDNN_MIN_ROWS * 2, 40)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    assert "mkldnn::_linear_pointwise" in _called(lambda: ours(x))


def test_compiled_md_step_calls_the_linear_operator_and_matches_eager_float32():
    """Sixteen ethanols (144 atoms, the products' rows) with 64 features: the compiled
    float32 energy-and-forces step runs its products as ``atomlens::linear``, its shifted
    softplus and derivative as the C++ operators, and gives the eager step's forces to
    float32 rounding."""
    from atomlens.nn.activations import MIN_KERNEL_SIZE

    wide = {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 2, "n_rbf": 10, "cutoff": 5.0}
    model = random_model("schnet", seed=2, representation_kwargs=wide)
    assert 144 * 64 >= MIN_KERNEL_SIZE
    systems = [molecule("CH3CH2OH") for _ in range(16)]  # 144 atoms: oneDNN's rows
    for k, atoms in enumerate(systems):
        atoms.rattle(0.05, seed=k)
    eager = BatchedMD(model, systems, seed=3, compile=False, dtype="float32")
    fixed = BatchedMD(model, systems, seed=3, compile=True, dtype="float32")
    called = _called(fixed.energy_and_forces)
    assert "atomlens::linear" in called
    assert {"atomlens::shifted_softplus", "atomlens::shifted_softplus_backward"} <= called
    energies, forces = fixed.energy_and_forces()
    scale = eager.forces.abs().max()
    torch.testing.assert_close(forces, eager.forces, rtol=0, atol=1e-5 * float(scale))
    torch.testing.assert_close(energies, eager.energies, rtol=1e-5, atol=1e-5)


def test_compiled_code_takes_smaller_products_to_onednn_than_eager_code(monkeypatch):
    """Compiled code calls the operator without the autograd Function's overhead, so its
    threshold of work is lower: a 256 x 64 x 64 product (2^20 multiply-adds, like 32
    aspirins' atoms into a head's 64 features) runs on oneDNN there and on MKL eagerly."""
    from atomlens.nn import cpu_kernels

    cpu_kernels.prepare("cpu")
    monkeypatch.undo()  # the thresholds as they are
    x, weight = torch.randn(256, 64), torch.randn(64, 64)
    if not cpu_kernels.compiled_ops_ready(x, weight):
        pytest.skip("the C++ kernels did not compile")
    assert 256 * 64 * 64 >= onednn.ONEDNN_MIN_WORK_COMPILED
    assert 256 * 64 * 64 < onednn.ONEDNN_MIN_WORK
    assert "mkldnn::_linear_pointwise" not in _called(lambda: onednn.linear(x, weight))
    compiled = torch.compile(lambda v: onednn.linear(v, weight), backend="eager", dynamic=False)
    called = _called(lambda: compiled(x))
    assert "atomlens::linear" in called
    torch.testing.assert_close(compiled(x), x @ weight.t(), rtol=1e-5, atol=1e-4)
    narrow = weight[:4]  # 256 x 64 x 4: below the compiled threshold too
    assert 256 * 64 * 4 < onednn.ONEDNN_MIN_WORK_COMPILED
    small = torch.compile(lambda v: onednn.linear(v, narrow), backend="eager", dynamic=False)
    assert "atomlens::linear" not in _called(lambda: small(x))


def test_training_batches_reach_the_layers_padded_once_with_equal_results(monkeypatch):
    """A SchNet in training mode carries a batch's atom features in bucket-sized arrays:
    every dense layer gets the bucket's rows (no padding per layer), and predictions and
    every parameter's gradient equal the per-layer padding's (float32, exactly: oneDNN
    computes the padded rows either way). Eval mode, float64 and PyTorch's products
    (``plain_products``, force training) keep the batch's own rows."""
    import numpy as np

    from atomlens.data import PackedDataset
    from atomlens.models import schnet

    model = random_model("schnet", seed=4).float().train()
    structures = []
    for k in range(20):  # 180 atoms: bucket 192
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=k)
        structures.append((atoms.numbers, atoms.positions))
    data = PackedDataset.from_structures(
        structures, {model.target: np.zeros(20)}, {model.target: "eV"}
    )
    batch = data.batch(np.arange(20), model.cutoff)
    assert batch.n_atoms == 180 and onednn._bucket(180) == 192
    layer = model.representation.interactions[0].in2f
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))

    def run(pad: bool):
        monkeypatch.setattr(schnet, "PAD_TRAINING_BATCHES", pad)
        model.zero_grad()
        energy = model(batch)[model.target]
        (energy * torch.arange(1.0, 21.0)).sum().backward()
        return energy.detach(), [p.grad.clone() for p in model.parameters()]

    padded, unpadded = run(True), run(False)
    assert seen == [192, 180]
    torch.testing.assert_close(padded[0], unpadded[0], rtol=0, atol=0)
    for got, want in zip(padded[1], unpadded[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    seen.clear()
    model.eval()
    model(batch)
    model.train()
    with onednn.plain_products():
        model(batch)
    model.double()
    model(data.batch(np.arange(20), model.cutoff, dtype=torch.float64))
    assert seen == [180, 180, 180]


def test_rows_are_padded_to_few_sizes_and_the_products_stay_exact():
    """oneDNN builds a kernel per shape: a batch's rows (and a weight gradient's long inner
    dimension) are padded to multiples of 16, at most 64 sizes per octave (at most 1.6%
    more from 1,024 rows, 6.25% from 256), with zeros
    that change nothing: values and gradients equal F.linear's, in eager and C++ code."""
    from atomlens.nn import cpu_kernels

    sizes = [onednn._bucket(n) for n in range(1025, 2049)]  # one octave
    assert len(set(sizes)) == 64
    for n in (128, 144, 256, 300, 672, 1000, 1794, 5000):
        assert n <= onednn._bucket(n) <= n * 1.0625 and onednn._bucket(n) % 16 == 0
    for n in (1025, 1794, 2047, 5000, 100_001):
        assert onednn._bucket(n) <= n * 1.016
    assert onednn._bucket(672) == 672 and onednn._bucket(1794) == 1808

    x, weight, bias = _inputs(1794, seed=2)
    ours = _derivatives(onednn.linear, x, weight, bias)  # rows 1794 -> 1808, K of dW too
    reference = _derivatives(F.linear, *(t.double() for t in (x, weight, bias)))
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-4)
    cpu_kernels.prepare("cpu")
    if cpu_kernels.compiled_ops_ready(x):
        for rows in (130, 1794):
            got = torch.ops.atomlens.linear(x[:rows], weight, bias)
            assert got.shape == (rows, 24) and got.is_contiguous()
            torch.testing.assert_close(got, F.linear(x[:rows], weight, bias), rtol=1e-5, atol=1e-5)
        long = torch.randn(24, 1794)  # a weight gradient's shape: K padded as well
        torch.testing.assert_close(
            torch.ops.atomlens.linear(long, x.t(), None), long @ x, rtol=1e-5, atol=2e-4
        )


def test_force_training_uses_pytorchs_products_and_inference_onednns():
    """Force training differentiates the forces again, where PyTorch's products and their C++
    autograd are faster than the oneDNN Function: its forward runs under plain_products.
    Energies and forces for inference (no second pass) use oneDNN."""
    model = random_model("schnet", seed=2).float()
    systems = [molecule("CH3CH2OH") for _ in range(16)]  # 144 atoms
    model.train()
    with torch.profiler.profile(record_shapes=True) as profile:
        model(systems, forces=True)["forces"].pow(2).sum().backward()
    n_grid = round(model.representation.cutoff / model.representation.filter_spacing) + 1
    for event in profile.key_averages(group_by_input_shape=True):
        if event.key == "mkldnn::_linear_pointwise":
            # only the filter tables' products (their grid's 2 x n_grid rows, or the
            # weight gradients' inner dimension), which are differentiated once
            assert 2 * n_grid in {n for shape in event.input_shapes for n in shape}, event
    model.eval()
    assert "mkldnn::_linear_pointwise" in _called(lambda: model(systems, forces=True))
    assert "mkldnn::_linear_pointwise" in _called(lambda: model(systems)["energy"].sum())


def test_filter_tables_of_the_default_grid_run_every_product_on_onednn(monkeypatch):
    """The tables' products have fixed shapes (the grid's 2 x 251 rows at 0.02 Angstrom):
    oneDNN keeps their kernels, so they run there below the eager layers' threshold too
    (502 x 128 x 128 is under ONEDNN_MIN_WORK); none falls back to PyTorch's products."""
    from atomlens.models.schnet import SchNet

    monkeypatch.undo()  # the thresholds as they are
    torch.manual_seed(0)
    rep = SchNet(n_atom_basis=128, n_filters=128, n_interactions=2, cutoff=5.0)
    assert rep.filter_spacing == 0.02
    assert 502 * 128 * 128 < onednn.ONEDNN_MIN_WORK
    called = _called(lambda: sum(t.sum() for t in rep.filter_tables()).backward())
    assert "mkldnn::_linear_pointwise" in called
    assert not called & {"aten::mm", "aten::addmm", "aten::matmul", "aten::bmm"}


def test_backward_of_changing_row_counts_runs_on_onednn_and_stays_exact():
    """Training batches change their rows every step: the backward pass pads the output
    gradient (and, for the weight gradient, whose inner dimension is those rows, the input)
    to the bucket size, so both products reuse oneDNN's kernels; the zero rows change
    nothing."""
    for rows in (300, 317, 333):  # 320, 320, 336 rows: padded
        x, weight, bias = _inputs(rows, seed=rows)
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        called = _called(
            lambda xr=xr, wr=wr, br=br: onednn.linear(xr, wr, br).tanh().sum().backward()
        )
        assert "mkldnn::_linear_pointwise" in called
        assert "aten::mm" not in called and "aten::addmm" not in called
        xf, wf, bf = (t.detach().clone().double().requires_grad_() for t in (x, weight, bias))
        F.linear(xf, wf, bf).tanh().sum().backward()
        for got, want in ((xr.grad, xf.grad), (wr.grad, wf.grad), (br.grad, bf.grad)):
            assert got.shape == want.shape
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
