"""`prune --scope all`: remove whole channels of every convolution, weakest groups first.

A *unit* is one channel that can go exactly (`gaborprune.prune.groups` with scope "all"): its out
group (the rows of the convolutions that write it, plain ones measured by their BatchNorm gain) and
its in group (the columns of those that read it), whichever exist. A group's strength is the G of
`gaborprune.sparsity`, relative to the strongest of its family. A unit's strength is its out
group's when it has one (the BatchNorm gain measures what the channel carries), else its in
group's: a column's share of its reader says nothing of how large the channel it reads is, and
removing channels by it alone cost 33 points on resnet20 where the gains said keep them.

The channels of one *set* (the units whose out groups, or else in groups, share a family: one
layer's output channels, or a residual stream's) are counted together. With `round_to` the set keeps
a multiple of it (the strongest dead units are revived), because ONNX Runtime's blocked convolutions
run on channel blocks and a count off the block can cost more time than it saves
(docs/benchmarks.md). A set may lose all its channels only when it is the inside of a residual
branch, whose one reader's output is added to the stream (`GroupAnalysis.branches`): the branch
then becomes a constant (`gaborprune.prune.standins`) and its convolutions are gone. That happens
when its units are all dead, or when the branch as a whole is weaker than `threshold` x the
median branch (the root mean square of G over its channels; the median, so that one dominant
branch does not make the others look dead; the branch term of the pressure pushes whole branches
down). Any other set keeps at least one block.

A dead unit goes by that side. By its out side: the rows that write it are zeroed (Gabor
kernels masked, plain rows set to 0) with the producers' BatchNorm gains, so the channel holds its
BatchNorm shift, a constant; that constant is folded into its readers (`analyse_channels` with
`interior`: a zero-padded reader as if unpadded, so only its one-pixel border changes), and then
every channel that analysis removes is set to exactly 0 (`clear_removed_`). By its in side: the
columns that read it are zeroed. Either way the channel then holds exactly 0 or is unread, and is
removed exactly. This, with the border of zero-padded
readers, is where pruning changes the function (as removing weak kernels does); the folds go into
the plan, and compaction after it is exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import PruneError
from gaborprune.prune.groups import ChannelGroup
from gaborprune.prune.standins import ChannelConstant


@dataclass(frozen=True)
class Unit:
    """One removable channel: its groups and their relative strengths ({"out"|"in": ...}), and its set."""

    groups: dict[str, ChannelGroup]
    strengths: dict[str, float]  # G / the family's strongest, per side
    set: str  # the family label that counts this unit's channel
    absolute: float = 0.0  # G of its side, comparable across layers (an out group's: the BatchNorm gain)

    @property
    def side(self) -> str:
        """The side the unit is measured and removed by (see the module doc)."""
        return "out" if "out" in self.strengths else "in"

    @property
    def strength(self) -> float:
        return self.strengths[self.side]

    @property
    def key(self) -> str:
        """The unit's name, stable across analyses of one architecture: its side's first channel, e.g.
        'layer1.0.conv1 out 3' or 'fc in 12' (what importance scores are keyed by)."""
        g = self.groups[self.side]
        layer, kernels = g.members[0]
        return f"{layer} {g.kind} {kernels[0][0] if g.kind == 'out' else kernels[0][1]}"


def default_round_to() -> int | None:
    """This CPU's ONNX Runtime channel block (`gaborprune.cpu.cpu_block`), None when unknown."""
    from gaborprune import cpu

    return cpu.cpu_block() or None


def units(sparsity) -> list[Unit]:
    """The units of a `GaborSparsity(..., "channel", "all")`, in the order their groups were found."""
    absolute = sparsity.group_strengths()
    relative = {label: g / g.max().clamp_min(1e-30) for label, g in absolute.items()}
    position: dict[str, int] = defaultdict(int)
    sides: dict[int, dict[str, tuple[ChannelGroup, float, float]]] = {}
    for g in sparsity.groups.groups:
        k = position[g.label]
        position[g.label] += 1
        sides.setdefault(g.unit, {})[g.kind] = (g, float(relative[g.label][k]), float(absolute[g.label][k]))
    units = []
    for s in sides.values():
        side = s.get("out") or s["in"]
        units.append(Unit({kind: g for kind, (g, _, _) in s.items()}, {kind: v for kind, (_, v, _) in s.items()}, side[0].label, side[2]))
    return units


