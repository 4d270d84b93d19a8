"""The time each channel group's removal saves, from a per-layer cost table measured with ONNX Runtime.

`finetune --latency-aware` weighs the channel groups of the sparsity pressure (`gaborprune.sparsity`)
by this saving instead of by MACs. A group's channel, once removed, drops rows, columns or depthwise
channels of several layers (`ChannelGroup.saves`). Each such (layer, side) is exported alone, as a
one-layer model at its real input shape, and timed with ONNX Runtime at its full count n and at
n // 2 (1 thread, the batch asked), the two sessions interleaved run by run. The time of one unit
(row, column or channel) is taken as linear in between:

    ms_per_unit = (t(n) - t(n // 2)) / (n - n // 2)

so a group saves the sum of its units' times. MLAS works in channel blocks, so the true curve is a
staircase; the linear slope is its average over the half that pruning can reach.

When the halved layer is not faster beyond the noise (the 95% interval of the per-run ratio holds 1,
`gaborprune.export.stats.faster`), its slope is not measured: the unit gets its MACs times the
ms per MAC of the sides that were measured (all MACs when none was), and the table says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from gaborprune.export.stats import faster

WARMUP, RUNS = 20, 200  # one layer alone runs in tens of microseconds: 200 interleaved runs take well under a second


@dataclass
class CostTable:
    """Per (layer, side), ONNX Runtime milliseconds at two unit counts, and the time of one unit.

    Attributes:
        ms: {"conv2 in": {16: 0.061, 8: 0.034}}: median ms per run of the layer alone at that count.
        ms_per_unit: {"conv2 in": 0.0034}: what one unit's removal saves (see the module doc).
        from_macs: the sides whose halving saved no time beyond the noise, priced from MACs.
    """

    batch: int
    threads: int
    ms: dict[str, dict[int, float]] = field(default_factory=dict)
    ms_per_unit: dict[str, float] = field(default_factory=dict)
    from_macs: list[str] = field(default_factory=list)

    def saved_ms(self, analysis) -> list[float]:
        """Milliseconds that removing each group of `analysis` (a `GroupAnalysis`) saves, in its order."""
        return [sum(self.ms_per_unit[f"{layer} {side}"] for layer, side, _ in g.saves) for g in analysis.groups]

    def to_dict(self) -> dict:
        return {"batch": self.batch, "threads": self.threads, "ms": {k: {str(c): t for c, t in v.items()} for k, v in self.ms.items()},
                "ms_per_unit": self.ms_per_unit, "from_macs": self.from_macs}


def describe(table: dict) -> str:
    """One line for a `CostTable.to_dict()`: 'latency cost table (batch 1, 1 thread): conv1 out 16ch 0.041 / 8ch 0.025 ms, ...'."""
    sides = ", ".join(f"{k} " + " / ".join(f"{c}ch {t:.3f}" for c, t in v.items()) + " ms" for k, v in table["ms"].items())
    if len(table["ms"]) > 8:  # --scope all: a side per layer; the JSON has them all
        times = [t for v in table["ms"].values() for t in v.values()]
        sides = f"{len(table['ms'])} layer sides timed, {min(times):.3f}-{max(times):.3f} ms (the JSON's cost_table lists them)"
    line = f"latency cost table (batch {table['batch']}, {table['threads']} thread{'s' if table['threads'] != 1 else ''}): {sides or 'nothing to time'}"
    if table["from_macs"]:
        line += f"; within the noise, priced from MACs: {', '.join(table['from_macs'])}"
    return line


def units(module: nn.Module, side: str) -> int:
    """How many rows ("out"), columns or input features ("in") or channels ("depthwise") `module` has."""
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    return module.out_channels if side == "out" else module.in_channels


def one_layer(module: nn.Module, side: str, count: int) -> nn.Module:
    """A fresh layer like `module` (a convolution, Gabor bank or linear layer) with `count` units on `side`.
    Convolutions get a bias: the deployed ones carry their folded BatchNorm."""
    if isinstance(module, nn.Linear):
        return nn.Linear(count if side == "in" else module.in_features, count if side == "out" else module.out_features)
    i = count if side in ("in", "depthwise") else module.in_channels
    o = count if side in ("out", "depthwise") else module.out_channels
    return nn.Conv2d(i, o, module.kernel_size, module.stride, module.padding, module.dilation, count if side == "depthwise" else 1,
                     bias=True, padding_mode=module.padding_mode)


def input_shape(module: nn.Module, side: str, count: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-image input `shape` of `module` with `count` units on `side` (the channel or feature axis)."""
    if side == "out":
        return shape
    axis = len(shape) - 1 if isinstance(module, nn.Linear) else 0
    return shape[:axis] + (count,) + shape[axis + 1:]


