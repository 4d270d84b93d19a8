"""Which channels can be removed exactly: a channel analysis on the model's torch.fx graph.

Two kinds of channel are candidates (`bias_maps`: of every convolution, not only Gabor banks):

- a *dead output channel*, all of whose kernels are removed. It still emits a constant (its bias,
  then BatchNorm's shift, then the activation);
- the channel that a *dead input column* reads, all of whose kernels are removed: its producer may
  be live, but this reader ignores it.

Residual additions and concatenations tie a channel to channels of other layers
(`gaborprune.prune.dataflow`). A channel goes with everything tied to it (producers lose their
output channels, kernels and all, BatchNorms and depthwise convolutions in between are sliced,
readers lose their input columns) exactly when

- every convolution or linear layer that reads a tied channel ignores it (only zero weights for
  it), or reads a constant it sees as 0 or can absorb: a convolution without zero padding or a
  linear layer, into its bias or into the BatchNorm right after it (`gaborprune.prune.fold`). A
  zero-padded convolution sees the constant inside and 0 at the borders: that cannot be folded, so
  the channel is kept. A reader that uses a channel that is not constant keeps it (a dead channel
  tied to a live one by an addition, a second consumer of an ignored channel);
- nothing else reads it (the model's input or output, an operation this analysis does not know).

Anything the analysis does not recognise keeps the channel, with the reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d, alive_kernels
from gaborprune.prune.dataflow import ChannelGraph, Component, direct_norms, node_name, trace_channels
from gaborprune.prune.fold import Fold, fold

__all__ = ["ChannelAnalysis", "Fold", "KeptChannel", "analyse_channels"]

_TIE = "(through an addition, product, concatenation or depthwise convolution)"


@dataclass(frozen=True)
class KeptChannel:
    """A dead channel that stays, and why: output channel `channel` of `layer` (side "out"), whose
    kernels stay masked, or the channel that `layer`'s dead input column `channel` reads (side "in")."""

    layer: str
    channel: int
    reason: str
    side: str = "out"  # out | in


@dataclass
class ChannelAnalysis:
    remove: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # module -> {"out": [...], "in": [...]}
    folds: list[Fold] = field(default_factory=list)
    constants: dict[str, str | None] = field(default_factory=dict)  # convolution losing every input -> its direct BatchNorm (PrunePlan.constants)
    kept: list[KeptChannel] = field(default_factory=list)
    note: str | None = None  # why no channel could be analysed at all


def _indices(flags: Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(flags).flatten()]


def _verdict(graph: ChannelGraph, comp: Component, dead_out: bool, bias_maps: bool, interior: bool = False) -> tuple[list[Fold], list[str]]:
    """The folds that removing `comp` needs, and the reasons it cannot be removed (none: it can).

    `dead_out`: the component holds a dead output channel, so values that are not constant reach it
    only through a tie."""
    folds, failed, users = [], [], []
    for u, src, i in comp.readers:
        if graph.ignores(u, i):
            continue
        if i not in graph.const[src]:
            users.append(u)
            continue
        f = fold(graph, u, src, i, bias_maps=bias_maps, interior=interior)
        if isinstance(f, str):
            failed.append(f)
        else:
            folds += f
    reasons = comp.reasons + failed
    if users:
        reader = node_name(min(users, key=graph.order.__getitem__))
        if dead_out:  # name a live convolution channel if there is one: that is what the user can look up
            _, name, _ = min((graph.roles[n].kind != "conv", node_name(n), i) for n, i in comp.live)
            reasons.insert(0, f"tied to a live channel of '{name}' {_TIE}, which '{reader}' reads")
        else:
            reasons.insert(0, f"the channel is also read, with non-zero weights, by '{reader}'")
    return folds, reasons


