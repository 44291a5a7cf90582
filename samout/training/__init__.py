"""Training: `TrainConfig`, the learning-rate schedule, checkpoints and the `Trainer` loop."""

from samout.training.config import TrainConfig, load_config_file
from samout.training.setup import train
from samout.training.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_config_file", "train"]
