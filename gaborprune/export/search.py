"""The search over deploy forms: which lowering of a model `export` writes, decided by measurement.

A *form* is a whole graph. The baseline is the plain dense export: nothing cut at export, no bias
map, no padding (the recipe's own cuts are in every form). The variants are what the lowering
offers: constant channels cut at export (with bias maps where a zero-padded reader needs them),
channel counts padded to the CPU's block, and kernel-sparse layers split (`SplitConv`) where ONNX
Runtime's profiler found the split layer faster. Each variant removes or aligns arithmetic, and
each can cost time instead: a map's Add breaks ONNX Runtime's Conv+ReLU fusion and adds layout
reorders, a channel count off the block falls off the blocked path, a split adds ops. So the forms
are timed interleaved, in rounds, and a variant is written only when the whole 95% interval of its
per-run time ratio to the baseline lies below 1 (`gaborprune.export.stats.faster`); medians that
differ by less than their spread are noise on a shared CPU. Nor is a variant written that is bigger
than the baseline (bias maps are parameters too), apart from the zero channels its padding adds.
Otherwise the baseline is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gaborprune import cpu
from gaborprune.export.lower import LoweringReport, bake, finish
from gaborprune.export.macs import onnx_counts
from gaborprune.export.onnx import to_onnx
from gaborprune.export.runtime import profile, session, time_interleaved
from gaborprune.export.stats import Interval, faster, median_interval, paired_ratio

#: Timing rounds: each runs every candidate ROUND_RUNS times, taking turns. At least MIN_ROUNDS,
#: then until every candidate's ratio to the baseline is settled, or MAX_ROUNDS, or MAX_SECONDS.
ROUND_RUNS = 20
MIN_ROUNDS = 3
MAX_ROUNDS = 10
MAX_SECONDS = 20.0
WARMUP = 5
#: A ratio interval narrower than this (relative) that still holds 1: a difference too small to matter.
SETTLED_WIDTH = 0.02


@dataclass(frozen=True)
class Form:
    """One whole-graph candidate: `cut` constant channels at export, `pad` channel counts to a
    multiple (0: not), `split` these kernel-sparse layers (the others dense)."""

    cut: bool = False
    pad: int = 0
    split: tuple[str, ...] = ()

    @property
    def forms(self) -> dict[str, str]:
        return dict.fromkeys(self.split, "split")

    def describe(self) -> str:
        if not self.cut and not self.split and not self.pad:
            return "plain dense"
        return ", ".join(["constant channels cut" if self.cut else "nothing cut at export",
                          "split " + ", ".join(self.split) if self.split else "all dense",
                          f"padded to x{self.pad}" if self.pad else "no padding"])


class Lowerings:
    """The forms of one model, each lowered and exported once although `export_model` asks for a form
    several times (to profile it, to time it, to write it): the Gabor banks are baked and the channel
    analysis runs once per `cut` setting, the rest once per form."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], batch_size: int) -> None:
        self.model, self.input_shape = model, input_shape
        self.shape = (batch_size, *input_shape)
        self._baked: dict[bool, tuple[nn.Module, LoweringReport]] = {}
        self._lowered: dict[Form, tuple[nn.Module, LoweringReport]] = {}
        self._onnx: dict[Form, bytes] = {}

    def lower(self, form: Form) -> tuple[nn.Module, LoweringReport]:
        if form not in self._lowered:
            if form.cut not in self._baked:
                self._baked[form.cut] = bake(self.model, self.input_shape, form.cut)
            self._lowered[form] = finish(*self._baked[form.cut], form.forms, form.pad)
        return self._lowered[form]

    def onnx(self, form: Form) -> bytes:
        """The form at the static batch, without metadata: what is timed."""
        if form not in self._onnx:
            self._onnx[form] = to_onnx(self.lower(form)[0], self.shape).SerializeToString()
        return self._onnx[form]

    def size(self, form: Form) -> int:
        """Floating-point parameters of the form without its padding (what `search` compares)."""
        module = self.lower(Form(form.cut, 0, form.split))[0]
        return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())

    def canonical(self, form: Form) -> Form:
        """The simplest form with the same graph: a cut that cuts nothing, a pad that grows nothing
        and a split that splits nothing are dropped (so the same graph is never timed twice)."""
        report = self.lower(form)[1]
        split = tuple(n for n in form.split if report.forms.get(n, "").startswith("split"))
        return Form(form.cut and bool(report.channels_cut), form.pad if report.padded else 0, split)


