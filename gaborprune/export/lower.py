"""`lower`: the deploy form of a model, plain ops only, for one input size.

1. Gabor banks become plain convolutions (their masked kernels baked into the weights).
2. With `cut`, channels that emit a constant and could not be cut in the recipe (a zero-padded
   consumer sees the constant inside and 0 at the borders) are cut here: for a fixed input size,
   what they add to the consumer's output is an exact [C, H, W] map (`MapBias`); a map that is the
   same at every position is a plain bias, and an all-zero one is no map at all (its Add would only
   break ONNX Runtime's Conv+ReLU fusion). Exactness otherwise follows `prune`. The cut removes
   arithmetic but can cost time (the map's Add, channel counts off the CPU's block): `export`
   measures it against the plain form.
3. BatchNorm is folded into the convolution before it, and with `pad` channel counts off a multiple
   of it are grown back with zero channels where that is exact (`pad_channels_`): ONNX Runtime's
   blocked CPU convolutions work on blocks of 8 (AVX2) or 16 (AVX-512) channels.
4. Each kernel-sparse convolution (zero kernels in channels that stay) takes a form: `dense` (one
   convolution, zeros computed) or `split` (`SplitConv`: one dense convolution per group of output
   channels over just the input channels the group reads; outputs without kernels are constants).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from gaborprune.convert.cada import CADAConv2d
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import replace_module
from gaborprune.errors import GaborPruneError
from gaborprune.export.onnx import ExportError
from gaborprune.prune.graph import analyse_channels
from gaborprune.prune.plan import PrunePlan, apply_plan_
from gaborprune.prune.standins import ChannelConstant, Dropped

FORMS = ("dense", "split")
#: SplitConv merges its groups of output channels down to this many (each group is one Conv op).
MAX_GROUPS = 4


class MapBias(nn.Module):
    """A convolution plus a fixed map: Tensor[N, C, H, W] -> conv(x) + bias_map[C, H', W']."""

    def __init__(self, conv: nn.Conv2d, bias_map: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map[None].to(conv.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.bias_map


def _support(weight: Tensor) -> Tensor:
    """Bool Tensor[O, I]: which kernels are not all zero."""
    return weight.detach().flatten(2).abs().amax(dim=2) > 0


def output_groups(support: Tensor, max_groups: int = MAX_GROUPS) -> list[list[int]]:
    """Output channels grouped by the input channels they read, merged greedily (cheapest union
    first) down to `max_groups`. Rows without kernels are left out."""
    by_pattern: dict[tuple[int, ...], list[int]] = {}
    for o, row in enumerate(support):
        if row.any():
            by_pattern.setdefault(tuple(torch.nonzero(row).flatten().tolist()), []).append(o)
    groups = [(set(p), outs) for p, outs in by_pattern.items()]

    def cost(inputs: set, outs: list) -> int:
        return len(inputs) * len(outs)

    while len(groups) > max_groups:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                (ia, oa), (ib, ob) = groups[a], groups[b]
                extra = cost(ia | ib, oa + ob) - cost(ia, oa) - cost(ib, ob)
                if best is None or extra < best[0]:
                    best = (extra, a, b)
        _, a, b = best
        (ia, oa), (ib, ob) = groups[a], groups[b]
        groups[a] = (ia | ib, oa + ob)
        del groups[b]
    return [sorted(outs) for _, outs in groups]


class SplitConv(nn.Module):
    """A kernel-sparse convolution computed as a few dense ones on gathered input channels.

    Each group of output channels gets a dense convolution over the union of the input channels
    its kernels read; output channels without kernels are their bias (0 without one). The results
    are concatenated and put back in the original channel order. Same output as `conv`.
    """

    def __init__(self, conv: nn.Conv2d, groups: list[list[int]]) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("SplitConv takes ungrouped, zero-padded convolutions")
        support = _support(conv.weight)
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=weight.dtype)
        self.convs = nn.ModuleList()
        order: list[int] = []
        for k, outs in enumerate(groups):
            ins = torch.nonzero(support[outs].any(dim=0)).flatten()
            part = nn.Conv2d(len(ins), len(outs), conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True)
            with torch.no_grad():
                part.weight.copy_(weight[outs][:, ins])
                part.bias.copy_(bias[outs])
            self.convs.append(part)
            self.register_buffer(f"inputs{k}", ins)
            order += outs
        constant = [o for o in range(conv.out_channels) if o not in set(order)]
        self.register_buffer("constant", bias[constant].view(1, -1, 1, 1).clone())
        order += constant
        self.register_buffer("order", torch.argsort(torch.tensor(order)))

    def forward(self, x: Tensor) -> Tensor:
        ys = [conv(x.index_select(1, getattr(self, f"inputs{k}"))) for k, conv in enumerate(self.convs)]
        if self.constant.shape[1]:
            ys.append(self.constant.expand(x.shape[0], -1, ys[0].shape[2], ys[0].shape[3]))
        return torch.cat(ys, 1).index_select(1, self.order)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (MapBias, SplitConv, CADAConv2d, Dropped, ChannelConstant)) or super().is_leaf_module(m, qualname)


class _NormLeaves(_Tracer):
    """BatchNorm subclasses whole: traced through, one would be an anonymous F.batch_norm call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, step: str, tracer: type[fx.Tracer] = _Tracer) -> tuple[fx.Graph, dict[str, int]]:
    """The model's fx graph (lowering wrappers as leaves) and how often each module is called.

    Raises:
        ExportError: torch.fx cannot trace the model, so `step` cannot run.
    """
    try:
        graph = tracer().trace(model)
    except Exception as e:  # tracing user code can fail in many ways
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ExportError(f"{step}: torch.fx could not trace the model ({detail})") from None
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return graph, calls


