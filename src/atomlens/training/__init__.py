"""Training: configuration and presets, the Lightning task, orchestration and evaluation.

``train_model(config)`` trains one model (the function ``atomlens.training.train.train``).
``atomlens.training.train`` is the module, and calling it trains too (``train(config)``, as
before), so that ``import atomlens.training.train`` and its helpers (``load_dataset``,
``fit_statistics``) stay reachable beside the call.
"""

from ..models.inference import predict_dataset  # its home is the models layer
from . import train
from .config import PRESETS, TrainConfig, load_config, preset
from .ensemble import train_ensemble
from .evaluate import evaluate
from .train import train as train_model

__all__ = [
    "PRESETS",
    "TrainConfig",
    "evaluate",
    "load_config",
    "predict_dataset",
    "preset",
    "train",
    "train_ensemble",
    "train_model",
]
