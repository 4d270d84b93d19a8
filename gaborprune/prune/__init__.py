"""Pruning: choose dead Gabor kernels, mask them, cut out the channels that can go exactly."""

from gaborprune.errors import PruneError
from gaborprune.prune.graph import ChannelAnalysis, KeptChannel, analyse_channels
from gaborprune.prune.plan import PrunePlan, PruneStep, apply_plan_, slice_module
from gaborprune.prune.report import LayerChange, PruneReport
from gaborprune.prune.run import SweepPoint, prune_model_, sweep
from gaborprune.prune.select import PruneSpec, select_kernels

__all__ = [
    "ChannelAnalysis", "KeptChannel", "LayerChange", "PruneError", "PrunePlan", "PruneReport", "PruneSpec", "PruneStep",
    "SweepPoint", "analyse_channels", "apply_plan_", "prune_model_", "select_kernels", "slice_module", "sweep",
]
