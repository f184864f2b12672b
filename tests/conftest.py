"""Shared test set-up.

Zennit (a test-only reference for the LRP rules) imports torchvision at import time for
its ResNet canonizers, and PyPI's torchvision does not load beside the pinned CPU torch.
The LRP rules we compare against need none of it, so zennit is imported once here with a
minimal stand-in registered for the import only, then the stand-in is removed again (so
other libraries still see torchvision as absent).
"""

import contextlib
import importlib.util
import os
import sys
import types

import pytest

from atomlens.runtime import prepare_environment, tune_allocator

prepare_environment()  # passive OpenMP waiting, set before torch loads (as the CLI does)
# the calculator compiles small molecules by default (a few seconds each); the tests check the
# compiled path where they ask for it (compile=True) and run everything else eagerly
os.environ.setdefault("ATOMLENS_COMPILE", "0")

import torch

torch.set_num_threads(2)
tune_allocator()  # the test process, like the CLI, keeps freed memory (atomlens.runtime)


def _import_zennit() -> None:
    if importlib.util.find_spec("zennit") is None or "zennit" in sys.modules:
        return
    if importlib.util.find_spec("torchvision") is not None:
        import zennit

        return
    import lightning  # noqa: F401  (settle torchmetrics' optional-import checks first)

    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    class _Absent(torch.nn.Module):
        """Placeholder for torchvision's ResNet blocks (never instantiated in our tests)."""

    resnet.Bottleneck = resnet.BasicBlock = _Absent
    tv.models, models.resnet = models, resnet
    stubs = {"torchvision": tv, "torchvision.models": models, "torchvision.models.resnet": resnet}
    sys.modules.update(stubs)
    try:
        with contextlib.suppress(ImportError):
            import zennit
            import zennit.composites
            import zennit.rules  # noqa: F401
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


_import_zennit()


@pytest.fixture
def one_thread():
    """One torch thread for the test (molecules of a few atoms, MD: one thread is fastest
    and immune to a busy machine); a module takes it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
