"""`prune_model_`: choose dead kernels, mask them, remove what can go exactly, check; `sweep` over thresholds."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gaborprune.errors import PruneError
from gaborprune.prune.analysis import ModelAnalysis
from gaborprune.prune.graph import analyse_channels
from gaborprune.prune.part import analysed_part, flat_outputs
from gaborprune.prune.plan import PrunePlan, apply_plan_
from gaborprune.prune.report import LayerChange, PruneReport, layer_shapes
from gaborprune.prune.select import PruneSpec, select_kernels
from gaborprune.prune.structured import clear_removed_, dead_units, zero_units_
from gaborprune.summary import summarize

#: Compacted vs masked outputs may differ by float32 rounding only; more than this is a bug.
EXACT_TOLERANCE = 1e-4
#: A layer doing less than this share of the model's MACs cannot buy much latency.
THIN_SHARE = 0.02


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, input_shape: tuple[int, int, int]) -> tuple[float, float]:
    """Largest |a(x) - b(x)| and largest |a(x)| on random inputs, both models in eval mode, over every
    tensor of the outputs (`flat_outputs`; outputs of other shapes differ by infinity)."""
    param = next(a.parameters())
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(1)).to(param.device, param.dtype)
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        ya, yb = flat_outputs(a(x)), flat_outputs(b(x))
    finally:
        a.train(modes[0]), b.train(modes[1])
    if [t.shape for t in ya] != [t.shape for t in yb]:
        return math.inf, 0.0
    diff = max((float((u.double() - v.double()).abs().max()) for u, v in zip(ya, yb) if u.numel()), default=0.0)
    return diff, max((float(u.abs().max()) for u in ya if u.numel()), default=0.0)


def _warnings(changes: list[LayerChange], before, total_macs: int) -> list[str]:
    notes = []
    macs = {layer.name: layer.macs for layer in before.layers}
    for c in changes:
        if c.channels_after != c.channels_before and c.channels_after % 4:
            notes.append(f"'{c.name}' keeps {c.channels_after} output channels, not a multiple of 4 or 8: vectorised kernels "
                         "pad channels to those, so part of the saving may not show as speed")
        elif c.channels_after != c.channels_before and c.channels_after % 8:
            notes.append(f"'{c.name}' keeps {c.channels_after} output channels, a multiple of 4 but not of 8")
        share = macs.get(c.name, 0) / total_macs if total_macs else 0.0
        if c.type == "gabor" and c.kernels_after < c.kernels_before and share < THIN_SHARE:
            notes.append(f"'{c.name}' does only {share:.1%} of the model's MACs: removing its kernels cannot buy much latency")
    return notes


def _loses_all_outputs(model: nn.Module, name: str, sides: dict[str, list[int]]) -> bool:
    m = model.get_submodule(name)
    return hasattr(m, "out_channels") and len(set(sides.get("out", []))) == m.out_channels


def _as_data(folds) -> tuple[dict, ...]:
    return tuple({"module": f.module, "attr": f.attr, "delta": f.delta.tolist()} for f in folds)


def prune_model_(model: nn.Module, input_shape: tuple[int, int, int], spec: PruneSpec = PruneSpec(), analysis: ModelAnalysis | None = None,
                 scores: dict[str, float] | None = None) -> PruneReport:
    """Prune the Gabor banks of `model` (inputs [N, *input_shape]) in place. The report's `step`
    is what a recipe records of it: `recipe = recipe.with_step(report.step)`.

    Steps: choose the kernels to keep (`select_kernels`), mask the others, find the channels that
    can go exactly (`analyse_channels`: dead output channels, and channels that only dead input
    columns read, with their producers' kernels), fold their constants, cut them out (`apply_plan_`),
    and check that the compacted model computes what the masked one did. The graph is traced once
    (`analysis`, a `ModelAnalysis` of `model` or of a model of its architecture, or with `spec.module`
    of that module, is reused when given).
    A model that torch.fx cannot trace whole (a detector) is analysed in its part `spec.module`
    (default: its `backbone`; `gaborprune.prune.part`), exactly: the report's names are the whole
    model's, and its counts (`before`, `after`) are the whole model's.
    `scores`: with `spec.importance` "taylor", each channel's importance
    (`gaborprune.prune.importance.taylor_scores` of `model` on labelled training batches).

    Raises:
        PruneError: bad criterion, no Gabor banks, a layer would lose every kernel, or (a bug) the
            compacted model's output differs from the masked model's; `model` may then be half-pruned,
            so reload it.
    """
    shape = tuple(input_shape)
    part, analysis = analysed_part(model, shape, spec.module, analysis)
    if not part.name:
        return _prune(model, shape, spec, analysis, scores)
    inner = {k.removeprefix(part.name + "."): v for k, v in scores.items() if k.startswith(part.name + ".")} if scores is not None else None
    before = summarize(model, shape)
    report = _prune(part.of(model), part.input_shape, spec, analysis, inner)
    return report.within(part.name, before, summarize(model, shape))


def _prune(model: nn.Module, shape: tuple[int, int, int], spec: PruneSpec, analysis: ModelAnalysis, scores: dict[str, float] | None) -> PruneReport:
    """`prune_model_` on a model the channel analysis reads whole."""
    if spec.importance == "taylor" and spec.ratio is None:
        raise PruneError("`importance` taylor ranks the channels a `ratio` removes (or a target's search); give `ratio`, or drop `importance`")
    if spec.importance == "taylor" and scores is None:
        raise PruneError("`importance` taylor ranks channels by their loss change on training batches: pass `scores` "
                         "(gaborprune.taylor_scores(model, input_shape, batches)), or give `data` to the workflow")
    keep = select_kernels(model, shape, spec, analysis)
    before = summarize(model, shape, analysis.norms)
    shapes_before = layer_shapes(model)
    kernels = {n: torch.nonzero(~k).tolist() for n, k in keep.items()}
    masked = apply_plan_(copy.deepcopy(model), PrunePlan(kernels=kernels))
    zeroed, folds = [], []
    if spec.scope == "all":
        zeroed, _, norms = dead_units(masked, shape, spec.threshold, spec.round_to, analysis, spec.ratio,
                                      scores if spec.importance == "taylor" else None)
        masks = zero_units_(masked, zeroed, norms)
        interior = analyse_channels(masked, shape, plain=True, interior=True, analysis=analysis)
        folds = interior.folds  # the removed channels' constants, exact away from zero-padded readers' borders
        apply_plan_(masked, PrunePlan(folds=_as_data(folds)))
        for bank, pairs in clear_removed_(masked, interior.remove).items():
            masks[bank] |= pairs
        for bank, pairs in masks.items():
            kernels[bank] = [list(p) for p in sorted(set(map(tuple, kernels.get(bank, []))) | pairs)]

    channels = analyse_channels(masked, shape, plain=spec.scope == "all", analysis=analysis)
    whole = {n for n, sides in channels.remove.items() if n in channels.constants or _loses_all_outputs(masked, n, sides)}
    channels.kept = [k for k in channels.kept if k.layer not in whole]  # a layer removed whole keeps nothing
    for u in zeroed:  # every zeroed channel must go, or the plan would not replay what was done
        g = u.groups[u.side]
        layer, kernels_of = g.members[0]
        index = kernels_of[0][0] if g.kind == "out" else kernels_of[0][1]
        if index not in channels.remove.get(layer, {}).get(g.kind, []):
            raise PruneError(f"channel {index} ({g.kind}) of '{layer}' was zeroed but cannot be removed (a gaborprune bug; please report it with the model)")
    # the folds go into the plan, so that the plan alone, replayed on these weights, gives this model
    plan = PrunePlan(kernels, channels.remove, spec.to_dict(), _as_data(folds + channels.folds), channels.constants)
    apply_plan_(model, plan)
    diff, scale = _max_abs_diff(masked, model, shape)
    if not diff <= EXACT_TOLERANCE * max(1.0, scale):
        raise PruneError(f"compaction changed the model's output by {diff:.3g} (a gaborprune bug; please report it with the model); nothing was saved")

    after = summarize(model, shape)  # surgery changed the architecture: its own probe
    shapes_after = layer_shapes(model)
    changes = []
    for name, b in shapes_before.items():
        a = shapes_after[name]
        if b.type == "gabor" or a != b:
            changes.append(LayerChange(name, b.type, b.kernels, a.kernels, b.out_channels, a.out_channels, b.in_channels, a.in_channels))
    warnings = _warnings(changes, before, before.macs)
    if channels.note:
        warnings.insert(0, channels.note)
    return PruneReport(spec, plan, changes, before, after, channels.kept, diff, warnings)


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    kernels_kept: int  # over all Gabor banks
    kernels_total: int
    params: int
    macs: int
    accuracy: float  # top-1 percent


def sweep(model: nn.Module, input_shape: tuple[int, int, int], thresholds: list[float],
          accuracy: Callable[[nn.Module, PruneReport], float], spec: PruneSpec = PruneSpec()) -> list[SweepPoint]:
    """Prune a copy of `model` at each threshold (the rest of `spec` as given: scope, rounding) and
    measure `accuracy(pruned copy, its report)`, which may fine-tune the copy first. `model` is untouched."""
    points = []
    analysis = ModelAnalysis(model, input_shape)  # every copy has the model's architecture: one trace
    for t in thresholds:
        m = copy.deepcopy(model)
        report = prune_model_(m, input_shape, dataclasses.replace(spec, threshold=t), analysis)
        gabor = report.gabor_layers
        points.append(SweepPoint(t, sum(c.kernels_after for c in gabor), sum(c.kernels_before for c in gabor),
                                 report.after.params, report.after.macs, accuracy(m, report)))
    return points
