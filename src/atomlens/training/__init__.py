"""Training: configuration and presets, the Lightning task, orchestration and evaluation."""

from .config import PRESETS, TrainConfig, load_config, preset
from .evaluate import evaluate, predict_dataset
from .train import train

__all__ = [
           "PRESETS",
           "TrainConfig",
           "evaluate",
           "load_config",
           "predict_dataset",
           "preset",
           "train",
]