def dead_units(model: nn.Module, input_shape: tuple[int, int, int], threshold: float,
               round_to: int | None, analysis=None, ratio: float | None = None,
               scores: dict[str, float] | None = None) -> tuple[list[Unit], dict, dict[str, str]]:
    """The units `prune --scope all` removes (see the module doc), {set: [kept, total]}, and
    {convolution: its direct BatchNorm} from the same graph analysis (what `zero_units_` needs).
    `analysis`: a `ModelAnalysis` of `model`'s architecture to reuse. With `ratio`, that fraction of
    all units goes instead of those below `threshold`, the weakest first by G (`Unit.absolute`: for a
    channel written by a convolution, its BatchNorm gain, comparable across layers; ties in model
    order), or by `scores` when given ({`Unit.key`: importance}, e.g. `taylor_scores`); a residual
    branch then goes whole only when all its units are among them."""
    from gaborprune.sparsity import GaborSparsity

    sparsity = GaborSparsity(model, input_shape, "channel", "all", analysis=analysis)
    found = units(sparsity) if sparsity.groups is not None else []
    if not found:
        why = "; ".join(sparsity.groups.reasons()) if sparsity.groups is not None else ""
        raise PruneError(f"no channel of this model can be removed exactly{' (' + why + ')' if why else ''}; prune its Gabor banks with `scope` banks")
    sets: dict[str, list[Unit]] = defaultdict(list)
    for u in found:
        sets[u.set].append(u)
    branches = set(sparsity.groups.branches)
    whole = sparsity.relative_branch_strengths()
    if scores is not None and (missing := [u.key for u in found if u.key not in scores]):
        raise PruneError(f"the importance scores have no entry for channel '{missing[0]}'; compute them on this model")
    rank = (lambda u: scores[u.key]) if scores is not None else (lambda u: u.absolute)
    cut = {id(u) for u in sorted(found, key=rank)[:round(ratio * len(found))]} if ratio is not None else set()
    step = round_to or 1
    dead, counts = [], {}
    for label, members in sets.items():
        ranked = sorted(members, key=lambda u: -(rank(u) if ratio is not None else u.strength))  # strongest first; sorted is stable
        if ratio is not None:
            alive = sum(id(u) not in cut for u in members)
        else:
            alive = sum(u.strength >= threshold for u in members) if whole.get(label, 1.0) >= threshold else 0
        if alive % step:
            alive = min(len(members), alive + step - alive % step)
        if alive == 0 and label not in branches:
            alive = min(len(members), step)
        dead += ranked[alive:]
        counts[label] = [alive, len(members)]
    return dead, counts, sparsity.groups.norms


@torch.no_grad()
def zero_units_(model: nn.Module, dead: list[Unit], norms: dict[str, str]) -> dict[str, set[tuple[int, int]]]:
    """Zero each dead unit's side in `model` (see the module doc; the BatchNorm shifts stay, as the
    constants `clear_removed_` clears once they are folded, except before a zero-padded depthwise
    convolution, which no fold makes exact: `ChannelGroup.padded`). Returns the Gabor kernels
    masked, {bank: {(o, i)}}."""
    modules = dict(model.named_modules())
    masked: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for u in dead:
        g = u.groups[u.side]
        for layer, kernels in g.members:
            m = modules[layer]
            idx = torch.tensor(kernels, dtype=torch.long)
            if isinstance(m, GaborConv2d):
                m.mask[idx[:, 0], idx[:, 1]] = 0
                masked[layer] |= set(map(tuple, kernels))
            else:
                m.weight[idx[:, 0], idx[:, 1]] = 0
            if g.kind == "out":
                rows = sorted({o for o, _ in kernels})
                if m.bias is not None:
                    m.bias[rows] = 0
                norm = modules.get(norms.get(layer, ""))
                if norm is not None and norm.affine:
                    norm.weight[rows] = 0
                    if g.padded:  # a zero-padded depthwise convolution would carry act(shift) unevenly: the channel must carry 0
                        norm.bias[rows] = 0
    return masked


@torch.no_grad()
def clear_removed_(model: nn.Module, remove: dict[str, dict[str, list[int]]]) -> dict[str, set[tuple[int, int]]]:
    """Make every output channel in `remove` (an interior analysis's, whose constants are folded)
    hold exactly 0: the rows and biases of convolutions, the gains and shifts of BatchNorms, the
    values of stand-in constants. Returns the Gabor kernels masked, {bank: {(o, i)}}."""
    modules = dict(model.named_modules())
    masked: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for name, sides in remove.items():
        rows, m = sides.get("out", []), modules[name]
        if not rows:
            continue
        if isinstance(m, GaborConv2d):
            m.mask[rows] = 0
            masked[name] |= {(o, i) for o in rows for i in range(m.mask.shape[1])}
        elif isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and getattr(m, "weight", None) is not None:
            m.weight[rows] = 0
        elif isinstance(m, ChannelConstant):
            m.value[:, rows] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[rows] = 0
    return masked