@dataclass
class Candidate:
    form: Form
    params: int
    file_bytes: int
    latency: Interval | None = None  # ms per run: median and its 95% interval
    ratio: Interval | None = None  # per-run time / the baseline's, interleaved (None: the baseline)
    kept: bool = False

    def to_dict(self) -> dict:
        d = {"form": self.form.describe(), "cut": self.form.cut, "pad": self.form.pad, "split": list(self.form.split),
             "params": self.params, "file_bytes": self.file_bytes, "kept": self.kept}
        if self.latency is not None:
            d |= {"median_ms": self.latency.median, "low_ms": self.latency.low, "high_ms": self.latency.high, "runs": self.latency.samples}
        d["ratio"] = None if self.ratio is None else {k: getattr(self.ratio, k) for k in ("median", "low", "high")}
        return d


@dataclass
class Search:
    """What the search found: the form to write, every candidate, and why."""

    form: Form
    candidates: list[Candidate]
    reason: str
    layer_ms: dict[str, dict[str, float]]  # {kernel-sparse layer: {"dense": ms, "split": ms}} (profiler)
    block: int  # the channel block padding was tried at (0: none)


def decide(samples: Sequence[Sequence[float]], allowed: Sequence[bool] | None = None) -> int:
    """Which of several interleaved timings to keep. Index 0, the baseline, unless another (that is
    `allowed`, default all) is faster beyond the noise (the whole 95% interval of its per-run ratio
    to the baseline below 1); of several such, the one with the lowest median ratio."""
    better = [k for k in range(1, len(samples)) if (allowed is None or allowed[k]) and faster(samples[k], samples[0])]
    return min(better, key=lambda k: paired_ratio(samples[k], samples[0]).median) if better else 0


def _settled(samples: list[list[float]]) -> bool:
    """Whether more rounds could change a decision: no ratio interval holds 1 while wider than SETTLED_WIDTH."""
    for s in samples[1:]:
        r = paired_ratio(s, samples[0])
        if r.low <= 1 <= r.high and r.relative_width > SETTLED_WIDTH:
            return False
    return True


def measure(sessions: list, x: np.ndarray) -> list[list[float]]:
    """Milliseconds per run of each session, interleaved run by run, in rounds (see ROUND_RUNS)."""
    samples: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    for r in range(MAX_ROUNDS):
        for s, latency in zip(samples, time_interleaved(sessions, x, warmup=WARMUP if r == 0 else 0, runs=ROUND_RUNS)):
            s.extend(latency.samples)
        if r + 1 >= MIN_ROUNDS and (_settled(samples) or time.perf_counter() - start > MAX_SECONDS):
            break
    return samples


def _candidate(lowerings: Lowerings, form: Form) -> Candidate:
    import onnx

    blob = lowerings.onnx(form)
    return Candidate(form, onnx_counts(onnx.load_from_string(blob)).params, len(blob))


