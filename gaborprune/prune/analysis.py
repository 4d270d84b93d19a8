"""One model analysis per architecture: the traced graph and what is derived from it, built once.

Pruning reads the same facts of a model many times: which BatchNorm follows each convolution, the
channel dataflow (which channels are constant, which are tied by residual additions and
concatenations), the channel groups and residual branches. Each used to be re-derived from
`(model, input_shape)` inside the helper that needed it, so one `prune --scope all` traced the
graph three times. A `ModelAnalysis` traces the model's torch.fx graph once and keeps what depends
only on the architecture; what depends on the weights (the constant channels, the groups' verdicts)
is recomputed from the kept graph by one forward pass per model state (`dataflow(model)`), for the
model itself or for a copy of it with other weights or masks (a masked copy, a candidate).

It is rebuilt only after surgery: a model whose modules were sliced or replaced (`apply_plan_`)
needs a new analysis (`dataflow` refuses a model of another architecture).
"""

from __future__ import annotations

from functools import cached_property

import torch.fx as fx
from torch import nn

from gaborprune.prune.dataflow import ChannelGraph, trace_channels, trace_graph
from gaborprune.strength import following_norms


def _architecture(model: nn.Module) -> tuple:
    """What a traced graph depends on: every module's name, type and channel counts."""
    return tuple((n, type(m).__name__, getattr(m, "in_channels", getattr(m, "num_features", None)), getattr(m, "out_channels", None))
                 for n, m in model.named_modules())


class ModelAnalysis:
    """The analyses of `model` (inputs [N, *input_shape]), each derived on first use and kept.

    Never mutates `model`."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self.model, self.input_shape = model, tuple(input_shape)
        self._architecture = _architecture(model)
        self._groups: dict[tuple[str, int], object] = {}

    def same_architecture(self, model: nn.Module) -> bool:
        """Whether `model` has this analysis's architecture (a copy with other weights or masks)."""
        return model is self.model or _architecture(model) == self._architecture

    @cached_property
    def graph(self) -> fx.Graph | Exception:
        """The model's torch.fx graph (the one trace), or the exception tracing raised."""
        try:
            return trace_graph(self.model)
        except Exception as e:  # tracing user code can fail in many ways; each user says what that costs
            return e

    @cached_property
    def norms(self) -> dict[str, str]:
        """{Gabor bank: the BatchNorm2d that directly consumes its output} (`following_norms`)."""
        return following_norms(self.model, self.input_shape)

    def dataflow(self, model: nn.Module | None = None) -> ChannelGraph:
        """The channel dataflow of `model` (default: the analysed model; else a copy of it with other
        weights), from the kept graph and one forward pass. Raises what tracing raised."""
        model = self.model if model is None else model
        if not self.same_architecture(model):
            raise ValueError("the model's modules changed since it was analysed; make a new ModelAnalysis after surgery")
        if isinstance(self.graph, Exception):
            raise self.graph
        return trace_channels(model, self.input_shape, graph=self.graph)

    def groups(self, scope: str = "banks", model: nn.Module | None = None):
        """The channel groups (`gaborprune.prune.groups.channel_groups`) of `model` (default: the
        analysed model, whose groups are kept per scope)."""
        from gaborprune.prune.groups import channel_groups

        if model is not None and model is not self.model:
            return channel_groups(model, self.input_shape, scope, analysis=self)
        if scope not in self._groups:
            self._groups[scope] = channel_groups(self.model, self.input_shape, scope, analysis=self)
        return self._groups[scope]
