"""Fine-tuning: the loop, its settings, checkpoints, and torchrun support.

Names are imported on first use (the CLI reads `TrainConfig` defaults without importing torch)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Checkpoints": "gaborprune.train.checkpoint",
    "TrainConfig": "gaborprune.train.config",
    "EvalResult": "gaborprune.train.loop",
    "StepInfo": "gaborprune.train.loop",
    "TrainResult": "gaborprune.train.loop",
    "TrainingError": "gaborprune.train.loop",
    "evaluate": "gaborprune.train.loop",
    "finetune": "gaborprune.train.loop",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gaborprune.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
