"""atomlens: deep learning for quantum chemistry that you can look inside.

SchNet and DTNN models of molecular energies, forces and properties; chemical insight from
trained models (atomic energies, local chemical potentials, rings, isomers); and
PatternNet / PatternAttribution explanations for PyTorch networks.

Units inside atomlens: eV, Angstrom, eV/Angstrom.
"""

from ._version import __version__
from .models import AtomisticModel, ModelConfig, build_model, load_model, save_model
from .runtime import tune_allocator

tune_allocator()  # keep freed memory in the process: see atomlens.runtime

__all__ = [
    "AtomisticModel",
    "ModelConfig",
    "__version__",
    "build_model",
    "load_model",
    "save_model",
]


def __getattr__(name):
    if name == "Calculator":  # the ASE calculator pulls in ASE; import on first use
        from .calculator import Calculator

        return Calculator
    raise AttributeError(f"module 'atomlens' has no attribute {name!r}")