@torch.no_grad()
def fold_batchnorms_(model: nn.Module) -> list[str]:
    """Fold each BatchNorm2d that alone reads a convolution's output into that convolution (eval
    semantics); the BatchNorm becomes Identity, or a subclass known to the channel analysis (timm's
    BatchNormAct2d, `norm_steps`) the element-wise modules it applies after its batch norm (its
    activation). Returns the folded BatchNorms' names.

    Raises:
        ExportError: torch.fx cannot trace the model (nothing is changed).
    """
    from gaborprune.prune.dataflow import norm_steps

    graph, calls = _trace(model, "BatchNorms not folded", _NormLeaves)
    modules = dict(model.named_modules())
    folded = []
    for n in graph.nodes:
        norm = modules.get(n.target) if n.op == "call_module" else None
        if not isinstance(norm, nn.BatchNorm2d) or not norm.track_running_stats or calls[n.target] != 1:
            continue
        steps = norm_steps(norm)
        if isinstance(steps, str) or not all(isinstance(step, nn.Module) for step in steps):
            continue  # unknown, or a step that is a function: it stays whole (exact, not folded)
        src = n.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1:
            continue
        outer = modules[src.target]
        conv = outer.conv if isinstance(outer, MapBias) else outer
        if not isinstance(conv, (nn.Conv2d, CADAConv2d)):
            continue
        scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / (norm.running_var + norm.eps).sqrt()
        shift = (norm.bias if norm.affine else torch.zeros_like(norm.running_mean)) - norm.running_mean * scale
        # a CADA block is linear in its value projection, channel by channel: scale that instead
        (conv.value.weight if isinstance(conv, CADAConv2d) else conv.weight).mul_(scale.view(-1, 1, 1, 1))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros_like(shift))
        conv.bias.mul_(scale).add_(shift)
        if isinstance(outer, MapBias):
            outer.bias_map.mul_(scale.view(1, -1, 1, 1))
        after = [step for step in steps if not isinstance(step, nn.Identity)]
        replace_module(model, n.target, after[0] if len(after) == 1 else nn.Sequential(*after) if after else nn.Identity())
        folded.append(n.target)
    return folded


# f(0) == 0 elementwise: zero channels stay zero through these
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Hardtanh,
                 nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d)
_ZERO_FUNCTIONS = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_, nn.functional.relu6,
                   nn.functional.gelu, nn.functional.silu, nn.functional.hardswish, nn.functional.max_pool2d, "relu", "relu_"}


