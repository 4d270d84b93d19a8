"""The arithmetic that compensates for a removed channel: its constant, which a reader saw, is added
back where that reader's output goes (its bias, a BatchNorm's running mean further on, or in deploy
mode a bias map), so that the reader computes what it did."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune.prune.dataflow import SHAPE_ONLY_METHODS, SUBTRACT, ChannelGraph, zero_padded


@dataclass(frozen=True)
class Fold:
    """`module.<attr> += delta`: where a removed channel's constant contribution goes."""

    module: str
    attr: str  # "bias" (a consumer's), "running_mean" (a BatchNorm's) or "bias_map" (deploy only: see analyse_channels)
    delta: Tensor  # Tensor[C] (bias_map: Tensor[C, H, W])


def fold(graph: ChannelGraph, consumer: fx.Node, src: fx.Node, i: int, *, bias_maps: bool = False, interior: bool = False) -> list[Fold] | str:
    """How to keep `consumer`'s output unchanged when channel i of `src`, a constant, stops
    reaching it: folds (none when the constant adds nothing), or the reason it cannot be done exactly.

    `interior`: a zero-padded convolution is folded as if unpadded, exact away from its borders (what
    `prune --scope all` accepts when it removes a channel; see `gaborprune.prune.structured`)."""
    c = float(graph.values[src][i])
    if c == 0:
        return []
    m = graph.modules[consumer.target]
    if isinstance(m, nn.Linear):
        delta = c * m.weight.detach()[:, i].double()
    elif zero_padded(m) and bias_maps:  # what the constant plane adds, border effects included
        plane = torch.zeros(1, *graph.shapes[src][1:], dtype=torch.float64, device=graph.values[src].device)
        plane[0, i] = c
        delta = F.conv2d(plane, m.weight.detach().double(), None, m.stride, m.padding, m.dilation)[0]
        return [Fold(consumer.target, "bias_map", delta)] if delta.any() else []  # a zero map would cost an Add, for nothing
    elif zero_padded(m) and not interior:
        return (f"it feeds a non-zero constant into '{consumer.target}', a zero-padded convolution "
                "that sees it inside and 0 at the borders, so it cannot be folded")
    else:
        delta = c * m.weight.detach()[:, i].double().sum(dim=(1, 2))
    if not delta.any():  # the reader's weights cancel the constant: nothing to compensate
        return []
    if m.bias is not None:
        return [Fold(consumer.target, "bias", delta)]
    folds = absorb(graph, consumer, delta)
    if folds is None:
        return (f"it feeds a non-zero constant into '{consumer.target}', which has no bias, and no BatchNorm "
                "or biased layer reached through shift-preserving ops can absorb it")
    return folds


def absorb(graph: ChannelGraph, node: fx.Node, delta: Tensor) -> list[Fold] | None:
    """Folds that add `delta` (Tensor[C], per channel) back to `node`'s output wherever it is read:
    into a BatchNorm's running mean, or the bias of a linear layer or unpadded convolution, through
    ops that commute with a per-channel shift (pooling, addition, concatenation, flattening).
    None when some reader cannot take it exactly."""
    folds: list[Fold] = []
    for u in node.users:
        role = graph.roles[u]
        m = graph.modules.get(u.target) if u.op == "call_module" else None
        if u.op == "call_method" and u.target in SHAPE_ONLY_METHODS or role.kind == "constant":
            continue
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and role.kind == "aligned":
            folds.append(Fold(u.target, "running_mean", -delta))  # BN(y - d) with mean - d == BN(y), act(BN(..)) too
        elif role.kind == "linear" and m.bias is not None:
            folds.append(Fold(u.target, "bias", m.weight.detach().double() @ delta))
        elif role.kind == "conv" and m.bias is not None and not zero_padded(m):
            folds.append(Fold(u.target, "bias", m.weight.detach().double().sum(dim=(2, 3)) @ delta))
        elif role.kind == "aligned" and role.shift:
            sign = sum(1 if k == 0 or u.target not in SUBTRACT else -1 for k, a in enumerate(u.args) if a is node)
            more = absorb(graph, u, sign * delta) if sign else None  # 0: passed by keyword, or x - x
            if more is None:
                return None
            folds += more
        elif role.kind in ("cat", "flatten"):
            if role.kind == "cat":
                spread = torch.zeros(graph.shapes[u][1], dtype=delta.dtype, device=delta.device)
                for a, off in role.inputs:
                    if a is node:
                        spread[off:off + len(delta)] += delta
            else:
                spread = delta.repeat_interleave(role.hw)
            more = absorb(graph, u, spread)
            if more is None:
                return None
            folds += more
        else:
            return None
    return folds