def analyse_channels(model: nn.Module, input_shape: tuple[int, int, int], *, bias_maps: bool = False, plain: bool = False,
                     interior: bool = False, analysis=None) -> ChannelAnalysis:
    """Which channels can be removed, and how (see the module doc).

    Args:
        bias_maps: deploy mode, for one fixed input size: the dead channels and columns of every
            convolution (all-zero rows and columns) are candidates, and a constant entering a
            zero-padded convolution is folded as a "bias_map" Fold, the exact [C, H, W] map it adds
            to that convolution's output.
        plain: the dead channels and columns of plain convolutions are candidates too (`prune
            --scope all`, which zeroes them), not only those of Gabor banks.
        interior: fold a constant entering a zero-padded convolution as if it were unpadded (exact
            away from the borders; `gaborprune.fold.fold`), instead of keeping the channel.
        analysis: a `ModelAnalysis` of `model`'s architecture, whose traced graph is reused.

    A convolution that loses every input channel becomes a constant (`ChannelAnalysis.constants`), a
    module that loses every output channel is dropped (`gaborprune.prune.standins`).

    Never mutates `model`. Returns the module slices, the constant folds, and the dead channels kept.
    """
    kinds = (nn.Conv2d, GaborConv2d) if bias_maps or plain else GaborConv2d
    dead: dict[tuple[str, str], list[int]] = {}  # (layer, "out" | "in") -> channels
    for name, m in model.named_modules():
        if isinstance(m, kinds):
            alive = alive_kernels(m).cpu()  # [O, I / groups]
            dead[name, "out"] = _indices(~alive.any(dim=1))
            if m.groups == 1:  # a depthwise layer's columns are its rows
                dead[name, "in"] = _indices(~alive.any(dim=0))
    if not any(dead.values()):
        return ChannelAnalysis()
    try:
        graph = analysis.dataflow(model) if analysis is not None else trace_channels(model, input_shape)
    except Exception as e:  # tracing user code can fail in many ways; the masks still hold
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        kept = [KeptChannel(n, c, "the model's graph could not be traced", side) for (n, side), cs in dead.items() for c in cs]
        return ChannelAnalysis(kept=kept, note=f"torch.fx could not trace the model ({detail}); dead channels stay, masked")

    nodes = {n.target: n for n in graph.gm.graph.nodes if n.op == "call_module"}
    analysis = ChannelAnalysis()
    remove: dict[str, dict[str, set[int]]] = defaultdict(lambda: {"out": set(), "in": set()})
    done: set[tuple[fx.Node, int]] = set()
    for (layer, side), channels in dead.items():
        node = nodes.get(layer)
        role = graph.roles[node] if node is not None else None
        for c in channels:
            if node is None:
                analysis.kept.append(KeptChannel(layer, c, "the layer is not called in the forward pass", side))
                continue
            if side == "in" and role.kind != "conv":
                analysis.kept.append(KeptChannel(layer, c, f"read by '{layer}', {role.why}", side))
                continue
            start = (node, c) if side == "out" else (role.inputs[0], c)
            if start in done:
                continue
            comp = graph.component(start)
            done |= comp.positions
            starts = {(node_name(n), i, "out") for n, i in comp.positions if n.op == "call_module" and i in dead.get((n.target, "out"), ())}
            starts |= {(u.target, i, "in") for u, _, i in comp.readers if i in dead.get((u.target, "in"), ())}
            folds, reasons = _verdict(graph, comp, any(s == "out" for *_, s in starts), bias_maps, interior)
            if reasons:
                analysis.kept += [KeptChannel(name, i, reasons[0], s) for name, i, s in starts]
                continue
            analysis.folds += folds
            for n, i in comp.positions:
                if graph.roles[n].kind in ("conv", "constant") or n.op == "call_module" and isinstance(graph.modules[n.target], nn.BatchNorm2d):
                    remove[n.target]["out"].add(i)
                elif graph.roles[n].kind == "depthwise":
                    remove[n.target]["out"].add(i)
                    remove[n.target]["in"].add(i)
            for u, _, i in comp.readers:
                remove[u.target]["in"].add(i)
    norms = direct_norms(graph)
    analysis.constants = {n: norms.get(n) for n, sides in remove.items()
                          if isinstance(graph.modules[n], (nn.Conv2d, GaborConv2d)) and len(sides["in"]) == graph.modules[n].in_channels}
    order = {name: k for k, name in enumerate(graph.modules)}
    analysis.remove = {m: {k: sorted(v) for k, v in remove[m].items() if v} for m in sorted(remove, key=order.__getitem__)}
    analysis.kept.sort(key=lambda k: (k.layer, k.side != "out", k.channel))
    return analysis
