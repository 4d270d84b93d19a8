"""The part of a model that the channel analysis reads: the whole model, or one traceable module of it.

Detectors and segmenters are not one torch.fx graph: a detector's forward pass resizes a list of
images, decodes boxes and runs non-maximum suppression in Python control flow. Their backbone (with
the feature pyramid or the extra SSD layers, which torchvision puts inside it) is. Analysing a part
is exact for the whole model: the part's outputs are the model's only view of its channels, and the
analysis keeps every channel a part's output carries (`gaborprune.prune.graph`), so a prune inside
the part leaves everything outside computing what it did.

A part is named by its module path (`backbone`, `model.backbone.body`); its input shape is what the
whole model feeds it, recorded by one eval-mode forward pass of the whole model.
"""

from __future__ import annotations

import linecache
import os
from dataclasses import dataclass

import torch
from torch import nn

from gaborprune.errors import PruneError
from gaborprune.probe import probe
from gaborprune.prune.analysis import ModelAnalysis
from gaborprune.prune.dataflow import _Tracer

#: The module a model's part defaults to when the whole model does not trace (torchvision's
#: detectors and segmenters, timm's feature models).
DEFAULT_PART = "backbone"


@dataclass(frozen=True)
class Part:
    """`name`: a module path in the model ("" for the whole model); `input_shape`: the shape of one
    of its inputs (the batch dimension left out), as the whole model feeds it."""

    name: str
    input_shape: tuple[int, ...]

    def of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.name) if self.name else model

    def full(self, name: str) -> str:
        """A module path inside the part as a path in the whole model."""
        return f"{self.name}.{name}" if self.name and name else self.name or name

    def describe(self) -> str:
        return f"'{self.name}'" if self.name else "the whole model"


class _Locating(_Tracer):
    """The analysis's tracer, remembering the innermost module being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:
                    pass
            raise


def _where(e: BaseException) -> str:
    """`file:line `code`` of the innermost frame outside torch itself: the op that could not be traced."""
    torch_dir = os.path.dirname(torch.__file__)
    tb, found = e.__traceback__, None
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(torch_dir + os.sep):
            found = tb
        tb = tb.tb_next
    if found is None:
        return ""
    path, line = found.tb_frame.f_code.co_filename, found.tb_lineno
    code = linecache.getline(path, line).strip()
    return f" at {os.path.basename(path)}:{line} `{code[:80]}`" if code else f" at {os.path.basename(path)}:{line}"


def trace_failure(module: nn.Module) -> str | None:
    """Why torch.fx cannot trace `module`, naming the submodule and the op; None when it traces."""
    tracer = _Locating()
    try:
        tracer.trace(module)
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        inner = tracer.failed_in
        who = f"'{inner}' ({type(module.get_submodule(inner)).__name__})" if inner else type(module).__name__
        return f"torch.fx cannot trace {who}{_where(e)}: {detail}"
    return None


def flat_outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output in order: a tensor, or dicts (in key order), lists and tuples
    of them (a segmenter's {"out": ...}, a detector's [{"boxes", "scores", "labels"}, ...])."""
    return [t for group in output_groups(out) for t in group]


def output_groups(out) -> list[list[torch.Tensor]]:
    """`flat_outputs` in groups: the tensors of each dict of tensors (one detector image's boxes,
    scores and labels) together, every other tensor alone."""
    if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [list(out.values())]
    if isinstance(out, (dict, list, tuple)):
        return [g for v in (out.values() if isinstance(out, dict) else out) for g in output_groups(v)]
    return [[out]] if isinstance(out, torch.Tensor) else []


def _fed(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape (batch left out) of the one tensor the whole model feeds module `name` (`probe`:
    one eval-mode pass on an input [1, *input_shape])."""
    seen: list = []
    probe(model, input_shape, [model.get_submodule(name).register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)) or None,
                                                                                 with_kwargs=True)])
    if not seen:
        raise PruneError(f"module '{name}' is not called when the model runs; name a module of its forward pass")
    args, kwargs = seen[0]
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
        raise PruneError(f"module '{name}' takes {len(args)} positional and {len(kwargs)} keyword inputs; the channel analysis needs a module "
                         "that takes one tensor: name one inside it")
    return tuple(args[0].shape[1:])


def submodule(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, or a PruneError naming the model's top-level modules."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise PruneError(f"the model has no module '{name}'; its top-level modules: {children}") from None


def find_part(model: nn.Module, input_shape: tuple[int, ...], module: str | None = None, traced: bool | None = None) -> Part:
    """The part of `model` (inputs [N, *input_shape]) that the channel analysis reads: `module` when
    given ("" for the whole model), else the whole model when torch.fx traces it or has no
    DEFAULT_PART, else its DEFAULT_PART. `traced`: whether torch.fx traces the whole model, when the
    caller knows (tracing a big model twice costs seconds).

    Raises:
        PruneError: `module` is not a module of the model, is not called with one tensor, or does
            not trace (the message names the submodule and the op that stopped the trace).
    """
    if module is None:
        # an untraceable model without a backbone is analysed whole too: its analysis says why channels stay
        if not isinstance(getattr(model, DEFAULT_PART, None), nn.Module) or (traced if traced is not None else trace_failure(model) is None):
            return Part("", tuple(input_shape))
        module = DEFAULT_PART
    if module == "":
        why = None if traced else trace_failure(model)
        if why is not None:
            raise PruneError(f"{why}; name a part that traces with `module` (e.g. '{DEFAULT_PART}')")
        return Part("", tuple(input_shape))
    why = trace_failure(submodule(model, module))
    if why is not None:
        raise PruneError(f"module '{module}': {why}; name a part inside it with `module`")
    return Part(module, _fed(model, module, tuple(input_shape)))


def analysed_part(model: nn.Module, input_shape: tuple[int, ...], module: str | None = None,
                  analysis: ModelAnalysis | None = None) -> tuple[Part, ModelAnalysis]:
    """(`find_part`'s part, the `ModelAnalysis` of it), tracing the whole model at most once.

    `analysis`: a ModelAnalysis the caller has, of the whole model or of the part `module` (a copy's
    architecture is enough), reused where it fits."""
    if module:
        sub = submodule(model, module)
        if analysis is not None and analysis.same_architecture(sub) and not isinstance(analysis.graph, Exception):
            return Part(module, analysis.input_shape), analysis
        part = find_part(model, input_shape, module)
        return part, ModelAnalysis(sub, part.input_shape)
    whole = analysis if analysis is not None and analysis.same_architecture(model) else ModelAnalysis(model, tuple(input_shape))
    part = find_part(model, input_shape, module, traced=not isinstance(whole.graph, Exception))
    return part, ModelAnalysis(part.of(model), part.input_shape) if part.name else whole
