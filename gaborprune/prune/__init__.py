"""Pruning: choose dead Gabor kernels, mask them, cut out the channels that can go exactly."""

from gaborprune.prune.graph import ChannelAnalysis, KeptChannel, analyse_channels
from gaborprune.prune.plan import PrunePlan, apply_plan_, slice_module
from gaborprune.prune.report import LayerChange, PruneReport
from gaborprune.prune.run import SweepPoint, prune_model, sweep
from gaborprune.prune.select import PruneError, PruneSpec, select_kernels
from gaborprune.prune.target import TargetCandidate, TargetReport, TargetSpec, prune_to_target

__all__ = [
    "ChannelAnalysis", "KeptChannel", "LayerChange", "PruneError", "PrunePlan", "PruneReport", "PruneSpec",
    "SweepPoint", "TargetCandidate", "TargetReport", "TargetSpec", "analyse_channels", "apply_plan_", "prune_model",
    "prune_to_target", "select_kernels", "slice_module", "sweep",
]
