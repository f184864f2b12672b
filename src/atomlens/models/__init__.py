"""Models: SchNet and DTNN representations, the atomistic model around them, save/load;
inference over packed datasets in :mod:`.inference`."""

from .dtnn import DTNN
from .io import load_model, save_model
from .potential import AtomisticModel, ModelConfig, build_model
from .schnet import SchNet

__all__ = [
    "DTNN",
    "AtomisticModel",
    "ModelConfig",
    "SchNet",
    "build_model",
    "load_model",
    "save_model",
]