def time_pair(what: str, layers: tuple[nn.Module, nn.Module], shapes: tuple[tuple[int, ...], tuple[int, ...]],
              threads: int) -> tuple[list[float], list[float]]:
    """Milliseconds per run of two one-layer models (inputs of `shapes`, batch included), interleaved
    run by run (ONNX Runtime, `threads` intra-op threads). `what` names the pair, for tests that
    inject timings."""
    from gaborprune.export.onnx import to_onnx
    from gaborprune.export.runtime import run, session

    sessions = [session(to_onnx(nn.Sequential(layer), shape).SerializeToString(), threads) for layer, shape in zip(layers, shapes)]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    for sess, x in zip(sessions, inputs):
        for _ in range(WARMUP):
            run(sess, x)
    # runtime.time_interleaved feeds one input to all; the two layers here take different ones
    ms: list[list[float]] = [[], []]
    for r in range(RUNS):
        for k in (r % 2, 1 - r % 2):
            t0 = time.perf_counter()
            run(sessions[k], inputs[k])
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return ms[0], ms[1]


def measure(model: nn.Module, analysis, batch: int = 1, threads: int = 1) -> CostTable:
    """The cost table of every (layer, side) that a group of `analysis` (a `GroupAnalysis` of `model`)
    saves work in (see the module doc). Uses only the layers' shapes, never their weights."""
    modules = dict(model.named_modules())
    table = CostTable(batch, threads)
    sides = dict.fromkeys((layer, side) for g in analysis.groups for layer, side, _ in g.saves)
    for layer, side in sides:
        key, module = f"{layer} {side}", modules[layer]
        n = units(module, side)
        h = n // 2
        if h == 0:  # a single unit: its removal drops the whole layer
            full, _ = time_pair(key, (one_layer(module, side, n),) * 2, ((batch,) + analysis.shapes[layer][0],) * 2, threads)
            table.ms[key] = {n: float(np.median(full)), 0: 0.0}
            table.ms_per_unit[key] = table.ms[key][n]
            continue
        layers = (one_layer(module, side, n), one_layer(module, side, h))
        shapes = tuple((batch,) + input_shape(module, side, c, analysis.shapes[layer][0]) for c in (n, h))
        full, half = time_pair(key, layers, shapes, threads)
        table.ms[key] = {n: float(np.median(full)), h: float(np.median(half))}
        slope = (table.ms[key][n] - table.ms[key][h]) / (n - h)
        if faster(half, full) and slope > 0:
            table.ms_per_unit[key] = slope
        else:
            table.from_macs.append(key)
    if table.from_macs:
        macs = {f"{layer} {side}": m for (layer, side), m in analysis.unit_macs.items()}
        measured = list(table.ms_per_unit)
        if measured:  # the marginal ms per MAC of the sides that were measured
            rate = sum(table.ms_per_unit[k] for k in measured) / sum(macs[k] for k in measured)
        else:  # none: the average over whole layers, which overstates a unit by the layers' fixed cost
            top = {k: max(counts) for k, counts in table.ms.items()}  # n, the full count
            rate = sum(table.ms[k][n] for k, n in top.items()) / sum(macs[k] * n for k, n in top.items())
        for key in table.from_macs:
            table.ms_per_unit[key] = macs[key] * rate
    return table
