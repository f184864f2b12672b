"""The C++ kernels as a processor without AVX-512 runs them.

atomlens builds its kernels for the processor it runs on (``-march=native``). Where that
processor has AVX-512, as the machines that run these tests do, the other tests only ever
run the AVX-512 code: its 64-byte vectors, the pairs in runs of one atom, the by-interval
loops and the 16 x 16 transpose tiles. Many users' processors have AVX2 alone (most laptop
and desktop CPUs), which take other paths through the same source: 32-byte vectors, the
pairs one at a time, no by-interval order, the transpose without tiles. Here the kernels are
built a second time for x86-64-v3 (AVX2 and FMA, no AVX-512), loaded in place of the native
build, and the kernel tests of ``test_tables`` and ``test_linear`` run again through them,
with a SchNet's energies and forces against the native build's.

The second build registers no operators (``ATOMLENS_NO_OPERATORS``): the native build's stay
the operators' CPU kernels, which call the same functions.
"""

import pytest
import test_linear
import test_tables
import torch
from helpers import qm9_sample

from atomlens.nn import cpu_kernels

#: flags the x86-64-v3 build needs from the processor that runs it
V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() == "flags":
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="module")
def avx2_build():
    flags = _cpu_flags()
    if "avx512f" not in flags:
        pytest.skip("no AVX-512 here: the other tests already run the AVX2 (or generic) build")
    if not V3_FLAGS <= flags:
        pytest.skip("this processor cannot run an x86-64-v3 build")
    if not cpu_kernels.available(torch.zeros(1)):
        pytest.skip("no C++ kernels here")
    cpu_kernels._module()  # the native build first: it registers the operators
    module = cpu_kernels._build(
        f"{cpu_kernels._NAME}_x86_64_v3",
        [*cpu_kernels._CFLAGS, "-march=x86-64-v3", "-DATOMLENS_NO_OPERATORS"],
    )
    assert not module.interval_kernels(), "the x86-64-v3 build took the AVX-512 paths"
    return module


@pytest.fixture
def avx2(avx2_build, monkeypatch):
    """The x86-64-v3 build in place of the native one for one test."""
    monkeypatch.setitem(cpu_kernels._state, "module", avx2_build)
    yield avx2_build
    assert cpu_kernels._state["module"] is avx2_build


data = test_tables.data
always_fused = test_tables.always_fused

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cfconv_and_table_scatter(avx2, dtype):
    test_tables.test_cpp_cfconv_kernel_is_the_convolution(dtype)
    test_tables.test_cpp_table_scatter_is_the_lookups_transpose(dtype)


def test_shifted_softplus(avx2):
    test_tables.test_cpp_shifted_softplus_and_its_derivatives()


@pytest.mark.parametrize("width", [13, 77, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tabulated_cfconv_and_its_first_derivatives(avx2, dtype, width):
    test_tables.test_tabulated_cfconv_is_lookup_then_cfconv_with_its_first_derivatives(dtype, width)
    assert (
        cpu_kernels.interval_order(torch.zeros(1), *[torch.zeros(1, dtype=torch.long)] * 2, 1, 1)
        is None
    )


@pytest.mark.parametrize("width", [13, 77])
def test_tabulated_cfconv_of_a_nan_distance(avx2, width):
    test_tables.test_tabulated_cfconv_nan_distance_gives_nan_on_its_atoms_only(width)


def test_tabulated_cfconv_higher_derivatives(avx2):
    test_tables.test_tabulated_cfconv_derivatives_of_every_order()
    test_tables.test_force_training_second_pass_of_the_tabulated_cfconv()


def test_filter_tables(avx2):
    test_tables.test_filter_tables_of_all_blocks_are_each_blocks_table_with_their_gradients()
    test_tables.test_filter_tables_second_derivatives_and_frozen_weights()


def test_force_training_step(avx2, data, always_fused):
    test_tables.test_force_training_step_is_the_same_fused_or_plain(data, always_fused)


@pytest.mark.parametrize(
    "shape", [(1792, 128), (1002, 20), (48, 20), (20, 48), (33, 17), (16, 16), (1, 5)]
)
def test_transpose(avx2, shape):
    test_linear.test_the_tiled_transpose_is_exact_in_its_tiles_and_at_their_edges(shape)


def test_linear_function(avx2, monkeypatch):
    monkeypatch.setattr(test_linear.onednn, "ONEDNN_MIN_WORK", 0)  # as test_linear's products
    for with_bias in (True, False):
        test_linear.test_the_cpp_function_equals_the_python_function_exactly(monkeypatch, with_bias)


def test_schnet_energies_and_forces_as_the_native_build(avx2_build, monkeypatch):
    """A SchNet with sharp filters on QM9 molecules, float32 and float64: energies and
    forces through the x86-64-v3 build equal the native build's to the float rounding."""
    source = qm9_sample()
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.float64, 1e-11)):
        model = test_tables.sharp_model(0.02).to(dtype).eval()
        batch = source.batch(range(12), 5.0, dtype)
        results = {}
        for name in ("native", "avx2"):
            module = cpu_kernels._module() if name == "native" else avx2_build
            monkeypatch.setitem(cpu_kernels._state, "module", module)
            out = model(batch, forces=True)
            results[name] = (out["energy"].detach(), out["forces"].detach())
        assert results["native"][1].abs().max() > 0
        for got, want in zip(results["avx2"], results["native"]):
            scale = max(1.0, float(want.abs().max()))
            assert float((got - want).abs().max()) <= tolerance * scale