def _per_layer(lowerings: Lowerings, sparse: list[str], pad: int, x: np.ndarray, threads: int | None) -> tuple[dict, tuple[str, ...]]:
    """ONNX Runtime's profile of each kernel-sparse layer dense and split: {layer: {form: ms}}, and
    the layers whose split ran faster (a candidate only: the whole graph decides)."""
    import onnx

    dense, split = Form(cut=True, pad=pad), Form(cut=True, pad=pad, split=tuple(sparse))
    names = [layer.name for layer in lowerings.lower(dense)[1].layers]
    times = {f: profile(lowerings.onnx(f), onnx.load_from_string(lowerings.onnx(f)), x, names, threads) for f in (dense, split)}
    ms = {n: {"dense": round(times[dense].get(n, float("nan")), 4), "split": round(times[split].get(n, float("nan")), 4)} for n in sparse}
    return ms, tuple(n for n in sparse if times[split].get(n, np.inf) < times[dense].get(n, np.inf))


def search(lowerings: Lowerings, lowering: str = "auto", pad: int | None = None, threads: int | None = None,
           quantize: Callable[[bytes], bytes] | None = None) -> Search:
    """The form of the model to write (see the module doc).

    Args:
        lowering: "auto" (measure), "dense" (the baseline) or "sparse" (constant channels cut, every
            kernel-sparse layer split), unmeasured.
        pad: force this channel multiple on every form (0: no padding); None: `auto` also tries the
            host's block (`gaborprune.cpu.cpu_block`), the others do not pad.
        quantize: the int8 conversion of the file to be written: candidates are then timed as int8,
            since a form faster in float can be slower in int8 (a split layer is).
    """
    block = cpu.cpu_block() if pad is None and lowering == "auto" else 0
    pads = (pad,) if pad is not None else (0, block) if block > 1 else (0,)
    base = lowerings.canonical(Form(pad=pads[0]))
    if lowering == "dense":
        return Search(base, [_candidate(lowerings, base)], "dense everywhere, nothing cut at export (`lowering` dense)", {}, 0)
    sparse = [layer.name for layer in lowerings.lower(Form(cut=True, pad=pads[0]))[1].layers
              if layer.kernels < layer.dense_kernels and layer.form == "dense"]
    if lowering == "sparse":
        form = lowerings.canonical(Form(cut=True, pad=pads[0], split=tuple(sparse)))
        return Search(form, [_candidate(lowerings, form)], "constant channels cut, split wherever kernels are missing (`lowering` sparse)", {}, 0)

    x = torch.randn(*lowerings.shape, generator=torch.Generator().manual_seed(0)).numpy()
    layer_ms, split = _per_layer(lowerings, sparse, pads[0], x, threads) if sparse else ({}, ())
    forms = [base]
    for cut in (False, True):
        for p in pads:
            for s in ((), split) if cut and split else ((),):
                form = lowerings.canonical(Form(cut, p, s))
                if form not in forms:
                    forms.append(form)
    candidates = [_candidate(lowerings, f) for f in forms]
    if len(forms) == 1:
        candidates[0].kept = True
        return Search(base, candidates, f"{base.describe()}: nothing to cut, pad or split", layer_ms, block)
    samples = measure([session(quantize(lowerings.onnx(f)) if quantize else lowerings.onnx(f), threads) for f in forms], x)
    for c, s in zip(candidates, samples):
        c.latency = median_interval(s)
        c.ratio = paired_ratio(s, samples[0]) if c is not candidates[0] else None
    sizes = [lowerings.size(f) for f in forms]
    allowed = [size <= sizes[0] for size in sizes]
    kept = decide(samples, allowed)
    candidates[kept].kept = True
    bigger = [f.describe() for f, s, ok in zip(forms, samples, allowed) if not ok and faster(s, samples[0])]
    if kept == 0 and bigger:
        reason = f"{base.describe()} kept: the candidates faster beyond the noise are bigger ({'; '.join(bigger)})"
    elif kept == 0:
        reason = f"{base.describe()} kept: no candidate faster than {base.describe()} beyond the noise"
    else:
        r = candidates[kept].ratio
        reason = (f"{forms[kept].describe()} kept: {r.median:.3f}x the time of {base.describe()} "
                  f"(95% interval {r.low:.3f}-{r.high:.3f}, {r.samples} interleaved runs)")
    return Search(forms[kept], candidates, reason, layer_ms, block)