def _grown(conv: nn.Conv2d, out: int = 0, inp: int = 0) -> nn.Conv2d:
    """`conv` with `out` zero output channels and `inp` zero input channels appended."""
    new = nn.Conv2d(conv.in_channels + inp, conv.out_channels + out, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: conv.out_channels, : conv.in_channels] = conv.weight
        if conv.bias is not None:
            new.bias.zero_()
            new.bias[: conv.out_channels] = conv.bias
    return new.train(conv.training)


def _zero_readers(node: fx.Node, modules: dict, calls: dict) -> list[str] | None:
    """The ungrouped convolutions that read `node`'s output through ops keeping 0 at 0, or None
    when anything else reads it."""
    readers = []
    for u in node.users:
        m = modules.get(u.target) if u.op == "call_module" else None
        inner = m.conv if isinstance(m, MapBias) else m
        if isinstance(inner, nn.Conv2d) and inner.groups == 1 and calls[u.target] == 1 and u.args[0] is node:
            readers.append(u.target)
        elif isinstance(m, _ZERO_MODULES) or u.op in ("call_function", "call_method") and u.target in _ZERO_FUNCTIONS:
            more = _zero_readers(u, modules, calls)
            if more is None:
                return None
            readers += more
        else:
            return None
    return readers


@torch.no_grad()
def pad_channels_(model: nn.Module, multiple: int = 8) -> list[str]:
    """Grow convolutions whose output channel count is not a multiple of `multiple` with zero channels,
    where only other convolutions read them through ops keeping 0 at 0 (exact). ONNX Runtime's CPU
    convolutions work on blocks of 8 (AVX2) or 16 channels; an odd count after pruning falls off that
    path and can make the smaller model slower. Returns the grown layers.

    Raises:
        ExportError: torch.fx cannot trace the model (nothing is changed).
    """
    graph, calls = _trace(model, f"channels not padded to a multiple of {multiple}")
    grown = []
    for n in graph.nodes:
        m = model.get_submodule(n.target) if n.op == "call_module" else None
        conv = m.conv if isinstance(m, MapBias) else m
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or calls[n.target] != 1 or conv.out_channels % multiple == 0:
            continue
        readers = _zero_readers(n, dict(model.named_modules()), calls)
        if not readers:
            continue
        extra = -conv.out_channels % multiple
        if isinstance(m, MapBias):
            m.conv = _grown(conv, out=extra)
            m.bias_map = torch.cat([m.bias_map, m.bias_map.new_zeros(1, extra, *m.bias_map.shape[2:])], 1)
        else:
            replace_module(model, n.target, _grown(conv, out=extra))
        for r in readers:
            reader = model.get_submodule(r)
            if isinstance(reader, MapBias):
                reader.conv = _grown(reader.conv, inp=extra)
            else:
                replace_module(model, r, _grown(reader, inp=extra))
        grown.append(n.target)
    return grown


@dataclass
class LayerLowering:
    name: str
    kernels: int  # non-zero kernels
    dense_kernels: int  # out_channels * in_channels / groups, as a dense conv computes them
    form: str  # dense | split (k groups) | depthwise | grouped


@dataclass
class LoweringReport:
    layers: list[LayerLowering] = field(default_factory=list)
    channels_cut: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # cut at export, beyond the recipe
    bias_maps: list[str] = field(default_factory=list)  # convolutions that absorbed a constant channel's map
    biases_folded: list[str] = field(default_factory=list)  # ... whose map was the same everywhere: into their bias
    batchnorms_folded: int = 0
    padded: list[str] = field(default_factory=list)  # convolutions grown with zero channels to a multiple of `pad`
    skipped: list[str] = field(default_factory=list)  # steps that could not run, and why (the graph is still exact)

    @property
    def forms(self) -> dict[str, str]:
        return {layer.name: layer.form for layer in self.layers}


