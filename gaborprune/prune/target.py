"""Pruning to a measured target: `prune --speedup X` or `prune --latency-ms T`.

The channel groups of the Gabor banks (`gaborprune.prune.groups`) are ranked weakest first, by the
measure the channel pressure uses (`gaborprune.sparsity`: the L2 norm of the members' relative
kernel strengths). Candidate k removes the k weakest groups: their kernels are masked and the model
is compacted by the normal `prune_model_` path, so each candidate is an exact, replayable prune.

Time falls as k grows, so the smallest k that meets the target is found by bisection over k, each
step exporting the candidate as plain dense ONNX and timing it with ONNX Runtime interleaved with
the unpruned model's plain dense export (`gaborprune.export.search.measure`). The target counts as
met only when the whole 95% interval says so: the interval's low bound of the per-round speedup
reaches X, or the interval's high bound of the candidate's milliseconds is within T.

Before any candidate is timed, each one's time is predicted from a per-layer cost model: ONNX
Runtime's profile of the unpruned export, each convolution's (and linear layer's) time scaled by the
fraction of its input x output channels the candidate keeps, everything else unchanged; the ratio
to the profile's total, times the measured baseline, is the prediction. The bisection starts at the
first k predicted to meet the target, and the report shows prediction and measurement side by side.

ONNX Runtime's blocked convolutions work on blocks of channels (`search.cpu_block`); a count off the
block can cost time. So the k values that leave every changed channel count at a multiple of the
block are timed too, below the bisection's answer, and the smallest k that meets the target wins.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from gaborprune._validate import check_finite, check_int, check_threads
from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import PruneError
from gaborprune.prune.groups import ChannelGroup
from gaborprune.prune.plan import PruneStep
from gaborprune.prune.report import PruneReport
from gaborprune.prune.select import PruneSpec

#: Candidates timed at most (each is an export and an interleaved timing against the baseline).
MAX_CANDIDATES = 8
#: Of those, kept for k values whose channel counts are multiples of the CPU's block.
ALIGNED_TRIES = 2
#: Seconds of timing after which no further candidate is started.
MAX_SECONDS = 120.0


@dataclass(frozen=True)
class TargetSpec:
    """What `prune_to_target_` aims for: one of `speedup` (times the unpruned model's speed, > 1) or
    `latency_ms` (milliseconds per run at the timing batch, > 0)."""

    speedup: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if (self.speedup is None) == (self.latency_ms is None):
            raise PruneError("give one target: `speedup` X or `latency_ms` T")
        if self.speedup is not None:
            check_finite(self.speedup, "`speedup`", PruneError)
            if not self.speedup > 1:
                raise PruneError(f"`speedup` must be above 1 (times the unpruned model's speed, e.g. 1.2), not {self.speedup!r}")
        else:
            check_finite(self.latency_ms, "`latency_ms`", PruneError)
            if not self.latency_ms > 0:
                raise PruneError(f"`latency_ms` must be above 0 (milliseconds per run), not {self.latency_ms!r}")

    def describe(self) -> str:
        return f"{self.speedup:g}x" if self.speedup is not None else f"{self.latency_ms:g} ms"

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "latency_ms": self.latency_ms}


class Timer(Protocol):
    """Where the times come from (ONNX Runtime by default; tests inject their own)."""

    def profile(self, layers: list[str]) -> dict[str, float]:
        """The unpruned model's milliseconds per run in each of `layers` (and whatever else runs)."""

    def time(self, candidate: nn.Module) -> tuple[list[float], list[float]]:
        """Interleaved milliseconds per run of (the unpruned model, `candidate`), paired run by run."""


class OrtTimer:
    """ONNX Runtime on the CPU: plain dense exports at a static batch, `threads` intra-op threads."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], batch_size: int, threads: int) -> None:
        from gaborprune.export.search import Form, Lowerings

        self.input_shape, self.batch_size, self.threads = input_shape, batch_size, threads
        self.baseline = Lowerings(model, input_shape, batch_size).onnx(Form())
        self.x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).numpy()

    def profile(self, layers: list[str]) -> dict[str, float]:
        import onnx

        from gaborprune.export.runtime import profile

        return profile(self.baseline, onnx.load_from_string(self.baseline), self.x, layers, self.threads)

    def time(self, candidate: nn.Module) -> tuple[list[float], list[float]]:
        from gaborprune.export.runtime import session
        from gaborprune.export.search import Form, Lowerings, measure

        blob = Lowerings(candidate, self.input_shape, self.batch_size).onnx(Form())
        base, cand = measure([session(self.baseline, self.threads), session(blob, self.threads)], self.x)
        return base, cand


@dataclass
class TargetCandidate:
    """One k: its channel counts, its predicted time and, when timed, its measured time.

    `channels`: {layer: [out, in]} of the convolutions and linear layers whose counts change."""

    k: int
    groups: dict[str, int]  # {group label: groups removed}
    channels: dict[str, list[int]]
    predicted_ratio: float  # predicted time / the unpruned model's (from the profile)
    aligned: bool = False  # every changed channel count a multiple of the CPU's block
    predicted_ms: float | None = None
    measured: object | None = None  # Interval, ms per run
    speedup: object | None = None  # Interval of the unpruned model's time / this one's, per round
    meets: bool | None = None

    @property
    def predicted_speedup(self) -> float:
        return 1 / self.predicted_ratio if self.predicted_ratio > 0 else math.inf

    def to_dict(self) -> dict:
        return {"k": self.k, "groups": self.groups, "channels": self.channels, "aligned": self.aligned,
                "predicted_ms": self.predicted_ms, "predicted_speedup": self.predicted_speedup,
                "measured_ms": None if self.measured is None else self.measured.to_dict(),
                "speedup": None if self.speedup is None else self.speedup.to_dict(), "meets": self.meets}


@dataclass
class TargetReport:
    """What `prune_to_target_` measured and chose.

    `chosen` is None when nothing was pruned; `message` then says why in one line. `candidates`
    holds the timed candidates in k order; `prune` is the `prune_model_` report of the chosen k."""

    target: TargetSpec
    batch_size: int
    threads: int
    block: int
    groups: int  # channel groups found
    k_max: int  # the groups that are candidates (see `_layouts`), weakest first
    baseline: object | None  # Interval, ms per run of the unpruned model (all its interleaved runs)
    candidates: list[TargetCandidate] = field(default_factory=list)
    chosen: int | None = None
    prune: PruneReport | None = None
    message: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def chosen_candidate(self) -> TargetCandidate | None:
        return next((c for c in self.candidates if c.k == self.chosen), None)

    @property
    def step(self) -> PruneStep | None:
        """What a recipe records of the chosen prune (None when nothing was pruned)."""
        return self.prune.step if self.prune is not None else None

    @property
    def removed(self) -> dict[str, int]:
        """{group label: groups removed} of the chosen k ({} when nothing was pruned)."""
        c = self.chosen_candidate
        return dict(c.groups) if c is not None else {}

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "batch_size": self.batch_size, "threads": self.threads, "block": self.block,
                "groups": self.groups, "k_max": self.k_max, "baseline_ms": None if self.baseline is None else self.baseline.to_dict(),
                "chosen": self.chosen, "groups_removed": self.removed, "message": self.message, "notes": self.notes,
                "candidates": [c.to_dict() for c in self.candidates]}


def rank_groups(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[ChannelGroup], list[float]]:
    """The channel groups, weakest first (ties in model order), with their strengths.

    Raises:
        PruneError: the model has no Gabor bank, or its banks have no channel group.
    """
    from gaborprune.sparsity import GaborSparsity

    sparsity = GaborSparsity(model, input_shape, structure="channel")
    if not sparsity:
        raise PruneError("the model has no Gabor banks to prune; convert some layers first "
                         "(gaborprune convert SOURCE --layers 2 -o gabor.pt), fine-tune with `sparsity`, then prune")
    if not sparsity.groups.groups:
        why = "; ".join(sparsity.groups.reasons()) or "no channel of a Gabor bank can go on its own"
        raise PruneError(f"no channel groups to remove ({why}); prune with `threshold`, `ratio` or `keep` instead")
    relative = sparsity.relative_strengths()
    strengths = {label: f.strength(relative).tolist() for label, f in sparsity.families.items()}
    seen: dict[str, int] = {}
    ranked = []
    for position, g in enumerate(sparsity.groups.groups):
        index = seen[g.label] = seen.get(g.label, -1) + 1
        ranked.append((float(strengths[g.label][index]), position, g))
    ranked.sort(key=lambda t: t[:2])
    return [g for _, _, g in ranked], [s for s, _, _ in ranked]


def _mask_(model: nn.Module, groups: list[ChannelGroup]) -> None:
    from gaborprune.prune.plan import PrunePlan, apply_plan_

    kernels: dict[str, list[list[int]]] = {}
    for g in groups:
        for bank, members in g.members:
            kernels.setdefault(bank, []).extend([o, i] for o, i in members)
    apply_plan_(model, PrunePlan(kernels=kernels))


def _counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) channels of every convolution and linear layer."""
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, GaborConv2d)):
            counts[name] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            counts[name] = (m.out_features, m.in_features)
    return counts


