"""Fine-tuning: the loop, its settings, checkpoints, and torchrun support."""

from gaborprune.train.checkpoint import Checkpoints
from gaborprune.train.config import TrainConfig
from gaborprune.train.loop import EvalResult, StepInfo, TrainingError, TrainResult, evaluate, finetune

__all__ = ["Checkpoints", "EvalResult", "StepInfo", "TrainConfig", "TrainResult", "TrainingError", "evaluate", "finetune"]
