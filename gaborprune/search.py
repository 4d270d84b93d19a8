"""Pruning to a target: `prune --speedup X`, `--latency-ms T` or `--macs R`, one search for every scope.

A *family* of candidates (`Candidates`; `gaborprune.prune.candidates`) is an ordered list of exact,
replayable prunes, candidate k removing at least what k - 1 removes: the k weakest channel groups of
the Gabor banks (`scope` banks), or a growing share of all removable channels, weakest first
(`scope` all). Time falls as k grows, so the smallest k that meets the target is found by bisection
over k, after checking that the last candidate (the most that can go) meets it at all. For a speed
target each step prunes a copy of the model, exports it as plain dense ONNX and times it with ONNX
Runtime interleaved with the unpruned model's plain dense export (`gaborprune.export.search.measure`);
a MAC target is counted, not timed.

A speed target counts as met only when the whole 95% interval says so (`TargetSpec.met`): the
interval's low bound of the per-round speedup reaches X, or the interval's high bound of the
candidate's milliseconds is within T. A MAC target is met when the pruned model's MACs are at most
R times the unpruned model's.

When a family knows its candidates' channel counts before pruning them, each one's time is
predicted from a per-layer cost model: ONNX Runtime's profile of the unpruned export, each
convolution's (and linear layer's) time scaled by the fraction of its input x output channels the
candidate keeps, everything else unchanged; the ratio to the profile's total, times the measured
baseline, is the prediction. The bisection then starts at the first k predicted to meet the target,
and the report shows prediction and measurement side by side. ONNX Runtime's blocked convolutions
work on blocks of channels (`gaborprune.cpu.cpu_block`); a count off the block can cost time, so
the k values that leave every changed channel count at a multiple of the block are timed too, below
the bisection's answer, and the smallest k that meets the target wins.

This module sits above `gaborprune.prune` (the candidates and the surgery) and `gaborprune.export`
(the exports and the timing), so that neither imports the other.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from gaborprune import cpu
from gaborprune._validate import check_finite, check_int, check_threads
from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import PruneError
from gaborprune.export.stats import Interval, median_interval, paired_ratio
from gaborprune.prune.candidates import GroupCandidates, RatioCandidates, changed_counts, layer_counts
from gaborprune.prune.plan import PruneStep
from gaborprune.prune.report import PruneReport
from gaborprune.scopes import SCOPES

#: Candidates timed at most (each is an export and an interleaved timing against the baseline).
MAX_CANDIDATES = 8
#: Of those, kept for k values whose channel counts are multiples of the CPU's block.
ALIGNED_TRIES = 2
#: Seconds of timing after which no further candidate is started.
MAX_SECONDS = 120.0


@dataclass(frozen=True)
class TargetSpec:
    """What `prune_to_target_` aims for: one of `speedup` (times the unpruned model's speed, > 1),
    `latency_ms` (milliseconds per run at the timing batch, > 0) or `macs` (the pruned model's MACs
    over the unpruned model's, in (0, 1); counted, not timed); and/or `max_drop`, the top-1 points
    (on a validation split) the pruning may cost: the most pruning within it, the other target then
    a floor (`prune_within_`)."""

    speedup: float | None = None
    latency_ms: float | None = None
    macs: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        floors = sum(v is not None for v in (self.speedup, self.latency_ms, self.macs))
        if floors > 1 or (floors == 0 and self.max_drop is None):
            raise PruneError("give one target: `speedup` X, `latency_ms` T or `macs` R, and/or an accuracy budget `max_drop` P")
        if self.max_drop is not None:
            check_finite(self.max_drop, "`max_drop`", PruneError)
            if not 0 <= self.max_drop < 100:
                raise PruneError(f"`max_drop` must be in [0, 100) (top-1 points the pruning may cost, e.g. 1), not {self.max_drop!r}")
        if floors == 0:
            return
        if self.macs is not None:
            check_finite(self.macs, "`macs`", PruneError)
            if not 0 < self.macs < 1:
                raise PruneError(f"`macs` must be in (0, 1) (the pruned model's MACs over the unpruned model's, e.g. 0.5), not {self.macs!r}")
        elif self.speedup is not None:
            check_finite(self.speedup, "`speedup`", PruneError)
            if not self.speedup > 1:
                raise PruneError(f"`speedup` must be above 1 (times the unpruned model's speed, e.g. 1.2), not {self.speedup!r}")
        else:
            check_finite(self.latency_ms, "`latency_ms`", PruneError)
            if not self.latency_ms > 0:
                raise PruneError(f"`latency_ms` must be above 0 (milliseconds per run), not {self.latency_ms!r}")

    @property
    def timed(self) -> bool:
        """Whether the target (or the floor of an accuracy budget) is a measured time."""
        return self.speedup is not None or self.latency_ms is not None

    @property
    def floor(self) -> TargetSpec | None:
        """The speed or MAC part alone (None: an accuracy budget without a floor)."""
        if self.speedup is None and self.latency_ms is None and self.macs is None:
            return None
        return TargetSpec(self.speedup, self.latency_ms, self.macs)

    def met(self, candidate: TargetCandidate) -> bool:
        """Whether a candidate meets the speed or MAC part: by its whole 95% interval (ms per run, and
        speedup per round), or by its MAC ratio (True without one; `max_drop` is judged apart)."""
        if self.macs is not None:
            return candidate.mac_ratio is not None and candidate.mac_ratio <= self.macs
        if self.speedup is not None:
            return candidate.speedup.low >= self.speedup
        if self.latency_ms is not None:
            return candidate.measured.high <= self.latency_ms
        return True

    def describe(self) -> str:
        speed = (f"MAC ratio {self.macs:g}" if self.macs is not None else f"{self.speedup:g}x" if self.speedup is not None
                 else f"{self.latency_ms:g} ms" if self.latency_ms is not None else "")
        if self.max_drop is None:
            return speed
        budget = f"top-1 within {self.max_drop:g} point{'s' if self.max_drop != 1 else ''}"
        return f"{budget}, at least {speed}" if speed else budget

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "latency_ms": self.latency_ms, "macs": self.macs, "max_drop": self.max_drop}


class Timer(Protocol):
    """Where the times come from (ONNX Runtime by default; tests inject their own)."""

    def profile(self, layers: list[str]) -> dict[str, float]:
        """The unpruned model's milliseconds per run in each of `layers` (and whatever else runs);
        asked only of families that know their channel counts."""

    def time(self, candidate: nn.Module) -> tuple[list[float], list[float]]:
        """Interleaved milliseconds per run of (the unpruned model, `candidate`), paired run by run."""


class Candidates(Protocol):
    """An ordered family of prunes 1..len (see the module doc; `gaborprune.prune.candidates`)."""

    notes: list[str]

    def __len__(self) -> int: ...

    def describe(self) -> str:
        """The family, in words (a report's title)."""

    def everything(self) -> str:
        """What the last candidate removes, in words."""

    def label(self, k: int) -> str: ...

    def details(self, k: int) -> dict:
        """What candidate k removes, as JSON-able data."""

    def channels(self, k: int) -> dict[str, list[int]] | None:
        """{layer: [out, in]} of the layers candidate k changes, None when unknown before pruning."""

    def prune_(self, model: nn.Module, k: int) -> PruneReport:
        """Prune `model` (a copy of the model the family was made from) to candidate k in place."""


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
    """One candidate k: what it removes, its predicted time when known and, when timed, what it measured.

    `channels`: {layer: [out, in]} of the convolutions and linear layers whose counts change."""

    k: int
    label: str
    details: dict
    channels: dict[str, list[int]] | None
    predicted_ratio: float | None = None  # predicted time / the unpruned model's (from the profile)
    aligned: bool = False  # every changed channel count a multiple of the CPU's block
    predicted_ms: float | None = None
    mac_ratio: float | None = None  # MACs after / before, once pruned
    branches: list[str] = field(default_factory=list)  # residual branches removed whole
    measured: Interval | None = None  # ms per run
    speedup: Interval | None = None  # the unpruned model's time / this one's, per round
    meets: bool | None = None  # the speed or MAC part
    accuracy: float | None = None  # validation top-1 percent, with an accuracy budget
    within: bool | None = None  # within the budget

    @property
    def predicted_speedup(self) -> float | None:
        if self.predicted_ratio is None:
            return None
        return 1 / self.predicted_ratio if self.predicted_ratio > 0 else math.inf

    def to_dict(self) -> dict:
        return {"k": self.k, "label": self.label, **self.details, "channels": self.channels, "aligned": self.aligned,
                "mac_ratio": self.mac_ratio, "branches": self.branches, "predicted_ms": self.predicted_ms,
                "predicted_speedup": self.predicted_speedup, "measured_ms": None if self.measured is None else self.measured.to_dict(),
                "speedup": None if self.speedup is None else self.speedup.to_dict(), "meets": self.meets, "accuracy": self.accuracy,
                "within": self.within}


@dataclass
class TargetReport:
    """What `prune_to_target_` measured and chose.

    `chosen` (the k of the chosen candidate) is None when nothing was pruned; `message` then says why
    in one line. `candidates` holds the timed candidates in k order; `prune` is the prune report of
    the chosen one."""

    target: TargetSpec
    family: str  # the candidates, in words
    batch_size: int
    threads: int
    block: int
    size: int  # candidates in the family
    baseline: Interval | None = None  # ms per run of the unpruned model (all its interleaved runs)
    candidates: list[TargetCandidate] = field(default_factory=list)
    chosen: int | None = None
    prune: PruneReport | None = None
    message: str | None = None
    notes: list[str] = field(default_factory=list)
    base_accuracy: float | None = None  # with an accuracy budget: the unpruned model's validation top-1

    @property
    def chosen_candidate(self) -> TargetCandidate | None:
        return next((c for c in self.candidates if c.k == self.chosen), None)

    @property
    def step(self) -> PruneStep | None:
        """What a recipe records of the chosen prune (None when nothing was pruned)."""
        return self.prune.step if self.prune is not None else None

    @property
    def removed(self) -> dict:
        """What the chosen candidate removes ({"groups": {label: n}} or {"ratio": r}; {} when nothing)."""
        c = self.chosen_candidate
        return dict(c.details) if c is not None else {}

    def to_dict(self) -> dict:
        c = self.chosen_candidate
        return {"target": self.target.to_dict(), "family": self.family, "batch_size": self.batch_size, "threads": self.threads,
                "block": self.block, "size": self.size, "baseline_ms": None if self.baseline is None else self.baseline.to_dict(),
                "chosen": self.chosen, "chosen_label": None if c is None else c.label, "removed": self.removed, "message": self.message,
                "notes": self.notes, "base_accuracy": self.base_accuracy, "candidates": [c.to_dict() for c in self.candidates]}


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


def _gabor_share(model: nn.Module, profile: dict[str, float]) -> float | None:
    """The Gabor banks' share of the profiled time, None when none shows."""
    banks = [n for n, m in model.named_modules() if isinstance(m, GaborConv2d)]
    total = sum(profile.values())
    ms = sum(t for layer, t in profile.items() if any(layer == b or layer.startswith(b + ".") for b in banks))
    return ms / total if total > 0 and ms > 0 else None


class _Search:
    """The bisection of one `search_` call: the candidates, their timings (None: a MAC target), and the clock."""

    def __init__(self, model: nn.Module, family: Candidates, target: TargetSpec, timer: Timer | None, report: TargetReport) -> None:
        self.model, self.family, self.target, self.report = model, family, target, report
        self.timer = timer if target.timed or target.max_drop is not None else None
        self.accuracy: Callable[[nn.Module], float] | None = None  # with an accuracy budget: validation top-1 of a pruned copy
        self.base_counts = layer_counts(model)
        known = timer is not None and all(family.channels(k) is not None for k in range(1, len(family) + 1))
        self.profile = timer.profile(sorted(self.base_counts)) if known else {}
        self.candidates = {k: TargetCandidate(k, family.label(k), family.details(k), family.channels(k)) for k in range(1, len(family) + 1)}
        if known:
            for c in self.candidates.values():
                c.predicted_ratio = _predict(self.profile, self.base_counts, c.channels)
                c.aligned = report.block > 1 and _aligned(self.base_counts, c.channels, report.block)
        self.baseline: list[float] = []
        self.start = time.perf_counter()

    def measure(self, k: int) -> bool:
        c = self.candidates[k]
        work = copy.deepcopy(self.model)
        pruned = self.family.prune_(work, k)
        c.mac_ratio = pruned.after.macs / pruned.before.macs if pruned.before.macs else None
        c.branches = sorted(pruned.plan.constants)
        c.channels = c.channels if c.channels is not None else changed_counts(self.base_counts, layer_counts(work))
        if self.timer is not None and c.measured is None:  # an accuracy budget scores the floor's candidate again: timed once
            base, cand = self.timer.time(work)
            if not self.baseline and c.predicted_ratio is not None:  # the baseline's first median scales every prediction
                scale = median_interval(base).median
                for other in self.candidates.values():
                    other.predicted_ms = scale * other.predicted_ratio
            self.baseline.extend(base)
            c.measured, c.speedup = median_interval(cand), paired_ratio(base, cand)
        c.meets = self.target.met(c)
        if self.accuracy is not None:  # after the timing: the accuracy function may recalibrate and fine-tune the copy
            c.accuracy = self.accuracy(work)
            c.within = c.accuracy >= self.report.base_accuracy - self.target.max_drop
            return c.within
        return c.meets

    def timed(self) -> int:
        """Candidates tried so far (pruned, and timed for a speed target)."""
        return sum(c.meets is not None for c in self.candidates.values())

    def out_of_budget(self, budget: int, max_seconds: float) -> bool:
        return self.timed() >= budget or time.perf_counter() - self.start > max_seconds

    def first_predicted(self) -> int | None:
        """The first k whose predicted time meets the target (None without predictions)."""
        t = self.target
        if not t.timed:
            return None
        return next((k for k, c in self.candidates.items() if c.predicted_ratio is not None and
                     (c.predicted_speedup >= t.speedup if t.speedup is not None else c.predicted_ms <= t.latency_ms)), None)

    def finish(self) -> TargetReport:
        self.report.candidates = [c for c in self.candidates.values() if c.meets is not None]
        self.report.baseline = median_interval(self.baseline) if self.baseline else None
        return self.report


def search_(model: nn.Module, input_shape: tuple[int, int, int], target: TargetSpec, family: Candidates, *, timer: Timer | None,
            batch_size: int = 1, threads: int = 1, max_seconds: float = MAX_SECONDS, max_candidates: int = MAX_CANDIDATES) -> TargetReport:
    """Prune `model` in place to the smallest candidate k of `family` that meets `target` (see the module
    doc); the report's `message` says why when none does or none is needed (`model` then unchanged).
    `timer` times a speed target (None for a MAC target); a MAC target tries as many candidates as the
    bisection needs, a speed target at most `max_candidates` in `max_seconds`."""
    s = _Search(model, family, target, timer, _report(target, family, batch_size, threads))
    report = _smallest_meeting(s, max_seconds, max_candidates)
    if report.chosen is not None:
        report.prune = family.prune_(model, report.chosen)
    return report


def _report(target: TargetSpec, family: Candidates, batch_size: int, threads: int) -> TargetReport:
    """An empty report of a search over `family`, with this CPU's channel block."""
    return TargetReport(target, family.describe(), batch_size, threads, cpu.cpu_block(), len(family), notes=list(family.notes))


def _smallest_meeting(s: _Search, max_seconds: float, max_candidates: int) -> TargetReport:
    """The search of `search_`, up to its choice (`report.chosen`, or `message`); prunes only copies."""
    model, family, target, report, batch_size = s.model, s.family, s.target.floor, s.report, s.report.batch_size
    n = len(family)
    if not s.measure(n):  # the most that can go: is the target reachable at all?
        top = s.candidates[n]
        share = _gabor_share(model, s.profile)
        bound = f"; the Gabor banks take {share:.0%} of the unpruned model's time" if share is not None else ""
        sp, ms = top.speedup, top.measured
        best = (f"at best MAC ratio {top.mac_ratio:.3f}" if not target.timed else f"at most {sp.median:.2f}x [{sp.low:.2f}-{sp.high:.2f}]"
                if target.speedup is not None else f"at best {ms.median:.3g} ms [{ms.low:.3g}-{ms.high:.3g}]")
        mac = f" (MAC ratio {top.mac_ratio:.2f})" if top.mac_ratio is not None and target.timed else ""
        rest = "time" if target.timed else "arithmetic"
        report.message = (f"target {target.describe()} not reachable: {best} with {family.everything()} removed{mac}{bound}; "
                          f"the rest of the {rest} is in layers this search cannot remove (convert or prune more layers, or aim lower)")
        return s.finish()
    if target.latency_ms is not None:
        base = median_interval(s.baseline)
        if base.high <= target.latency_ms:
            report.message = (f"the unpruned model already runs in {base.median:.3g} ms [{base.low:.3g}-{base.high:.3g}] "
                              f"at batch {batch_size}, within `latency_ms` {target.latency_ms:g}; nothing to prune")
            return s.finish()

    aligned = sorted(k for k, c in s.candidates.items() if c.aligned and k < n)
    if not target.timed:  # counting is cheap: no budget
        max_candidates, max_seconds = n, math.inf
    budget = max_candidates - min(ALIGNED_TRIES, len(aligned))
    lo, hi = 0, n  # lo fails (k = 0 is the unpruned model itself), hi meets
    guess = s.first_predicted()
    while hi - lo > 1:
        if s.out_of_budget(budget, max_seconds):
            report.notes.append(f"the search stopped after {s.timed()} candidates (budget); k between {lo + 1} and {hi - 1} was not timed")
            break
        k = guess if guess is not None and lo < guess < hi else (lo + hi) // 2
        guess = None
        if s.measure(k):
            hi = k
        else:
            lo = k
    # a block-aligned count can beat the monotone trend: time the aligned k just below the answer
    for k in sorted((k for k in aligned if k < hi and s.candidates[k].meets is None), reverse=True)[:ALIGNED_TRIES]:
        if s.out_of_budget(max_candidates, max_seconds):
            break
        s.measure(k)
    report.chosen = min(k for k, c in s.candidates.items() if c.meets)
    return s.finish()


def prune_within_(model: nn.Module, input_shape: tuple[int, int, int], target: TargetSpec, family: Candidates,
                  accuracy: Callable[[nn.Module], float], *, timer: Timer | None, batch_size: int = 1, threads: int = 1,
                  max_seconds: float = MAX_SECONDS, max_candidates: int = MAX_CANDIDATES) -> TargetReport:
    """Prune `model` in place to the largest candidate k of `family` whose `accuracy` stays within
    `target.max_drop` points of the unpruned model's, and that meets `target.floor` when there is one.

    `accuracy(copy)` scores a pruned copy on a validation split (it may re-estimate BatchNorm statistics
    and fine-tune the copy first: the caller decides what "after pruning" means). Accuracy falls as k
    grows, so the largest k within the budget is found by bisection between the floor's k (the
    smallest that meets the floor, found first by `search_`'s rule; 1 without a floor) and the last
    candidate. Each candidate scored is timed too (when `timer` is given), so the report shows what
    each k buys and costs; the most pruning within the budget is the fastest, as far as time falls
    with k."""
    report = _report(target, family, batch_size, threads)
    s = _Search(model, family, target, timer, report)
    report.base_accuracy = accuracy(copy.deepcopy(model))
    lo = 1
    if target.floor is not None:
        _smallest_meeting(s, max_seconds, max_candidates)
        if report.chosen is None:
            return s.finish()
        lo, report.chosen = report.chosen, None
    s.accuracy = accuracy
    n = len(family)
    if not s.measure(lo):
        c = s.candidates[lo]
        least = "the least pruning that meets the floor" if target.floor is not None else "the least pruning"
        report.message = (f"no pruning stays within {target.max_drop:g} points: {least} ({c.label}) scores {c.accuracy:.2f}% on the validation "
                          f"split against {report.base_accuracy:.2f}% unpruned; allow a larger drop, recover with more fine-tuning, or fine-tune "
                          "with the pressure longer first")
        return s.finish()
    hi = n + 1  # fails (or past the end)
    if lo < n and s.measure(n):
        lo = n
    elif lo < n:
        hi = n
    while hi - lo > 1:
        k = (lo + hi) // 2
        if s.measure(k):
            lo = k
        else:
            hi = k
    report.chosen = lo
    report.prune = family.prune_(model, lo)
    return s.finish()


def prune_to_target_(model: nn.Module, input_shape: tuple[int, int, int], target: TargetSpec | None = None, *,
                     speedup: float | None = None, latency_ms: float | None = None, macs: float | None = None, scope: str = "banks",
                     round_to: int | None = None, module: str | None = None,
                     batch_size: int = 1, threads: int = 1, max_seconds: float = MAX_SECONDS, max_candidates: int = MAX_CANDIDATES,
                     timer: Timer | None = None, accuracy: Callable[[nn.Module], float] | None = None,
                     scores: dict[str, float] | None = None) -> TargetReport:
    """Prune the least that meets a target (see the module doc).

    `scope` "banks" removes the weakest channel groups of the Gabor banks; "all" the weakest channels
    of every convolution (in multiples of `round_to`). On success `model`
    (inputs [N, *input_shape]) is pruned in place through `prune_model_`, and the report's `step` is
    what a recipe records of it. When the target cannot be met (even with all that can go removed),
    or the unpruned model already meets a latency target, `model` is left as it was, `step` is None
    and the report's `message` says so in one line.

    Args:
        target: the target, or give `speedup` (times the unpruned model's speed, > 1, by the low end of
            the 95% interval), `latency_ms` (milliseconds per run at `batch_size`, by the high end) or
            `macs` (the pruned model's MACs over the unpruned model's, counted).
        batch_size, threads: the ONNX Runtime settings timed.
        max_seconds: no new candidate is timed after this long; the best measured one is chosen.
        max_candidates: candidates timed at most.
        timer: where timings come from (default `OrtTimer`).
        accuracy: with `target.max_drop`, the validation top-1 of a pruned copy (`prune_within_`).
        scores: with `scope` all, rank the channels by these importances (`taylor_scores`) instead of
            their BatchNorm gains.
        module: with `scope` all, the part of the model whose channels go (`PruneSpec.module`;
            default: the whole model when torch.fx traces it, else its `backbone`). The timings
            are of the whole model.

    Raises:
        PruneError: a bad target or setting, no Gabor banks or no channel groups.
    """
    if target is None:
        target = TargetSpec(speedup, latency_ms, macs)
    elif speedup is not None or latency_ms is not None or macs is not None:
        raise PruneError("give a TargetSpec or `speedup`/`latency_ms`/`macs`, not both")
    check_int(batch_size, "the timing batch size", error=PruneError)
    check_threads(threads, error=PruneError)
    check_int(max_candidates, "`max_candidates`", minimum=1, error=PruneError)
    if not check_finite(max_seconds, "`max_seconds`", PruneError) > 0:
        raise PruneError(f"`max_seconds` must be above 0, not {max_seconds!r}")
    if scope not in SCOPES:
        raise PruneError(f"unknown `scope` '{scope}'; known: {', '.join(SCOPES)}")
    if scores is not None and scope != "all":
        raise PruneError("importance `scores` rank the channels of `scope` all; the Gabor banks' groups are ranked by their strength")
    shape = tuple(input_shape)
    if module is not None and scope != "all":
        raise PruneError("`module` names the part whose channels `scope` all removes; add `scope` all")
    family = GroupCandidates(model, shape) if scope == "banks" else RatioCandidates(model, shape, round_to, scores=scores, module=module)
    if (target.timed or target.max_drop is not None) and timer is None:
        timer = OrtTimer(model, shape, batch_size, threads)
    if target.max_drop is not None:
        if accuracy is None:
            raise PruneError("an accuracy budget (`max_drop`) needs a way to score candidates: give `accuracy` (with `data` in the workflow)")
        return prune_within_(model, shape, target, family, accuracy, timer=timer, batch_size=batch_size, threads=threads,
                             max_seconds=max_seconds, max_candidates=max_candidates)
    return search_(model, shape, target, family, timer=timer, batch_size=batch_size, threads=threads, max_seconds=max_seconds,
                   max_candidates=max_candidates)
