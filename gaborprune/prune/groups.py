"""Channel groups: the sets of Gabor kernels whose joint death removes a channel.

They come from the prune step's channel dataflow (`gaborprune.prune.dataflow`). A channel goes
together with everything tied to it, a *component*; the convolutions that write a component
(producers) and those that read it (readers) bound it. Each component gives at most two groups:

- an **out** group, when every producer is a Gabor bank: the rows (output channels) of all of them,
  so a residual addition or a concatenation that ties channels of several banks makes one group
  across those banks. When they die the component holds a constant, which goes as `analyse_channels`
  decides: readers that see it as 0, or fold it into a bias. A zero-padded reader (or depthwise
  convolution on the way) takes only 0, for instance a BatchNorm shift <= 0 before a ReLU; the
  group's `note` says so;
- an **in** group, when every reader is a Gabor bank: the columns (input channels) of all of them.
  When they die nothing reads the component, and it goes, the producers' rows with it.

A component that a plain convolution or a linear layer writes (for out) or reads (for in), or that
touches the model's input or output or an op the analysis does not know, gives no group on that
side; `GroupAnalysis.missing` says why. Groups are structural: they do not depend on the weights or
masks, so the analysis runs once, at the start of training.

With `scope="all"` plain convolutions count like banks: an out group may have plain producers, each
followed directly by a BatchNorm (its gain is what the pressure measures, and zeroing that channel
of the BatchNorm, gain and shift, makes the channel exactly 0), and an in group may have plain
(ungrouped) convolution readers. A linear reader still gives no in group; its columns go with the
out group. Every plain convolution of the model then gets its sides analysed, not only the banks.
`GroupAnalysis.branches` names the out groups that are the inside of a residual branch (one
reader, whose output is added to the stream): when all of one label go, the branch goes whole.

Each group also records the work its channel's removal drops (`ChannelGroup.saves`): the rows of
every convolution that writes the channel, the columns of every convolution or linear layer that
reads it, and the channel of every depthwise convolution on the way, plain layers included. The out
and in groups of one component save the same work. `GroupAnalysis.saved_macs` counts it densely
(what a dense runtime kernel executes); `gaborprune.export.costs` times it.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import GaborPruneError
from gaborprune.prune.dataflow import ChannelGraph, Component, direct_norms, node_name, trace_channels, zero_padded
from gaborprune.scopes import SCOPES

_TIE = "(through an addition, product, concatenation or depthwise convolution)"


@dataclass(frozen=True)
class ChannelGroup:
    """Gabor kernels whose joint death removes one channel (see the module doc).

    Attributes:
        kind: "out" (rows of the banks that write the channel) or "in" (columns of those that read it).
        members: ((bank, ((o, i), ...)), ...): the kernels, per bank in model order.
        note: a condition on the dead channel's constant, "" when none.
        saves: ((layer, side, index), ...): the work the channel's removal drops (see the module doc);
            side is "out" (a row), "in" (a column or a linear layer's input feature) or "depthwise".
        unit: the component's number: the out and in group of one channel share it.
        padded: an "out" group whose channel a zero-padded depthwise convolution carries: its
            constant cannot be folded (a padded reader's can, exactly away from the borders), so
            scope "all" zeroes the writers' BatchNorm shifts with their gains
            (`gaborprune.prune.structured.zero_units_`).
    """

    kind: str
    members: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    note: str = ""
    saves: tuple[tuple[str, str, int], ...] = field(default=(), compare=False)
    unit: int = field(default=-1, compare=False)
    padded: bool = field(default=False, compare=False)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.members)

    @property
    def label(self) -> str:
        """What `GaborSparsity` counts groups by, e.g. 'conv1 out', 'g1+g2 out', 'conv2 in'."""
        return f"{'+'.join(self.layers)} {self.kind}"

    @property
    def channel(self) -> int:
        """The first bank's row (out) or column (in)."""
        o, i = self.members[0][1][0]
        return o if self.kind == "out" else i


@dataclass(frozen=True)
class NoGroup:
    """Channels of one side of a Gabor bank that are in no group, and why."""

    layer: str
    side: str  # out | in
    channels: tuple[int, ...]
    reason: str

    def describe(self) -> str:
        return f"{self.layer} {self.side} ({len(self.channels)} channel{'s' if len(self.channels) != 1 else ''}): {self.reason}"


@dataclass
class GroupAnalysis:
    groups: list[ChannelGroup] = field(default_factory=list)
    missing: list[NoGroup] = field(default_factory=list)
    note: str | None = None  # why no channel could be analysed at all
    unit_macs: dict[tuple[str, str], int] = field(default_factory=dict)  # (layer, side) -> MACs per image of one row/column/channel
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # layer -> (input, output) per image
    norms: dict[str, str] = field(default_factory=dict)  # convolution -> the BatchNorm that directly reads it
    branches: list[str] = field(default_factory=list)  # out-group labels that are the inside of a residual branch

    def saved_macs(self) -> list[int]:
        """The MACs per image that removing each group (in `groups` order) drops, counted densely."""
        return [sum(self.unit_macs[(layer, side)] for layer, side, _ in g.saves) for g in self.groups]

    def counts(self) -> dict[str, int]:
        """{label: number of groups}, in the order the groups were found."""
        counts: dict[str, int] = {}
        for g in self.groups:
            counts[g.label] = counts.get(g.label, 0) + 1
        return counts

    def reasons(self) -> list[str]:
        """One line per bank side without groups (and the note), for reports."""
        return ([self.note] if self.note else []) + [m.describe() for m in self.missing]


def unit_macs(module: nn.Module, side: str, output: tuple[int, ...]) -> int:
    """MACs per image of one row ("out"), column ("in", for a linear layer one input feature) or
    channel ("depthwise") of a convolution or linear layer whose output per image is `output`."""
    if isinstance(module, nn.Linear):
        rows = math.prod(output[:-1])
        return rows * (module.in_features if side == "out" else module.out_features)
    taps = math.prod(module.kernel_size) * math.prod(output[1:])
    if side == "depthwise":
        return taps
    return taps * (module.in_channels if side == "out" else module.out_channels) // module.groups


def _kind(module: nn.Module) -> str:
    return "linear layer" if isinstance(module, nn.Linear) else "plain convolution"


class _Verdicts:
    """The out and in verdicts of each component, each worked out once."""

    def __init__(self, graph: ChannelGraph, banks: list[str], norms: dict[str, str] | None = None) -> None:
        self.graph, self.order = graph, {n: k for k, n in enumerate(banks)}
        self.norms = norms  # scope "all": plain convolutions with a BatchNorm count as banks; None: banks only
        self.seen: dict[tuple[fx.Node, int], int] = {}
        self.verdicts: list[dict[str, ChannelGroup | str]] = []
        self.unit_macs: dict[tuple[str, str], int] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def of(self, start: tuple[fx.Node, int]) -> dict[str, ChannelGroup | str]:
        if start not in self.seen:
            comp = self.graph.component(start)
            for pos in comp.positions:
                self.seen[pos] = len(self.verdicts)
            unit = len(self.verdicts)
            self.verdicts.append({"out": self._out(comp, unit), "in": self._in(comp, unit)})
        return self.verdicts[self.seen[start]]

    def _saves(self, comp: Component) -> tuple[tuple[str, str, int], ...]:
        g = self.graph
        work = [(n, "out" if g.roles[n].kind == "conv" else "depthwise", i) for n, i in comp.positions if g.roles[n].kind in ("conv", "depthwise")]
        work += [(u, "in", i) for u, _, i in comp.readers]
        for n, side, _ in work:
            if (n.target, side) not in self.unit_macs:
                self.unit_macs[(n.target, side)] = unit_macs(g.modules[n.target], side, g.shapes[n][1:])
                self.shapes[n.target] = (g.shapes[g.roles[n].inputs[0]][1:], g.shapes[n][1:])
        return tuple((n.target, side, i) for n, side, i in sorted(set(work), key=lambda w: (g.order[w[0]], w[1], w[2])))

    def _members(self, pairs: dict[str, set[tuple[int, int]]]) -> tuple:
        return tuple((n, tuple(sorted(pairs[n]))) for n in sorted(pairs, key=self.order.__getitem__))

    def _pressable(self, node: fx.Node, side: str) -> bool:
        """Whether the pressure can reach this convolution's side: a bank, or with scope "all" a plain
        convolution (as a producer, one that a BatchNorm directly reads)."""
        m = self.graph.modules[node.target]
        if isinstance(m, GaborConv2d):
            return True
        return self.norms is not None and isinstance(m, nn.Conv2d) and (side == "in" or node.target in self.norms)

    def _out(self, comp: Component, unit: int) -> ChannelGroup | str:
        g = self.graph
        if comp.reasons:
            return comp.reasons[0]
        producers = sorted(((n, i) for n, i in comp.positions if g.roles[n].kind == "conv"), key=lambda p: (g.order[p[0]], p[1]))
        plain = [n for n, _ in producers if not self._pressable(n, "out")]
        if plain:
            if self.norms is not None and isinstance(g.modules[plain[0].target], nn.Conv2d):
                return f"tied to output channels of plain convolution '{node_name(plain[0])}', which no BatchNorm directly follows {_TIE}"
            return f"tied to output channels of {_kind(g.modules[plain[0].target])} '{node_name(plain[0])}' {_TIE}"
        rows: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for n, o in producers:
            rows[n.target] |= {(o, i) for i in range(g.modules[n.target].in_channels)}
        # a zero-padded reader, or depthwise convolution on the way, sees a non-zero constant unevenly
        padded = {u for u, _, _ in comp.readers if g.roles[u].kind == "conv"} | {n for n, _ in comp.positions if g.roles[n].kind == "depthwise"}
        padded = sorted((n for n in padded if zero_padded(g.modules[n.target])), key=g.order.__getitem__)
        note = (f"the dead channel goes only when its constant is 0 at zero-padded '{node_name(padded[0])}' "
                "(e.g. a BatchNorm shift <= 0 before a ReLU)") if padded else ""
        if self.norms is not None and all(n.target in self.norms for n, _ in producers):
            note = ""  # scope "all" zeroes the producers' BatchNorm gains (and shifts before a padded depthwise convolution)
        # a constant through a zero-padded depthwise convolution cannot be folded even away from the borders
        depthwise = any(g.roles[n].kind == "depthwise" for n in padded)
        return ChannelGroup("out", self._members(rows), note, self._saves(comp), unit, padded=depthwise)

    def _in(self, comp: Component, unit: int) -> ChannelGroup | str:
        g = self.graph
        if comp.reasons:
            return comp.reasons[0]
        readers = sorted({(u, i) for u, _, i in comp.readers}, key=lambda r: (g.order[r[0]], r[1]))
        plain = [u for u, _ in readers if g.roles[u].kind != "conv" or not self._pressable(u, "in")]
        if plain:
            return f"also read by {_kind(g.modules[plain[0].target])} '{node_name(plain[0])}'"
        cols: dict[str, set[tuple[int, int]]] = defaultdict(set)
        for u, i in readers:
            cols[u.target] |= {(o, i) for o in range(g.modules[u.target].out_channels)}
        return ChannelGroup("in", self._members(cols), saves=self._saves(comp), unit=unit)


def channel_groups(model: nn.Module, input_shape: tuple[int, int, int], scope: str = "banks", analysis=None) -> GroupAnalysis:
    """The channel groups of the model's Gabor banks (`scope="banks"`) or of all its ungrouped
    convolutions (`scope="all"`, see the module doc), and the sides that have none (with why).

    Never mutates `model`. A model whose graph torch.fx cannot trace has no groups (`note` says why).
    `analysis`: a `ModelAnalysis` of `model`'s architecture, whose traced graph is reused.
    """
    if scope not in SCOPES:
        raise GaborPruneError(f"unknown scope '{scope}'; known: {', '.join(SCOPES)}")
    kinds = GaborConv2d if scope == "banks" else (GaborConv2d, nn.Conv2d)
    banks = [n for n, m in model.named_modules() if isinstance(m, kinds) and (m.groups == 1 or isinstance(m, GaborConv2d))]
    if not banks:
        return GroupAnalysis()
    try:
        graph = analysis.dataflow(model) if analysis is not None else trace_channels(model, input_shape)
    except Exception as e:  # tracing user code can fail in many ways; the kernel pressure still works
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return GroupAnalysis(note=f"torch.fx could not trace the model ({detail}); no channel groups, only the kernel pressure")
    nodes = {n.target: n for n in graph.gm.graph.nodes if n.op == "call_module"}
    norms = direct_norms(graph)
    verdicts = _Verdicts(graph, banks, norms if scope == "all" else None)
    analysis = GroupAnalysis(norms=norms)
    found: dict[int, ChannelGroup] = {}  # id() -> group, each group once
    for name in banks:
        m = graph.modules[name]
        node = nodes.get(name)
        role = graph.roles[node] if node is not None else None
        sides = {"out": m.out_channels, "in": m.in_channels}
        if node is None or role.kind != "conv":
            reason = ("the layer is not called in the forward pass" if node is None else
                      "a depthwise bank: each channel has one kernel, which the kernel term covers" if role.kind == "depthwise" else role.why)
            analysis.missing += [NoGroup(name, side, tuple(range(size)), reason) for side, size in sides.items()]
            continue
        for side, size in sides.items():
            why: dict[str, list[int]] = defaultdict(list)
            for c in range(size):
                verdict = verdicts.of((node, c) if side == "out" else (role.inputs[0], c))[side]
                if isinstance(verdict, str):
                    why[verdict].append(c)
                else:
                    found.setdefault(id(verdict), verdict)
            analysis.missing += [NoGroup(name, side, tuple(cs), reason) for reason, cs in why.items()]
    analysis.groups = list(found.values())
    analysis.unit_macs, analysis.shapes = verdicts.unit_macs, verdicts.shapes
    if scope == "all":
        analysis.branches = _branches(graph, nodes, norms, analysis.groups)
    return analysis


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _branches(graph: ChannelGraph, nodes: dict, norms: dict[str, str], groups: list[ChannelGroup]) -> list[str]:
    """The out-group labels whose channels are the inside of a residual branch: read by one
    convolution only, whose output (through its direct BatchNorm) goes only into an addition with
    a tensor of the full shape. When all of them go, the branch is a constant added to the stream."""
    readers: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        if g.kind == "out":
            readers[g.label] |= {layer for layer, side, _ in g.saves if side == "in"}
    inside = []
    for label, names in readers.items():
        if len(names) != 1:
            continue
        (reader,) = names
        end = nodes.get(norms.get(reader, reader))
        if end is None or graph.roles[nodes[reader]].kind != "conv" or len(end.users) != 1:
            continue
        (add,) = end.users
        others = [a for a in add.all_input_nodes if a is not end]
        if add.target in _ADD and len(others) == 1 and graph.shapes.get(others[0]) == graph.shapes.get(end):
            inside.append(label)
    return inside