def kernel_sparse(model: nn.Module) -> list[str]:
    """Ungrouped, zero-padded convolutions with all-zero kernels in output channels that have others."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros":
            support = _support(m.weight)
            if (support.any(dim=1) & ~support.all(dim=1)).any() or not support.any(dim=1).all():
                names.append(name)
    return names


@torch.no_grad()
def bake(model: nn.Module, input_shape: tuple[int, int, int], cut: bool = True) -> tuple[nn.Module, LoweringReport]:
    """Steps 1 and 2 of the lowering (see the module doc) on a deploy copy of `model`: what every
    form of the model shares, so `finish` can make each form from it without analysing again."""
    deploy = copy.deepcopy(model).cpu().float().eval()
    for name, m in list(deploy.named_modules()):
        if isinstance(m, GaborConv2d):
            replace_module(deploy, name, m.to_conv2d().eval())
    report = LoweringReport()
    if not cut:
        return deploy, report

    analysis = analyse_channels(deploy, input_shape, bias_maps=True)
    if analysis.note:
        report.skipped.append(f"constant channels not cut: {analysis.note}")
    modules = dict(deploy.named_modules())
    maps: dict[str, Tensor] = {}
    for fold in analysis.folds:
        if fold.attr == "bias_map":
            maps[fold.module] = maps.get(fold.module, 0) + fold.delta
        else:
            target = getattr(modules[fold.module], fold.attr)
            target += fold.delta.to(target.dtype)
    apply_plan_(deploy, PrunePlan(channels=analysis.remove))
    report.channels_cut = analysis.remove
    for name, delta in maps.items():
        cut_out = set(analysis.remove.get(name, {}).get("out", []))
        delta = delta[[o for o in range(delta.shape[0]) if o not in cut_out]]  # Tensor[C, H, W]
        if not delta.any():  # the constants cancel: an Add of zeros would only cost time
            continue
        conv = deploy.get_submodule(name)
        flat = delta.flatten(1)
        if (flat == flat[:, :1]).all():  # the same at every position: a bias, fused into the convolution
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
            conv.bias += flat[:, 0].to(conv.bias.dtype)
            report.biases_folded.append(name)
        else:
            replace_module(deploy, name, MapBias(conv, delta.float()))
            report.bias_maps.append(name)
    return deploy, report


@torch.no_grad()
def finish(baked: nn.Module, report: LoweringReport, forms: str | dict[str, str] = "dense", pad: int = 0) -> tuple[nn.Module, LoweringReport]:
    """Steps 3 and 4 of the lowering on a copy of `bake`'s output (both arguments are untouched).

    A step that cannot trace the model is skipped and recorded in the report's `skipped`: the graph
    stays exact, only not as compact."""
    deploy, report = copy.deepcopy(baked), copy.deepcopy(report)
    try:
        report.batchnorms_folded = len(fold_batchnorms_(deploy))
    except ExportError as e:  # ONNX Runtime folds them itself, at session start
        report.skipped.append(str(e))
    if pad > 1:
        try:
            report.padded = pad_channels_(deploy, pad)
        except ExportError as e:
            report.skipped.append(str(e))

    sparse = set(kernel_sparse(deploy))
    wrapped = {f"{n}.conv" for n, m in deploy.named_modules() if isinstance(m, MapBias)}
    for path, conv in list(deploy.named_modules()):
        if not isinstance(conv, nn.Conv2d):
            continue
        name = path.removesuffix(".conv") if path in wrapped else path  # the layer's name in the model
        support = _support(conv.weight)
        form = "dense" if conv.groups == 1 else "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
        wanted = forms if isinstance(forms, str) else forms.get(name, "dense")
        if wanted not in FORMS:
            raise GaborPruneError(f"unknown lowering '{wanted}' for '{name}'; known: {', '.join(FORMS)}")
        if path in sparse and wanted == "split":
            groups = output_groups(support)
            if groups:
                replace_module(deploy, path, SplitConv(conv, groups))
                form = f"split ({len(groups)} groups)"
        report.layers.append(LayerLowering(name, int(support.sum()), support.numel(), form))
    return deploy, report


def lower(model: nn.Module, input_shape: tuple[int, int, int], forms: str | dict[str, str] = "dense",
          pad: int = 0, *, cut: bool = True) -> tuple[nn.Module, LoweringReport]:
    """The deploy copy of `model` for inputs [N, *input_shape] (see the module doc). `model` is untouched.

    Args:
        forms: "dense" or "split" for every kernel-sparse convolution, or {layer: form} (others dense).
        pad: grow channel counts to a multiple of this with zero channels where exact (0: never).
        cut: cut constant channels that the recipe kept (with bias maps where they are needed);
            False gives the plain form: nothing removed beyond the recipe, no map.
    """
    return finish(*bake(model, input_shape, cut), forms, pad)
