"""Prune plans (data), `apply_plan_`, the surgery they drive, and the step a recipe records."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import replace_module
from gaborprune.errors import PruneError
from gaborprune.prune.standins import ChannelConstant, Dropped, folded_constant

#: What a stored fold may add to: a consumer's bias, or a BatchNorm's running mean. (Export's
#: "bias_map" folds are for one input size and never go into a plan.)
FOLD_ATTRS = ("bias", "running_mean")


def fold_problem(folds: object) -> str | None:
    """Why `folds` is not a list of plan folds ({"module": str, "attr": one of FOLD_ATTRS, "delta": [finite
    numbers]}), as words that follow its name, or None when it is."""
    if not isinstance(folds, (list, tuple)):
        return f"must be a list of folds, not {type(folds).__name__}"
    for k, f in enumerate(folds):
        if not (isinstance(f, dict) and set(f) == {"module", "attr", "delta"}):
            return f"has fold {k} that is not a dict of 'module', 'attr' and 'delta'"
        if not isinstance(f["module"], str):
            return f"has fold {k} whose module is not a name"
        if f["attr"] not in FOLD_ATTRS:
            return f"has fold {k} with attr {f['attr']!r}, not {' or '.join(FOLD_ATTRS)}"
        delta = f["delta"]
        if not (isinstance(delta, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in delta)):
            return f"has fold {k} whose delta is not a list of finite numbers"
    return None


@dataclass(frozen=True)
class PrunePlan:
    """What one prune removes, as plain data that replays on a fresh model of the same architecture.

    Indices refer to the model as it was before this plan.

    Attributes:
        kernels: {Gabor layer: [[o, i], ...]}: every kernel masked after this prune, including those in
            channels that stay (export lowers those) and those of removed channels.
        channels: {module: {"out": [...], "in": [...]}}: output / input channels physically removed from
            convolutions, BatchNorms and linear layers. A removed output channel takes its kernels
            with it, masked or not (a live channel that only ignoring readers read).
        spec: the criterion that chose the kernels (`PruneSpec.to_dict()`), for the record.
        folds: ({"module", "attr", "delta": [floats]}, ...): `module.<attr> += delta`, the constants of
            removed channels added back where their readers' outputs go (`gaborprune.prune.fold`), so
            that replaying the plan alone on the unpruned weights computes what the pruned model does.
            Deltas are sized to the model before this plan's cuts. Plans written before folds were
            stored have none.
        constants: {convolution: BatchNorm or None}: convolutions that lose every input channel (a
            residual branch removed whole) and become a constant per output channel
            (`gaborprune.prune.standins`), with the BatchNorm that directly follows them folded in.
            A module that loses every output channel becomes `Dropped`.
    """

    kernels: dict[str, list[list[int]]] = field(default_factory=dict)
    channels: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    folds: tuple[dict, ...] = ()
    constants: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self):
        problem = fold_problem(self.folds)
        if problem:
            raise PruneError(f"malformed prune plan (folds {problem}); the recipe may be corrupt")
        if not (isinstance(self.constants, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in self.constants.items())):
            raise PruneError("malformed prune plan (constants must map convolution names to a BatchNorm name or null); the recipe may be corrupt")

    def within(self, module: str) -> PrunePlan:
        """This plan, made on `module` of a model (its names relative to it), in the model's names."""
        if not module:
            return self
        full = f"{module}.{{}}".format
        return PrunePlan({full(k): v for k, v in self.kernels.items()}, {full(k): v for k, v in self.channels.items()}, self.spec,
                         tuple(f | {"module": full(f["module"])} for f in self.folds),
                         {full(k): None if v is None else full(v) for k, v in self.constants.items()})

    def to_dict(self) -> dict:
        d = {"kernels": self.kernels, "channels": self.channels, "spec": self.spec,
             "folds": [{"module": f["module"], "attr": f["attr"], "delta": list(f["delta"])} for f in self.folds]}
        return d | ({"constants": dict(self.constants)} if self.constants else {})

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        try:
            folds = d.get("folds", [])
            problem = fold_problem(folds)
            if problem:
                raise ValueError(f"folds {problem}")
            return cls({k: [list(map(int, p)) for p in v] for k, v in d["kernels"].items()},
                       {k: {s: list(map(int, v[s])) for s in ("out", "in") if s in v} for k, v in d["channels"].items()},
                       dict(d.get("spec") or {}),
                       tuple({"module": f["module"], "attr": f["attr"], "delta": [float(v) for v in f["delta"]]} for f in folds),
                       dict(d.get("constants") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PruneError(f"malformed prune plan ({e}); the recipe may be corrupt") from None


@dataclass(frozen=True)
class PruneStep:
    """A prune as a recipe records it: its plan, replayed with `apply_plan_`."""

    plan: PrunePlan
    kind: ClassVar[str] = "prune"

    def replay_(self, model: nn.Module) -> nn.Module:
        return apply_plan_(model, self.plan)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "plan": self.plan.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> PruneStep:
        return cls(PrunePlan.from_dict(d["plan"]))


def _keep(size: int, removed: list[int], what: str) -> torch.Tensor:
    bad = [i for i in removed if not 0 <= i < size]
    if bad:
        raise PruneError(f"{what} {bad[0]} does not exist (the layer has {size}); the plan does not fit this model")
    keep = sorted(set(range(size)) - set(removed))
    if not keep:
        raise PruneError(f"the plan removes every {what} of a layer")
    return torch.tensor(keep, dtype=torch.long)


def slice_module(m: nn.Module, out: list[int] = (), inp: list[int] = ()) -> nn.Module:
    """A fresh module like `m` without output channels `out` and input channels `inp`.

    Handles Conv2d and GaborConv2d (ungrouped, or depthwise with out == inp), BatchNorm2d and its
    subclasses (out; a subclass keeps its class and children, e.g. timm's BatchNormAct2d its
    activation) and Linear (inp). Parameters, buffers, frozen parameters and train/eval mode carry over.
    """
    ref = next(m.parameters(), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if isinstance(m, (nn.Conv2d, GaborConv2d)):
        depthwise = m.groups > 1
        if depthwise and not (m.groups == m.in_channels == m.out_channels and sorted(out) == sorted(inp)):
            raise PruneError(f"cannot slice a grouped convolution ({m.groups} groups) unless it is depthwise and loses the same channels in and out")
        keep_out = _keep(m.out_channels, out, "output channel")
        keep_in = _keep(m.in_channels, inp, "input channel")
        groups = len(keep_out) if depthwise else 1
        args = (len(keep_in), len(keep_out), m.kernel_size, m.stride, m.padding, m.dilation, groups, m.bias is not None, m.padding_mode)
        new = GaborConv2d(*args, **factory, freeze=m.frozen) if isinstance(m, GaborConv2d) else nn.Conv2d(*args, **factory)
        slice_in = not depthwise
    elif isinstance(m, nn.BatchNorm2d) and not inp:
        keep_out, keep_in, slice_in = _keep(m.num_features, out, "channel"), None, False
        if type(m) is not nn.BatchNorm2d:
            # a subclass (timm's BatchNormAct2d) keeps its class, forward and children (its activation):
            # a copy with its own per-channel tensors sliced
            for name, child in m.named_children():
                if any(t.numel() > 1 for t in [*child.parameters(), *child.buffers()]):
                    raise PruneError(f"cannot remove channels from a {type(m).__name__} whose '{name}' has per-channel tensors")
            new = copy.deepcopy(m)
            with torch.no_grad():
                for key, t in m.named_parameters(recurse=False):
                    setattr(new, key, nn.Parameter(t.detach()[keep_out.to(t.device)].clone(), requires_grad=t.requires_grad))
                for key, t in m.named_buffers(recurse=False):
                    if t.dim() >= 1:  # running statistics; num_batches_tracked is a scalar
                        setattr(new, key, t[keep_out.to(t.device)].clone())
            new.num_features = len(keep_out)
            return new.train(m.training)
        new = nn.BatchNorm2d(len(keep_out), m.eps, m.momentum, m.affine, m.track_running_stats, **factory)
    elif isinstance(m, ChannelConstant) and not inp:
        return ChannelConstant(m.was, m.value.detach().flatten()[_keep(m.out_channels, out, "channel").to(m.value.device)], m).train(m.training)
    elif isinstance(m, nn.Linear) and not out:
        keep_out, keep_in, slice_in = None, _keep(m.in_features, inp, "input feature"), True
        new = nn.Linear(len(keep_in), m.out_features, m.bias is not None, **factory)
    else:
        raise PruneError(f"cannot remove channels from a {type(m).__name__}")
    state = {}
    for key, t in m.state_dict().items():
        if keep_out is not None and t.dim() >= 1:
            t = t[keep_out.to(t.device)]
        if slice_in and t.dim() >= 2:
            t = t[:, keep_in.to(t.device)]
        state[key] = t
    new.load_state_dict(state)
    return new.train(m.training)


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Mask the plan's kernels, add its folds and cut its channels out of `model`, in place. Returns `model`.

    Masking and folding touch different tensors, so their order does not matter; both come before the
    cuts, because the folds' deltas are indexed like the uncut model.

    Raises:
        PruneError: the plan names a layer the model lacks, indices out of range, or a fold that does
            not fit its target.
    """
    modules = dict(model.named_modules())
    for name in list(plan.kernels) + list(plan.channels) + [f["module"] for f in plan.folds]:
        if name not in modules:
            raise PruneError(f"the prune plan names '{name}', which the model does not have")
    for name, pairs in plan.kernels.items():
        layer = modules[name]
        if not isinstance(layer, GaborConv2d):
            raise PruneError(f"the prune plan masks kernels of '{name}', which is a {type(layer).__name__}, not a Gabor bank")
        if pairs:
            idx = torch.tensor(pairs, dtype=torch.long, device=layer.mask.device)
            if (idx < 0).any() or (idx >= torch.tensor(layer.mask.shape, device=idx.device)).any():
                raise PruneError(f"the prune plan masks a kernel outside '{name}' ({tuple(layer.mask.shape)} kernels)")
            layer.mask[idx[:, 0], idx[:, 1]] = 0
    for f in plan.folds:
        target = getattr(modules[f["module"]], f["attr"], None)
        if not isinstance(target, torch.Tensor) or target.shape != (len(f["delta"]),):
            have = f"has {target.numel()} values" if isinstance(target, torch.Tensor) else "has none"
            raise PruneError(f"the prune plan adds {len(f['delta'])} values to '{f['module']}.{f['attr']}', which {have}; the plan does not fit this model")
        target += torch.tensor(f["delta"], dtype=target.dtype, device=target.device)
    for name, norm in plan.constants.items():
        if name not in modules or norm is not None and not isinstance(modules.get(norm), nn.BatchNorm2d):
            raise PruneError(f"the prune plan turns '{name}' (and BatchNorm '{norm}') into a constant, which the model does not fit")
    folded = {norm for norm in plan.constants.values() if norm is not None}
    for name, sides in plan.channels.items():
        if name in folded:
            continue
        try:
            replace_module(model, name, _cut(modules, name, sides.get("out", []), sides.get("in", []), plan.constants))
        except PruneError as e:
            raise PruneError(f"'{name}': {e}") from None
    for norm in folded:  # its whole forward, a subclass's activation too, is in the constant (`folded_constant`)
        replace_module(model, norm, nn.Identity())
    return model


def _cut(modules: dict[str, nn.Module], name: str, out: list[int], inp: list[int], constants: dict[str, str | None]) -> nn.Module:
    """`slice_module`, or a stand-in when the cut takes a whole side (see `PrunePlan.constants`)."""
    m = modules[name]
    if isinstance(m, (nn.Conv2d, GaborConv2d, nn.BatchNorm2d)):
        size = m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_channels
        if set(out) >= set(range(size)):
            kind = "gabor" if isinstance(m, GaborConv2d) else "conv" if isinstance(m, nn.Conv2d) else "norm"
            return Dropped(kind, size if isinstance(m, nn.BatchNorm2d) else m.in_channels, m)
    if name in constants:
        if not (isinstance(m, (nn.Conv2d, GaborConv2d)) and set(inp) >= set(range(m.in_channels))):
            raise PruneError("the plan makes it a constant but does not remove all its input channels")
        norm = modules[constants[name]] if constants[name] is not None else None
        value = folded_constant(m, norm)
        keep = _keep(m.out_channels, out, "output channel").to(value.device)
        return ChannelConstant("gabor" if isinstance(m, GaborConv2d) else "conv", value[keep], m).train(m.training)
    return slice_module(m, out, inp)
