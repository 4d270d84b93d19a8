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

    @property
    def side(self) -> str:
        """The side the unit is measured and removed by (see the module doc)."""
        return "out" if "out" in self.strengths else "in"

    @property
    def strength(self) -> float:
        return self.strengths[self.side]


def default_round_to() -> int | None:
    """This CPU's ONNX Runtime channel block (`gaborprune.export.search.cpu_block`), None when unknown."""
    from gaborprune.export.search import cpu_block

    return cpu_block() or None


def units(sparsity) -> list[Unit]:
    """The units of a `GaborSparsity(..., "channel", "all")`, in the order their groups were found."""
    relative = sparsity.relative_group_strengths()
    position: dict[str, int] = defaultdict(int)
    sides: dict[int, dict[str, tuple[ChannelGroup, float]]] = {}
    for g in sparsity.groups.groups:
        k = position[g.label]
        position[g.label] += 1
        sides.setdefault(g.unit, {})[g.kind] = (g, float(relative[g.label][k]))
    return [Unit({kind: g for kind, (g, _) in s.items()}, {kind: v for kind, (_, v) in s.items()}, (s.get("out") or s["in"])[0].label)
            for s in sides.values()]


def dead_units(model: nn.Module, input_shape: tuple[int, int, int], threshold: float,
               round_to: int | None) -> tuple[list[Unit], dict, dict[str, str]]:
    """The units `prune --scope all` removes (see the module doc), {set: [kept, total]}, and
    {convolution: its direct BatchNorm} from the same graph analysis (what `zero_units_` needs)."""
    from gaborprune.sparsity import GaborSparsity

    sparsity = GaborSparsity(model, input_shape, "channel", "all")
    found = units(sparsity) if sparsity.groups is not None else []
    if not found:
        why = "; ".join(sparsity.groups.reasons()) if sparsity.groups is not None else ""
        raise PruneError(f"no channel of this model can be removed exactly{' (' + why + ')' if why else ''}; prune its Gabor banks with `scope` banks")
    sets: dict[str, list[Unit]] = defaultdict(list)
    for u in found:
        sets[u.set].append(u)
    branches = set(sparsity.groups.branches)
    whole = sparsity.relative_branch_strengths()
    step = round_to or 1
    dead, counts = [], {}
    for label, members in sets.items():
        ranked = sorted(members, key=lambda u: -u.strength)  # strongest first; sorted is stable
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
    constants `clear_removed_` clears once they are folded). Returns the Gabor kernels masked, {bank: {(o, i)}}."""
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


#: The thresholds `prune_all_to_target_` chooses from, in increasing order of what they remove (a
#: branch near the median goes only above about 0.5).
TARGET_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class ThresholdCandidate:
    """One threshold of `prune_all_to_target_`: what it removes, and its measured time."""

    threshold: float
    mac_ratio: float  # MACs after / before
    branches: list[str]  # residual branches removed whole
    measured: object  # Interval, ms per run
    speedup: object  # Interval of the unpruned model's time / this one's, per round
    meets: bool

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "mac_ratio": self.mac_ratio, "branches": self.branches,
                "measured_ms": self.measured.to_dict(), "speedup": self.speedup.to_dict(), "meets": self.meets}


@dataclass
class ScopeTargetReport:
    """What `prune_all_to_target_` measured and chose (`chosen` None: nothing; `message` says why)."""

    target: object  # TargetSpec
    batch_size: int
    threads: int
    round_to: int | None
    candidates: list[ThresholdCandidate]
    chosen: float | None = None
    prune: object | None = None  # the PruneReport of the chosen threshold
    message: str | None = None

    @property
    def step(self):
        """The PruneStep a recipe records (None when nothing was pruned)."""
        return self.prune.step if self.prune is not None else None

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "batch_size": self.batch_size, "threads": self.threads, "round_to": self.round_to,
                "chosen_threshold": self.chosen, "message": self.message, "candidates": [c.to_dict() for c in self.candidates]}


def prune_all_to_target_(model: nn.Module, input_shape: tuple[int, int, int], *, speedup: float | None = None,
                         latency_ms: float | None = None, batch_size: int = 1, threads: int = 1, round_to: int | None = None,
                         timer=None, thresholds: tuple[float, ...] = TARGET_THRESHOLDS) -> ScopeTargetReport:
    """`prune --scope all --speedup X` (or `--latency-ms T`): the lowest threshold whose pruned model
    meets the measured target, so that the least is removed that reaches it.

    Each candidate is an ordinary `--scope all` prune at one of `thresholds`, exported as plain dense
    ONNX and timed with ONNX Runtime interleaved with the unpruned export (`gaborprune.prune.target
    .OrtTimer`); the target counts as met by the whole 95% interval, as in `prune_to_target`. The
    thresholds are searched by bisection (what a threshold removes grows with it), after checking
    that the highest one meets the target at all. On success `model` is pruned in place and the
    report's `step` is what a recipe records of it (`recipe.with_step(report.step)`); otherwise
    `model` is left as it was, `step` is None and `message` says why.
    """
    import copy

    from gaborprune.export.stats import median_interval, paired_ratio
    from gaborprune.prune.run import prune_model_
    from gaborprune.prune.select import PruneSpec
    from gaborprune.prune.target import OrtTimer, TargetSpec
    from gaborprune.summary import summarize

    target = TargetSpec(speedup, latency_ms)
    shape = input_shape
    timer = timer if timer is not None else OrtTimer(model, shape, batch_size, threads)
    base_macs = summarize(model, shape).macs
    report = ScopeTargetReport(target, batch_size, threads, round_to, [])
    tried: dict[int, ThresholdCandidate] = {}

    def measure(k: int) -> bool:
        work = copy.deepcopy(model)
        pruned = prune_model_(work, shape, PruneSpec(threshold=thresholds[k], scope="all", round_to=round_to))
        base, cand = timer.time(work)
        measured, ratio = median_interval(cand), paired_ratio(base, cand)
        meets = ratio.low >= target.speedup if target.speedup is not None else measured.high <= target.latency_ms
        tried[k] = ThresholdCandidate(thresholds[k], pruned.after.macs / base_macs, sorted(pruned.plan.constants), measured, ratio, meets)
        return meets

    top = len(thresholds) - 1
    if not measure(top):
        c = tried[top]
        best = f"at most {c.speedup.median:.2f}x" if target.speedup is not None else f"at best {c.measured.median:.3g} ms"
        report.message = f"target {target.describe()} not reachable: {best} at threshold {thresholds[top]:g} (MAC ratio {c.mac_ratio:.2f})"
    else:
        lo, hi = -1, top  # lo fails (or is the unpruned model), hi meets
        while hi - lo > 1:
            k = (lo + hi) // 2
            if measure(k):
                hi = k
            else:
                lo = k
        report.chosen = thresholds[hi]
        report.prune = prune_model_(model, shape, PruneSpec(threshold=thresholds[hi], scope="all", round_to=round_to))
    report.candidates = [tried[k] for k in sorted(tried)]
    return report