def _layouts(model: nn.Module, input_shape: tuple[int, int, int], ranked: list[ChannelGroup]) -> tuple[list[ChannelGroup], list[dict[str, list[int]]]]:
    """The groups worth removing, in rank order, and for k = 0, 1, ... the changed channel counts
    {layer: [out, in]} after removing the first k of them. A group is skipped when its removal
    (after the weaker ones) would remove no further channel (its time is already saved, or its
    channel stays for a reason `analyse_channels` gives), or would leave a Gabor bank without a
    kernel or a layer without a channel."""
    from gaborprune.prune.graph import analyse_channels

    base = _counts(model)
    work = copy.deepcopy(model)
    usable: list[ChannelGroup] = []
    layouts: list[dict[str, list[int]]] = [{}]
    for g in ranked:
        trial = copy.deepcopy(work)
        _mask_(trial, [g])
        if any(not bool((m.mask != 0).any()) for m in trial.modules() if isinstance(m, GaborConv2d)):
            continue
        remove = analyse_channels(trial, input_shape).remove
        changed = {}
        for name, (o, i) in base.items():
            cut = remove.get(name, {})
            now = (o - len(cut.get("out", [])), i - len(cut.get("in", [])))
            if now != (o, i):
                changed[name] = list(now)
        if any(min(c) < 1 for c in changed.values()) or changed == layouts[-1]:
            continue
        work = trial
        usable.append(g)
        layouts.append(changed)
    return usable, layouts


