"""The channel dataflow of a model's torch.fx graph: what each op does to channels, which channels
are constant, which are tied together, and who reads them.

A *position* is (node, channel): one channel of one tensor of the graph. Positions are *tied* when
one cannot go without the others: the input and output channel of an elementwise op, BatchNorm
(or a subclass that only adds element-wise steps, such as timm's BatchNormAct2d with its
activation: `norm_steps`), pooling or depthwise convolution; the operands of an addition or product; a piece of a
concatenation and its place in the result; a channel and its features after flattening. A
*component* is a closed set of tied positions. Convolutions and linear layers bound it: those that
write it (producers, which would lose output channels) and those that read it (readers, which
would lose input columns).

A channel is *constant* when it holds the same value at every position for every input; a reader
*ignores* a channel when all its weights for it are zero (masked or removed kernels). Both are
decided structurally (masks, weights, padding, the op), never from sample outputs; the constants'
values are read from one eval-mode run. What removing a channel costs the readers that do see it is
`gaborprune.prune.fold`'s business; whether a component goes, `gaborprune.prune.graph`'s.
"""

from __future__ import annotations

import inspect
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d, alive_kernels
from gaborprune.prune.standins import ChannelConstant, Dropped

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
SUBTRACT = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MULTIPLY = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
# f(x + d) == f(x) + d for a per-channel constant d: a shift passes through these to an absorber
_SHIFT_MODULES = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)
_SHIFT_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, "contiguous", "clone", "mean"}
SHAPE_ONLY_METHODS = {"size", "dim"}
# what a BatchNorm2d subclass may do after its batch norm: element-wise on each value (no pooling)
_POINTWISE_MODULES = tuple(t for t in _ELEMENTWISE_MODULES if not issubclass(t, (nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)))
_POINTWISE_FUNCTIONS = _ELEMENTWISE_FUNCTIONS - {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_POINTWISE_METHODS = _ELEMENTWISE_METHODS
#: timm's own element-wise activation modules (timm.layers.activations and activations_me), by name,
#: so that the analysis does not import timm. Most are traced through like any module; inside a
#: BatchNormAct2d (its `act`) they are leaves that the analysis must recognise.
_TIMM_ACTIVATIONS = {"Swish", "SwishMe", "Mish", "MishMe", "Sigmoid", "Tanh", "HardSwish", "HardSwishMe", "HardSigmoid",
                     "HardSigmoidMe", "HardMish", "HardMishMe", "GELU", "GELUTanh", "QuickGELU"}
# a BatchNorm subclass's forward may also check its input (timm's _assert(x.ndim == 4, ...))
_CHECKS = {getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, torch._assert}


@dataclass(frozen=True)
class Role:
    """What a graph node does to channels (dim 1 of its output)."""

    kind: str  # aligned | cat | flatten | depthwise | conv | linear | constant | input | opaque
    inputs: tuple = ()  # tensor input nodes (cat: (node, offset) pairs)
    hw: int = 1  # flatten: spatial positions per channel
    zero_only: bool = False  # aligned: keeps only constants equal to 0 (zero-padded average pooling)
    shift: bool = False  # aligned: f(x + d) == f(x) + d for a per-channel constant d
    why: str = ""  # opaque: what the analysis does not know


@dataclass
class Component:
    """Positions tied together, and what bounds them."""

    positions: set[tuple[fx.Node, int]] = field(default_factory=set)
    readers: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)  # (conv or linear, its input node, channel)
    reasons: list[str] = field(default_factory=list)  # why it stays whatever the weights (input, output, unknown ops)
    live: list[tuple[fx.Node, int]] = field(default_factory=list)  # positions that are not constant


class _Tracer(fx.Tracer):
    # BatchNorm subclasses (timm's BatchNormAct2d) stay whole: traced through, their F.batch_norm call
    # would be an anonymous function with the training flag of trace time baked in
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (GaborConv2d, Dropped, ChannelConstant, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, qualname)


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
            first = out[0].reshape(out.shape[1], -1)[:, 0] if out.shape[1] else out.new_zeros(0)
            self.values[n] = first.detach().double().clone()  # before any in-place op
        return out


def pointwise(m: nn.Module) -> bool:
    """Whether module `m` is the same element-wise function of every value, channel by channel
    (a single-parameter PReLU counts; a per-channel one does not)."""
    if isinstance(m, nn.PReLU):
        return m.num_parameters == 1
    if isinstance(m, _POINTWISE_MODULES):
        return True
    cls = type(m)
    return cls.__module__.startswith("timm.layers.activations") and cls.__name__ in _TIMM_ACTIVATIONS and next(m.parameters(), None) is None


