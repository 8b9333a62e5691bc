"""Training: configuration, the loop, and checkpoint/resume."""

from facelab.train.config import TrainConfig
from facelab.train.loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