def _predict(profile: dict[str, float], base: dict[str, tuple[int, int]], changed: dict[str, list[int]]) -> float:
    """The predicted time as a fraction of the profile's total (see the module doc)."""
    total = sum(profile.values())
    if total <= 0:
        return 1.0
    ms = 0.0
    for layer, t in profile.items():
        if layer in changed:
            (o, i), (o2, i2) = base[layer], changed[layer]
            t *= (o2 * i2) / (o * i)
        ms += t
    return ms / total


def _aligned(base: dict[str, tuple[int, int]], changed: dict[str, list[int]], block: int) -> bool:
    """Whether every channel count that changes is a multiple of `block` (and something changes)."""
    counts = [now for layer, counts in changed.items() for now, was in zip(counts, base[layer]) if now != was]
    return bool(counts) and all(c % block == 0 for c in counts)


def _compact(model: nn.Module, input_shape: tuple[int, int, int], groups: list[ChannelGroup]) -> PruneReport:
    """Mask `groups` and prune exactly those kernels the normal way (threshold 0 keeps every present
    kernel), so the recipe records an ordinary, replayable plan."""
    from gaborprune.prune.report import layer_shapes
    from gaborprune.prune.run import prune_model_
    from gaborprune.summary import summarize

    before, shapes = summarize(model, input_shape), layer_shapes(model)
    _mask_(model, groups)
    report = prune_model_(model, input_shape, PruneSpec(threshold=0.0))
    # prune_model saw the masked model: its "before" must be the model as it came in
    report.before = before
    report.layers = [replace(c, kernels_before=shapes[c.name].kernels) for c in report.layers]
    return report


