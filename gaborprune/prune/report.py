"""What a prune did, layer by layer and in total (the CLI renders it; `to_dict` is the JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from torch import nn

from gaborprune.convert.layer import GaborConv2d, alive_kernels
from gaborprune.prune.graph import KeptChannel
from gaborprune.prune.plan import PrunePlan, PruneStep
from gaborprune.prune.select import PruneSpec
from gaborprune.prune.standins import ChannelConstant, Dropped
from gaborprune.summary import ModelSummary


@dataclass(frozen=True)
class LayerShape:
    type: str  # gabor | conv | linear
    in_channels: int
    out_channels: int
    kernels: int  # present 2-D kernels (linear: weights)


def layer_shapes(model: nn.Module) -> dict[str, LayerShape]:
    """Channels and present kernels of every convolution and linear layer."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, GaborConv2d)):
            kind = "gabor" if isinstance(m, GaborConv2d) else "conv"
            shapes[name] = LayerShape(kind, m.in_channels, m.out_channels, int(alive_kernels(m).sum()))
        elif isinstance(m, nn.Linear):
            shapes[name] = LayerShape("linear", m.in_features, m.out_features, m.in_features * m.out_features)
        elif isinstance(m, (Dropped, ChannelConstant)) and m.was != "norm":  # a convolution removed whole
            shapes[name] = LayerShape(m.was, m.in_channels, m.out_channels, 0)
    return shapes


@dataclass(frozen=True)
class LayerChange:
    name: str
    type: str
    kernels_before: int
    kernels_after: int
    channels_before: int  # output channels
    channels_after: int
    in_channels_before: int
    in_channels_after: int

    @property
    def removed(self) -> float:
        """Fraction of the layer's kernels removed."""
        return 1 - self.kernels_after / self.kernels_before if self.kernels_before else 0.0


@dataclass
class PruneReport:
    """A prune's outcome.

    `before` counts the model as it came in; `after` the compacted one, whose masked kernels (in
    channels that stay) are skipped in its MACs. `max_abs_diff` is the largest difference between
    the compacted model's output and the masked, uncompacted model's, on random inputs in eval mode.
    """

    spec: PruneSpec
    plan: PrunePlan
    layers: list[LayerChange]
    before: ModelSummary
    after: ModelSummary
    kept: list[KeptChannel]
    max_abs_diff: float
    warnings: list[str] = field(default_factory=list)
    accuracy_before: float | None = None  # top-1 percent, when data is given
    accuracy_pruned: float | None = None  # right after pruning
    accuracy_recalibrated: float | None = None  # after re-estimating BatchNorm statistics, when that ran
    accuracy_after: float | None = None  # final (after recalibration and recovery, when they ran)

    def within(self, module: str, before: ModelSummary, after: ModelSummary) -> PruneReport:
        """This report of a prune of `module` (`PruneSpec.module`) as a report on the whole model,
        whose counts are `before` and `after`: every name made a path in the whole model."""
        full = f"{module}.{{}}".format
        return replace(self, plan=self.plan.within(module), layers=[replace(c, name=full(c.name)) for c in self.layers], before=before, after=after,
                       kept=[replace(k, layer=full(k.layer)) for k in self.kept])

    @property
    def step(self) -> PruneStep:
        """What a recipe records of this prune (`Recipe.with_step`)."""
        return PruneStep(self.plan)

    @property
    def gabor_layers(self) -> list[LayerChange]:
        return [layer for layer in self.layers if layer.type == "gabor"]

    def to_dict(self) -> dict:
        d = {
            "criterion": self.spec.to_dict(),
            "layers": [asdict(layer) for layer in self.layers],
            "params_before": self.before.params, "params_after": self.after.params,
            "macs_before": self.before.macs, "macs_after": self.after.macs,
            "flops_before": self.before.flops, "flops_after": self.after.flops,
            "kept_channels": [asdict(k) for k in self.kept],
            "max_abs_diff": self.max_abs_diff,
            "warnings": self.warnings,
        }
        for key in ("accuracy_before", "accuracy_pruned", "accuracy_recalibrated", "accuracy_after"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d
