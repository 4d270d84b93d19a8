"""Which dead output channels can be removed exactly: a channel analysis on the model's torch.fx graph.

An output channel of a Gabor bank is *dead* when all its kernels are removed. It still emits a
constant (its bias, then BatchNorm's shift, then the activation), and residual additions and
concatenations tie it to channels of other layers. Removing it is exact only when

- every tensor tied to it (through BatchNorm, activations, pooling, additions, concatenation,
  depthwise convolutions, flattening) holds a constant in that channel; a tie to a live channel keeps
  it;
- every layer that reads it sees 0, or can absorb the constant: a convolution without zero padding
  or a linear layer, into its bias or into the BatchNorm right after it. A zero-padded convolution
  sees the constant inside and 0 at the borders: that cannot be folded, so the channel is kept;
- nothing else reads it (the model's output, an operation this analysis does not know).

Which channels are constant is decided structurally (masks, padding, the op), never from sample
outputs; the constants' values are read from one eval-mode run. Anything the analysis does not
recognise keeps the channel, with the reason.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.summary import alive_kernels

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.BatchNorm2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.elu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout,
    F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_SUBTRACT = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MULTIPLY = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
# f(x + d) == f(x) + d for a per-channel constant d: a shift passes through these to an absorber
_SHIFT_MODULES = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)
_SHIFT_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, "contiguous", "clone", "mean"}
_SHAPE_ONLY_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class KeptChannel:
    """A dead output channel of a Gabor bank that stays (its kernels stay masked), and why."""

    layer: str
    channel: int
    reason: str


@dataclass(frozen=True)
class Fold:
    """`module.<attr> += delta`: where a removed channel's constant contribution goes."""

    module: str
    attr: str  # "bias" (a consumer's), "running_mean" (a BatchNorm's) or "bias_map" (deploy only: see analyse_channels)
    delta: Tensor  # Tensor[C] (bias_map: Tensor[C, H, W])


@dataclass
class ChannelAnalysis:
    remove: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # module -> {"out": [...], "in": [...]}
    folds: list[Fold] = field(default_factory=list)
    kept: list[KeptChannel] = field(default_factory=list)
    note: str | None = None  # why no channel could be analysed at all


@dataclass(frozen=True)
class _Role:
    """What a graph node does to channels (dim 1 of its output)."""

    kind: str  # aligned | cat | flatten | depthwise | conv | linear | input | opaque
    inputs: tuple = ()  # tensor input nodes (cat: (node, offset) pairs)
    hw: int = 1  # flatten: spatial positions per channel
    zero_only: bool = False  # aligned: keeps only constants equal to 0 (zero-padded average pooling)
    shift: bool = False  # aligned: f(x + d) == f(x) + d for a per-channel constant d
    why: str = ""  # opaque: what the analysis does not know


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GaborConv2d) or super().is_leaf_module(m, qualname)


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping each tensor node's shape and its values at the first position."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Tensor] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, Tensor) and out.dim() >= 2:
            self.shapes[n] = tuple(out.shape)
            self.values[n] = out[0].reshape(out.shape[1], -1)[:, 0].detach().double().clone()  # before any in-place op
        return out


def _zero_padded(conv: nn.Module) -> bool:
    """Whether the convolution pads with zeros, so a constant input does not stay constant."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _trace(model: nn.Module, input_shape: tuple[int, int, int]) -> _Recorder:
    """The model's fx graph, run once in eval mode on random inputs [2, *input_shape]."""
    recorder = _Recorder(fx.GraphModule(model, _Tracer().trace(model)))
    param = next(model.parameters(), None)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            recorder.run(x.to(param.device, param.dtype) if param is not None else x)
    finally:
        model.train(was_training)
    return recorder