def _labels(groups: list[ChannelGroup]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.label] = counts.get(g.label, 0) + 1
    return counts


def prune_to_target_(model: nn.Module, input_shape: tuple[int, int, int], *, speedup: float | None = None,
                     latency_ms: float | None = None, batch_size: int = 1, threads: int = 1, max_seconds: float = MAX_SECONDS,
                     max_candidates: int = MAX_CANDIDATES, timer: Timer | None = None) -> TargetReport:
    """Remove the fewest weakest channel groups that meet the measured target (see the module doc).

    On success `model` (inputs [N, *input_shape]) is pruned in place through `prune_model_`, and the
    report's `step` is what a recipe records of it. When the target cannot be met (even with every
    removable group gone), or the unpruned model already meets a latency target, `model` is left as
    it was, `step` is None and the report's `message` says so in one line.

    Args:
        speedup: times the unpruned model's speed (> 1), by the low end of the 95% interval.
        latency_ms: milliseconds per run at `batch_size` (> 0), by the high end of the 95% interval.
        batch_size, threads: the ONNX Runtime settings timed.
        max_seconds: no new candidate is timed after this long; the best measured one is chosen.
        max_candidates: candidates timed at most.
        timer: where timings come from (default `OrtTimer`).

    Raises:
        PruneError: a bad target or setting, no Gabor banks or no channel groups.
    """
    target = TargetSpec(speedup, latency_ms)
    check_int(batch_size, "the timing batch size", error=PruneError)
    check_threads(threads, error=PruneError)
    check_int(max_candidates, "`max_candidates`", minimum=1, error=PruneError)
    if not check_finite(max_seconds, "`max_seconds`", PruneError) > 0:
        raise PruneError(f"`max_seconds` must be above 0, not {max_seconds!r}")
    from gaborprune.export.search import cpu_block
    from gaborprune.export.stats import median_interval, paired_ratio

    shape = tuple(input_shape)
    groups, _ = rank_groups(model, shape)
    ranked, layouts = _layouts(model, shape, groups)
    k_max = len(ranked)
    block = cpu_block()
    report = TargetReport(target, batch_size, threads, block, len(groups), k_max, None)
    if k_max < 1:
        raise PruneError(f"removing any channel group would empty a Gabor bank ({len(groups)} groups); "
                         "prune with `threshold`, `ratio` or `keep` instead")
    if k_max < len(groups):
        report.notes.append(f"{len(groups) - k_max} of the {len(groups)} channel groups are not candidates: after the weaker ones, each would "
                            "remove no further channel, or leave a Gabor bank or a layer empty")

    timer = timer if timer is not None else OrtTimer(model, shape, batch_size, threads)
    base_counts = _counts(model)
    profile = timer.profile(sorted(base_counts))
    candidates = {k: TargetCandidate(k, _labels(ranked[:k]), layouts[k], _predict(profile, base_counts, layouts[k]),
                                     aligned=block > 1 and _aligned(base_counts, layouts[k], block))
                  for k in range(1, k_max + 1)}
    baseline: list[float] = []
    base_ms: list[float] = []  # the baseline's median at its first timing: the scale of every prediction
    start = time.perf_counter()

    def measure(k: int) -> bool:
        c = candidates[k]
        work = copy.deepcopy(model)
        _compact(work, shape, ranked[:k])
        base, cand = timer.time(work)
        baseline.extend(base)
        if not base_ms:
            base_ms.append(median_interval(base).median)
            for other in candidates.values():
                other.predicted_ms = base_ms[0] * other.predicted_ratio
        c.measured, c.speedup = median_interval(cand), paired_ratio(base, cand)
        c.meets = c.speedup.low >= target.speedup if target.speedup is not None else c.measured.high <= target.latency_ms
        return c.meets

    def timed() -> int:
        return sum(c.measured is not None for c in candidates.values())

    def finish() -> TargetReport:
        report.candidates = [c for c in candidates.values() if c.measured is not None]
        report.baseline = median_interval(baseline) if baseline else None
        return report

    if not measure(k_max):  # the most that can go: is the target reachable at all?
        top = candidates[k_max]
        share = _gabor_share(model, profile)
        bound = f"; the Gabor banks take {share:.0%} of the unpruned model's time" if share is not None else ""
        s, ms = top.speedup, top.measured
        best = (f"at most {s.median:.2f}x [{s.low:.2f}-{s.high:.2f}]" if target.speedup is not None
                else f"at best {ms.median:.3g} ms [{ms.low:.3g}-{ms.high:.3g}]")
        every = "every group" if k_max == len(groups) else f"{k_max} of {len(groups)} groups (all that can go)"
        report.message = (f"target {target.describe()} not reachable: {best} with {every} removed{bound}; "
                          "the rest of the time is in layers that are not Gabor banks (convert more layers, or aim lower)")
        return finish()
    if target.latency_ms is not None:
        base = median_interval(baseline)
        if base.high <= target.latency_ms:
            report.message = (f"the unpruned model already runs in {base.median:.3g} ms [{base.low:.3g}-{base.high:.3g}] "
                              f"at batch {batch_size}, within `latency_ms` {target.latency_ms:g}; nothing to prune")
            return finish()

    aligned = sorted(k for k, c in candidates.items() if c.aligned and k < k_max)
    budget = max_candidates - (min(ALIGNED_TRIES, len(aligned)) if aligned else 0)
    lo, hi = 0, k_max  # lo fails (k = 0 is the unpruned model itself), hi meets
    guess = next((k for k, c in candidates.items() if c.predicted_speedup >= target.speedup), None) if target.speedup is not None else \
        next((k for k, c in candidates.items() if c.predicted_ms <= target.latency_ms), None)
    while hi - lo > 1:
        if timed() >= budget or time.perf_counter() - start > max_seconds:
            report.notes.append(f"the search stopped after {timed()} candidates (budget); k between {lo + 1} and {hi - 1} was not timed")
            break
        k = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
        guess = None
        if measure(k):
            hi = k
        else:
            lo = k
    # a block-aligned count can beat the monotone trend: time the aligned k just below the answer
    for k in sorted((k for k in aligned if k < hi and candidates[k].measured is None), reverse=True)[:ALIGNED_TRIES]:
        if timed() >= max_candidates or time.perf_counter() - start > max_seconds:
            break
        measure(k)
    chosen = min(k for k, c in candidates.items() if c.meets)
    report.chosen = chosen
    report.prune = _compact(model, shape, ranked[:chosen])
    return finish()


def _gabor_share(model: nn.Module, profile: dict[str, float]) -> float | None:
    """The Gabor banks' share of the profiled time, None when none shows."""
    banks = [n for n, m in model.named_modules() if isinstance(m, GaborConv2d)]
    total = sum(profile.values())
    ms = sum(t for layer, t in profile.items() if any(layer == b or layer.startswith(b + ".") for b in banks))
    return ms / total if total > 0 and ms > 0 else None

