"""atomlens: deep learning for quantum chemistry that you can look inside.

SchNet and DTNN models of molecular energies, forces and properties; chemical insight from
trained models (atomic energies, local chemical potentials, rings, isomers); and
PatternNet / PatternAttribution explanations for PyTorch networks.

Units inside atomlens: eV, Angstrom, eV/Angstrom.

Importing atomlens changes no process-wide setting; :func:`atomlens.runtime.configure` sets
threads, OpenMP wait policy and allocator (the ``atomlens`` command calls it). The names
below are imported on first use, so ``import atomlens.runtime`` does not load torch.
"""

from ._version import __version__

__all__ = [
    "AtomisticModel",
    "Calculator",
    "EnsembleCalculator",
    "ModelConfig",
    "__version__",
    "build_model",
    "load_model",
    "save_model",
]

# imported on first use: `import atomlens` (and `atomlens --help`) must not pay for torch
_LAZY = {
    "AtomisticModel": "models",
    "ModelConfig": "models",
    "build_model": "models",
    "load_model": "models",
    "save_model": "models",
    "Calculator": "calculator",
    "EnsembleCalculator": "ensemble",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'atomlens' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
