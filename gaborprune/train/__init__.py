"""Fine-tuning: the loop, its settings, checkpoints, and torchrun support.

Names are imported on first use (the CLI reads `TrainConfig` defaults without importing torch)."""

from __future__ import annotations

from gaborprune._lazy import lazy_getattr

_EXPORTS = {
    "Checkpoints": "gaborprune.train.checkpoint",
    "FinetuneStep": "gaborprune.train.config",
    "TrainConfig": "gaborprune.train.config",
    "TrainingError": "gaborprune.errors",
    "EvalResult": "gaborprune.train.loop",
    "StepInfo": "gaborprune.train.loop",
    "TrainResult": "gaborprune.train.loop",
    "evaluate": "gaborprune.train.loop",
    "finetune_": "gaborprune.train.loop",
    "Pressure": "gaborprune.train.pressure",
    "PressureReport": "gaborprune.train.pressure",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