class _Graph:
    def __init__(self, model: nn.Module, run: _Recorder, bias_maps: bool = False) -> None:
        self.bias_maps = bias_maps
        self.modules = dict(model.named_modules())
        self.gm = run.module
        self.values, self.shapes = run.values, run.shapes
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.roles = {n: self._role(n) for n in self.gm.graph.nodes}
        self.const: dict[fx.Node, set[int]] = {}
        for n in self.gm.graph.nodes:
            self.const[n] = self._const(n)

    # -- roles -----------------------------------------------------------------------------------
    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.shapes]

    def _role(self, n: fx.Node) -> _Role:
        if n.op == "placeholder":
            return _Role("input")
        if n not in self.shapes:
            return _Role("opaque", why="not a feature map")
        shape = self.shapes[n]
        ins = self._tensor_inputs(n)
        if n.op == "call_module":
            m = self.modules[n.target]
            has_params = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
            if has_params and self.calls[n.target] > 1:
                return _Role("opaque", why="a module called more than once")
            if isinstance(m, (nn.Conv2d, GaborConv2d)):
                if m.groups == 1:
                    return _Role("conv", tuple(ins))
                if m.groups == m.in_channels == m.out_channels:
                    return _Role("depthwise", tuple(ins))
                return _Role("opaque", why=f"a grouped convolution ({m.groups} groups)")
            if isinstance(m, nn.Linear):
                return _Role("linear", tuple(ins))
            if isinstance(m, nn.AvgPool2d):
                zero_only = m.count_include_pad and m.padding not in (0, (0, 0))
                return _Role("aligned", tuple(ins), zero_only=zero_only, shift=not zero_only)
            if isinstance(m, nn.PReLU) and m.num_parameters == 1 or isinstance(m, _ELEMENTWISE_MODULES):
                return _Role("aligned", tuple(ins), shift=isinstance(m, _SHIFT_MODULES))
            if isinstance(m, nn.Flatten):
                return self._flatten(n, ins)
            return _Role("opaque", why=f"a {type(m).__name__}")
        if n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS or n.op == "call_method" and n.target in _ELEMENTWISE_METHODS:
            return _Role("aligned", tuple(ins[:1]), shift=n.target in _SHIFT_FUNCTIONS)
        if n.op == "call_function" and n.target is F.avg_pool2d:
            padding = n.args[3] if len(n.args) > 3 else n.kwargs.get("padding", 0)
            zero_only = padding not in (0, (0, 0))
            return _Role("aligned", tuple(ins[:1]), zero_only=zero_only, shift=not zero_only)
        if n.op == "call_function" and n.target in _BINARY or n.op == "call_method" and n.target in _BINARY_METHODS:
            if all(len(self.shapes[a]) == len(shape) and self.shapes[a][1] == shape[1] for a in ins):
                return _Role("aligned", tuple(ins), shift=n.target not in _MULTIPLY)
            return _Role("opaque", why="a broadcast across channels")
        if n.target in (torch.cat, torch.concat) or n.op == "call_method" and n.target == "mean":
            return self._cat_or_mean(n, ins, shape)
        if n.target in (torch.flatten, "flatten", "view", "reshape"):
            return self._flatten(n, ins)
        return _Role("opaque", why=f"'{n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}'")

    def _cat_or_mean(self, n: fx.Node, ins: list[fx.Node], shape: tuple[int, ...]) -> _Role:
        if n.target == "mean":  # x.mean((2, 3)): pooling, if the channel dimension survives
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = len(self.shapes[ins[0]])
            if dims and all(d % rank >= 2 for d in dims):
                return _Role("aligned", tuple(ins[:1]), shift=True)
            return _Role("opaque", why="a mean over channels")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if dim % len(shape) != 1:
            return _Role("opaque", why="a concatenation not over channels")
        pieces, offset = [], 0
        for a in n.args[0]:
            pieces.append((a, offset))
            offset += self.shapes[a][1]
        return _Role("cat", tuple(pieces))

    def _flatten(self, n: fx.Node, ins: list[fx.Node]) -> _Role:
        src = self.shapes[ins[0]]
        if self.shapes[n] == src:  # flattening [N, C] or [N, C, 1]-like shapes that are already flat
            return _Role("aligned", tuple(ins[:1]), shift=True)
        if len(src) == 4 and self.shapes[n] == (src[0], src[1] * src[2] * src[3]):
            return _Role("flatten", tuple(ins[:1]), hw=src[2] * src[3])
        return _Role("opaque", why="a reshape that is not a flatten to [N, C*H*W]")

    # -- constant channels -----------------------------------------------------------------------
    def _const(self, n: fx.Node) -> set[int]:
        """Channels of n's output that are structurally constant over positions and inputs."""
        role = self.roles[n]
        if role.kind == "aligned":
            common = set.intersection(*(self.const[a] for a in role.inputs)) if role.inputs else set()
            if role.zero_only:
                common = {i for i in common if self.values[role.inputs[0]][i] == 0}
            return common
        if role.kind == "cat":
            return {i + off for a, off in role.inputs for i in self.const[a]}
        if role.kind == "flatten":
            return {c * role.hw + s for c in self.const[role.inputs[0]] for s in range(role.hw)}
        if role.kind in ("conv", "depthwise"):
            return self._conv_const(n, role.inputs[0])
        return set()

    def _conv_const(self, n: fx.Node, src: fx.Node) -> set[int]:
        """Output o is constant when each input of its group is unused (kernel removed) or constant
        and either 0 or not disturbed by zero padding."""
        conv = self.modules[n.target]
        alive = alive_kernels(conv).cpu()  # [O, I / groups]
        padded = _zero_padded(conv)
        usable = torch.tensor([i in self.const[src] and (not padded or self.values[src][i] == 0) for i in range(conv.in_channels)])
        per_group = conv.out_channels // conv.groups
        usable = usable.view(conv.groups, -1).repeat_interleave(per_group, dim=0)  # [O, I / groups]
        return {int(o) for o in torch.nonzero((~alive | usable).all(dim=1)).flatten()}

    # -- components ------------------------------------------------------------------------------
    def component(self, start: tuple[fx.Node, int]) -> tuple[set, list, list[str]]:
        """Every (node, channel) tied to `start`, the (consumer, channel) pairs reading them, and
        the reasons (if any) that the component cannot be removed."""
        seen, queue, consumers, reasons = {start}, [start], [], []

        def visit(pos):
            if pos not in seen:
                seen.add(pos)
                queue.append(pos)

        live = []
        while queue:
            n, i = queue.pop()
            role = self.roles[n]
            if i not in self.const[n]:
                live.append((role.kind != "conv", _name(n), i))
            if role.kind in ("aligned", "depthwise"):
                for a in role.inputs:
                    visit((a, i))
            elif role.kind == "cat":
                a, off = max((p for p in role.inputs if p[1] <= i), key=lambda p: p[1])
                visit((a, i - off))
            elif role.kind == "flatten":
                visit((role.inputs[0], i // role.hw))
            elif role.kind == "input":
                reasons.append("part of the model's input")
            elif role.kind != "conv":
                reasons.append(f"produced by '{_name(n)}', {role.why}")
            for u in n.users:
                urole = self.roles[u]
                if u.op == "output":
                    reasons.append(f"part of the model's output (through '{_name(n)}')")
                elif u.op == "call_method" and u.target in _SHAPE_ONLY_METHODS:
                    continue
                elif urole.kind in ("aligned", "depthwise"):
                    visit((u, i))
                elif urole.kind == "cat":
                    for a, off in urole.inputs:
                        if a is n:
                            visit((u, i + off))
                elif urole.kind == "flatten":
                    for f in range(i * urole.hw, (i + 1) * urole.hw):
                        visit((u, f))
                elif urole.kind in ("conv", "linear"):
                    consumers.append((u, n, i))
                else:
                    reasons.append(f"read by '{_name(u)}', {urole.why}")
        if live:  # name a live convolution channel if there is one: that is what the user can look up
            _, name, _ = min(live)
            reasons.insert(0, f"tied to a live channel of '{name}' (through an addition, product, concatenation or depthwise convolution)")
        return seen, consumers, reasons

    def fold(self, consumer: fx.Node, src: fx.Node, i: int) -> list[Fold] | str:
        """How to keep `consumer`'s output unchanged when channel i of `src`, a constant, stops
        reaching it: folds (none when the constant is 0), or the reason it cannot be done exactly."""
        c = float(self.values[src][i])
        if c == 0:
            return []
        m = self.modules[consumer.target]
        if isinstance(m, nn.Linear):
            delta = c * m.weight.detach()[:, i].double()
        elif _zero_padded(m) and self.bias_maps:  # what the constant plane adds, border effects included
            plane = torch.zeros(1, *self.shapes[src][1:], dtype=torch.float64, device=self.values[src].device)
            plane[0, i] = c
            delta = F.conv2d(plane, m.weight.detach().double(), None, m.stride, m.padding, m.dilation)[0]
            return [Fold(consumer.target, "bias_map", delta)]
        elif _zero_padded(m):
            return (f"it feeds a non-zero constant into '{consumer.target}', a zero-padded convolution "
                    "that sees it inside and 0 at the borders, so it cannot be folded")
        else:
            delta = c * m.weight.detach()[:, i].double().sum(dim=(1, 2))
        if m.bias is not None:
            return [Fold(consumer.target, "bias", delta)]
        folds = self.absorb(consumer, delta)
        if folds is None:
            return (f"it feeds a non-zero constant into '{consumer.target}', which has no bias, and no BatchNorm "
                    "or biased layer reached through shift-preserving ops can absorb it")
        return folds

    def absorb(self, node: fx.Node, delta: Tensor) -> list[Fold] | None:
        """Folds that add `delta` (Tensor[C], per channel) back to `node`'s output wherever it is read:
        into a BatchNorm's running mean, or the bias of a linear layer or unpadded convolution, through
        ops that commute with a per-channel shift (pooling, addition, concatenation, flattening).
        None when some reader cannot take it exactly."""
        folds: list[Fold] = []
        for u in node.users:
            role = self.roles[u]
            m = self.modules.get(u.target) if u.op == "call_module" else None
            if u.op == "call_method" and u.target in _SHAPE_ONLY_METHODS:
                continue
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats and role.kind == "aligned":
                folds.append(Fold(u.target, "running_mean", -delta))  # BN(y - d) with mean - d == BN(y)
            elif role.kind == "linear" and m.bias is not None:
                folds.append(Fold(u.target, "bias", m.weight.detach().double() @ delta))
            elif role.kind == "conv" and m.bias is not None and not _zero_padded(m):
                folds.append(Fold(u.target, "bias", m.weight.detach().double().sum(dim=(2, 3)) @ delta))
            elif role.kind == "aligned" and role.shift:
                sign = sum(1 if k == 0 or u.target not in _SUBTRACT else -1 for k, a in enumerate(u.args) if a is node)
                more = self.absorb(u, sign * delta) if sign else None  # 0: passed by keyword, or x - x
                if more is None:
                    return None
                folds += more
            elif role.kind in ("cat", "flatten"):
                if role.kind == "cat":
                    spread = torch.zeros(self.shapes[u][1], dtype=delta.dtype, device=delta.device)
                    for a, off in role.inputs:
                        if a is node:
                            spread[off:off + len(delta)] += delta
                else:
                    spread = delta.repeat_interleave(role.hw)
                more = self.absorb(u, spread)
                if more is None:
                    return None
                folds += more
            else:
                return None
        return folds


def analyse_channels(model: nn.Module, input_shape: tuple[int, int, int], *, bias_maps: bool = False) -> ChannelAnalysis:
    """Which dead output channels of the Gabor banks can be removed, and how (see the module doc).

    Args:
        bias_maps: deploy mode, for one fixed input size: the dead channels of every convolution
            (all-zero rows) are candidates, and a constant entering a zero-padded convolution is
            folded as a "bias_map" Fold, the exact [C, H, W] map it adds to that convolution's output.

    Never mutates `model`. Returns the module slices, the constant folds, and the dead channels kept.
    """
    kinds = (nn.Conv2d, GaborConv2d) if bias_maps else GaborConv2d
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    dead = {n: [int(o) for o in torch.nonzero(~alive_kernels(m).any(dim=1)).flatten()] for n, m in layers.items()}
    if not any(dead.values()):
        return ChannelAnalysis()
    try:
        run = _trace(model, input_shape)
    except Exception as e:  # tracing user code can fail in many ways; the masks still hold
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        kept = [KeptChannel(n, o, "the model's graph could not be traced") for n, os in dead.items() for o in os]
        return ChannelAnalysis(kept=kept, note=f"torch.fx could not trace the model ({detail}); dead channels stay, masked")

    graph = _Graph(model, run, bias_maps)
    nodes = {n.target: n for n in graph.gm.graph.nodes if n.op == "call_module"}
    analysis = ChannelAnalysis()
    remove: dict[str, dict[str, set[int]]] = defaultdict(lambda: {"out": set(), "in": set()})
    done: set = set()
    for layer, channels in dead.items():
        for o in channels:
            if layer not in nodes:
                analysis.kept.append(KeptChannel(layer, o, "the layer is not called in the forward pass"))
                continue
            start = (nodes[layer], o)
            if start in done:
                continue
            positions, consumers, reasons = graph.component(start)
            done |= positions
            folds = []
            for u, src, i in consumers:
                f = graph.fold(u, src, i)
                if isinstance(f, str):
                    reasons.append(f)
                else:
                    folds += f
            starts = sorted((_name(n), i) for n, i in positions if n.op == "call_module" and i in dead.get(n.target, ()))
            if reasons:
                analysis.kept += [KeptChannel(name, i, reasons[0]) for name, i in starts]
                continue
            analysis.folds += folds
            for n, i in positions:
                if graph.roles[n].kind == "conv" or n.op == "call_module" and isinstance(graph.modules[n.target], nn.BatchNorm2d):
                    remove[n.target]["out"].add(i)
                elif graph.roles[n].kind == "depthwise":
                    remove[n.target]["out"].add(i)
                    remove[n.target]["in"].add(i)
            for u, src, i in consumers:
                remove[u.target]["in"].add(i)
    order = {name: k for k, name in enumerate(graph.modules)}
    analysis.remove = {m: {k: sorted(v) for k, v in remove[m].items() if v} for m in sorted(remove, key=order.__getitem__)}
    analysis.kept.sort(key=lambda k: (k.layer, k.channel))
    return analysis