class _ChildLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def norm_steps(norm: nn.BatchNorm2d) -> tuple[nn.Module | Callable[[Tensor], Tensor], ...] | str:
    """What a BatchNorm2d subclass (timm's BatchNormAct2d: `act(drop(bn(x)))`) does after its batch
    norm, in order: its own element-wise child modules (`pointwise`) or element-wise functions
    (callables of one tensor); () for a plain BatchNorm2d. Or, as a string, why the analysis does
    not know the subclass: its forward must be `F.batch_norm` of its input with its own statistics
    and affine parameters (running statistics in eval mode, so that a shift folded into its running
    mean is exact), then only those steps. Decided from its forward traced in eval mode, once per
    class, settings and children's types."""
    if type(norm) is nn.BatchNorm2d:
        return ()
    scalar = (bool, int, float, str, type(None))
    settings = tuple(sorted((k, v) for k, v in vars(norm).items() if k not in ("training", "num_features") and isinstance(v, scalar)))
    children = tuple((name, type(c), pointwise(c)) for name, c in norm.named_modules() if c is not norm)
    key = (type(norm), settings, children)
    if key not in _NORM_STEPS:
        _NORM_STEPS[key] = _norm_steps(norm)
    found = _NORM_STEPS[key]
    return found if isinstance(found, str) else tuple(norm.get_submodule(step) if isinstance(step, str) else step for step in found)


_NORM_STEPS: dict[tuple, tuple | str] = {}  # norm_steps' verdicts: child names or callables, or why not


def _norm_steps(norm: nn.BatchNorm2d) -> tuple[str | Callable[[Tensor], Tensor], ...] | str:
    """`norm_steps` with the child modules by name."""
    was_training = norm.training
    norm.training = False  # this module's flag only: its children are leaves
    try:
        graph = _ChildLeaves().trace(norm)
    except Exception as e:  # tracing user code can fail in many ways
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return f"its forward cannot be traced ({detail})"
    finally:
        norm.training = was_training
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    (out,) = [n for n in nodes if n.op == "output"]
    node, steps, chain = out.args[0], [], set()
    while isinstance(node, fx.Node) and not (node.op == "call_function" and node.target is F.batch_norm):
        chain.add(node)
        if len(node.all_input_nodes) != 1 or not node.args or node.args[0] is not node.all_input_nodes[0]:
            return "its forward does more than a batch norm and element-wise steps"
        rest = node.args[1:]
        if node.op == "call_module" and pointwise(norm.get_submodule(node.target)) and not rest and not node.kwargs:
            steps.append(node.target)
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
            steps.append(partial(node.target, *rest, **node.kwargs))
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS and not rest and not node.kwargs:
            steps.append(getattr(Tensor, node.target))
        else:
            what = f"'{node.target}', a {type(norm.get_submodule(node.target)).__name__}" if node.op == "call_module" else f"'{node_name(node)}'"
            return f"after its batch norm it applies {what}, which the analysis does not know as element-wise"
        node = node.all_input_nodes[0]
    if not isinstance(node, fx.Node):
        return "its forward does not end in a batch norm and element-wise steps"
    chain.add(node)
    try:
        bound = inspect.signature(F.batch_norm).bind(*node.args, **node.kwargs)
    except TypeError:
        return "its batch norm is called with arguments the analysis does not know"
    bound.apply_defaults()
    args = bound.arguments
    own = all(args[k] is None or isinstance(args[k], fx.Node) and args[k].op == "get_attr" and args[k].target == k
              for k in ("running_mean", "running_var", "weight", "bias"))
    stats = not norm.track_running_stats or (args["training"] is False and args["running_mean"] is not None and args["running_var"] is not None)
    if inputs != [args["input"]] or not own or not stats or any(isinstance(args[k], fx.Node) for k in ("training", "momentum", "eps")):
        return "its batch norm is not of its input with its own statistics and parameters"
    for n in nodes:  # off the chain only input checks, so nothing else changes a value
        if n not in chain and n.op not in ("placeholder", "output", "get_attr") and not (
                n.op == "call_function" and n.target in _CHECKS or n.op == "call_method" and n.target in SHAPE_ONLY_METHODS):
            return f"its forward does more than a batch norm and element-wise steps ('{node_name(n)}')"
    return tuple(reversed(steps))


