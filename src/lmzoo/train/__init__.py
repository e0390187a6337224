"""Training: the shared trainer, its config, optimizers, schedules and metrics."""

from .config import TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
