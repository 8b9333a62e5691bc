"""Training: configuration, criteria (classification heads, triplet losses), the loop with
exact resume, and DDP under torchrun."""

from facelab.train.config import TrainConfig
from facelab.train.loop import Trainer, train
from facelab.train.losses import TrainingFailure

__all__ = ["TrainConfig", "Trainer", "TrainingFailure", "train"]