def zero_padded(conv: nn.Module) -> bool:
    """Whether the convolution pads with zeros, so a constant input does not stay constant."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def node_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def direct_norms(graph: ChannelGraph) -> dict[str, str]:
    """{convolution: the BatchNorm2d that is its only reader}, for every convolution in the graph."""
    pairs = {}
    for n in graph.gm.graph.nodes:
        if graph.roles[n].kind == "conv" and len(n.users) == 1:
            (u,) = n.users
            if u.op == "call_module" and isinstance(graph.modules[u.target], nn.BatchNorm2d) and graph.roles[u].kind == "aligned":
                pairs[n.target] = u.target
    return pairs


def trace_graph(model: nn.Module) -> fx.Graph:
    """The torch.fx graph of `model` in eval mode (the mode the analysis runs it in: a forward that
    branches on `self.training` must not bake batch statistics into the graph), Gabor banks, stand-ins
    and BatchNorms as leaves. Raises whatever tracing user code raises."""
    was_training = model.training
    model.eval()
    try:
        return _Tracer().trace(model)
    finally:
        model.train(was_training)


def trace_channels(model: nn.Module, input_shape: tuple[int, int, int], graph: fx.Graph | None = None) -> ChannelGraph:
    """The channel dataflow of `model`, from its fx graph (`graph`, traced from a model of the same
    architecture; traced here when None) run once in eval mode on random inputs [2, *input_shape].
    Never mutates `model`; raises whatever tracing user code raises."""
    recorder = _Recorder(fx.GraphModule(model, graph if graph is not None else trace_graph(model)))
    param = next(model.parameters(), None)
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            recorder.run(x.to(param.device, param.dtype) if param is not None else x)
    finally:
        model.train(was_training)
    return ChannelGraph(model, recorder)


class ChannelGraph:
    """Roles, constant channels and components of a traced model (see the module doc)."""

    def __init__(self, model: nn.Module, run: _Recorder) -> None:
        self.modules = dict(model.named_modules())
        self.gm = run.module
        self.values, self.shapes = run.values, run.shapes
        self.order = {n: k for k, n in enumerate(self.gm.graph.nodes)}
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.roles = {n: self._role(n) for n in self.gm.graph.nodes}
        self.const: dict[fx.Node, set[int]] = {}
        for n in self.gm.graph.nodes:
            self.const[n] = self._const(n)
        self._read: dict[str, Tensor] = {}

    # -- roles -----------------------------------------------------------------------------------
    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.shapes]

    def _role(self, n: fx.Node) -> Role:
        if n.op == "placeholder":
            return Role("input")
        if n not in self.shapes:
            return Role("opaque", why="not a feature map")
        shape = self.shapes[n]
        ins = self._tensor_inputs(n)
        if n.op == "call_module":
            m = self.modules[n.target]
            has_params = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
            if has_params and self.calls[n.target] > 1:
                return Role("opaque", why="a module called more than once")
            if isinstance(m, (Dropped, ChannelConstant)):
                return Role("constant")  # reads nothing; a removed branch's constant, or no channels at all
            if isinstance(m, (nn.Conv2d, GaborConv2d)):
                if m.groups == 1:
                    return Role("conv", tuple(ins))
                if m.groups == m.in_channels == m.out_channels:
                    return Role("depthwise", tuple(ins))
                return Role("opaque", why=f"a grouped convolution ({m.groups} groups)")
            if isinstance(m, nn.Linear):
                return Role("linear", tuple(ins))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) is not nn.BatchNorm2d:
                # a BatchNorm2d subclass that only adds element-wise steps (timm's BatchNormAct2d) is a
                # BatchNorm: per channel, and its constants (act(bn(c))) are read from the run like any
                steps = norm_steps(m) if isinstance(m, nn.BatchNorm2d) else "not a BatchNorm2d"
                if isinstance(steps, str):
                    return Role("opaque", why=f"a {type(m).__name__}, a BatchNorm subclass that channel surgery cannot slice: {steps}")
                return Role("aligned", tuple(ins))
            if isinstance(m, nn.AvgPool2d):
                zero_only = m.count_include_pad and m.padding not in (0, (0, 0))
                return Role("aligned", tuple(ins), zero_only=zero_only, shift=not zero_only)
            if isinstance(m, nn.PReLU) and m.num_parameters == 1 or isinstance(m, _ELEMENTWISE_MODULES):
                return Role("aligned", tuple(ins), shift=isinstance(m, _SHIFT_MODULES))
            if isinstance(m, nn.Flatten):
                return self._flatten(n, ins)
            return Role("opaque", why=f"a {type(m).__name__}")
        if n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS or n.op == "call_method" and n.target in _ELEMENTWISE_METHODS:
            return Role("aligned", tuple(ins[:1]), shift=n.target in _SHIFT_FUNCTIONS)
        if n.op == "call_function" and n.target is F.avg_pool2d:
            padding = n.args[3] if len(n.args) > 3 else n.kwargs.get("padding", 0)
            zero_only = padding not in (0, (0, 0))
            return Role("aligned", tuple(ins[:1]), zero_only=zero_only, shift=not zero_only)
        if n.op == "call_function" and n.target in _BINARY or n.op == "call_method" and n.target in _BINARY_METHODS:
            if all(len(self.shapes[a]) == len(shape) and self.shapes[a][1] == shape[1] for a in ins):
                return Role("aligned", tuple(ins), shift=n.target not in _MULTIPLY)
            return Role("opaque", why="a broadcast across channels")
        if n.target in (torch.cat, torch.concat) or n.op == "call_method" and n.target == "mean":
            return self._cat_or_mean(n, ins, shape)
        if n.target in (torch.flatten, "flatten", "view", "reshape"):
            return self._flatten(n, ins)
        return Role("opaque", why=f"'{n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}'")

    def _cat_or_mean(self, n: fx.Node, ins: list[fx.Node], shape: tuple[int, ...]) -> Role:
        if n.target == "mean":  # x.mean((2, 3)): pooling, if the channel dimension survives
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            rank = len(self.shapes[ins[0]])
            if dims and all(d % rank >= 2 for d in dims):
                return Role("aligned", tuple(ins[:1]), shift=True)
            return Role("opaque", why="a mean over channels")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if dim % len(shape) != 1:
            return Role("opaque", why="a concatenation not over channels")
        pieces, offset = [], 0
        for a in n.args[0]:
            pieces.append((a, offset))
            offset += self.shapes[a][1]
        return Role("cat", tuple(pieces))

    def _flatten(self, n: fx.Node, ins: list[fx.Node]) -> Role:
        if not ins:  # a parameter reshaped to broadcast, e.g. ConvNeXt's layer scale gamma.reshape(1, -1, 1, 1)
            return Role("opaque", why="a reshaped parameter")
        src = self.shapes[ins[0]]
        if self.shapes[n] == src:  # flattening [N, C] or [N, C, 1]-like shapes that are already flat
            return Role("aligned", tuple(ins[:1]), shift=True)
        if len(src) == 4 and self.shapes[n] == (src[0], src[1] * src[2] * src[3]):
            return Role("flatten", tuple(ins[:1]), hw=src[2] * src[3])
        return Role("opaque", why="a reshape that is not a flatten to [N, C*H*W]")

    # -- constant channels, ignored channels -----------------------------------------------------
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
        if role.kind == "constant":
            return set(range(self.shapes[n][1]))
        return set()

    def _conv_const(self, n: fx.Node, src: fx.Node) -> set[int]:
        """Output o is constant when each input of its group is unused (kernel removed) or constant
        and either 0 or not disturbed by zero padding."""
        conv = self.modules[n.target]
        alive = alive_kernels(conv).cpu()  # [O, I / groups]
        padded = zero_padded(conv)
        usable = torch.tensor([i in self.const[src] and (not padded or self.values[src][i] == 0) for i in range(conv.in_channels)])
        per_group = conv.out_channels // conv.groups
        usable = usable.view(conv.groups, -1).repeat_interleave(per_group, dim=0)  # [O, I / groups]
        return {int(o) for o in torch.nonzero((~alive | usable).all(dim=1)).flatten()}

    def ignores(self, reader: fx.Node, i: int) -> bool:
        """Whether the convolution or linear layer `reader` has only zero weights for its input i."""
        if reader.target not in self._read:
            m = self.modules[reader.target]
            used = m.weight.detach().ne(0).any(dim=0) if isinstance(m, nn.Linear) else alive_kernels(m).any(dim=0)
            self._read[reader.target] = used.cpu()  # Tensor[in]
        return not bool(self._read[reader.target][i])

    # -- components ------------------------------------------------------------------------------
    def component(self, start: tuple[fx.Node, int]) -> Component:
        """Every position tied to `start`, the readers that bound them, and the structural reasons
        (if any) that they cannot be removed."""
        comp = Component(positions={start})
        queue = [start]

        def visit(pos):
            if pos not in comp.positions:
                comp.positions.add(pos)
                queue.append(pos)

        while queue:
            n, i = queue.pop()
            role = self.roles[n]
            if i not in self.const[n]:
                comp.live.append((n, i))
            if role.kind in ("aligned", "depthwise"):
                for a in role.inputs:
                    visit((a, i))
            elif role.kind == "cat":
                a, off = max((p for p in role.inputs if p[1] <= i), key=lambda p: p[1])
                visit((a, i - off))
            elif role.kind == "flatten":
                visit((role.inputs[0], i // role.hw))
            elif role.kind == "input":
                comp.reasons.append("part of the model's input")
            elif role.kind not in ("conv", "constant"):
                comp.reasons.append(f"produced by '{node_name(n)}', {role.why}")
            for u in n.users:
                urole = self.roles[u]
                if u.op == "output":
                    comp.reasons.append(f"part of the model's output (through '{node_name(n)}')")
                elif u.op == "call_method" and u.target in SHAPE_ONLY_METHODS or urole.kind == "constant":
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
                    comp.readers.append((u, n, i))
                else:
                    comp.reasons.append(f"read by '{node_name(u)}', {urole.why}")
        return comp
