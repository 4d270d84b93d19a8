"""What a bench measured and what it means: timings (`BenchResult`), comparisons with a baseline and
their verdicts (`compare`), the report that holds them (`BenchReport`) and the converted layers' share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from gaborprune.export import render
from gaborprune.export.bench_models import BenchModel
from gaborprune.export.runtime import Latency
from gaborprune.export.stats import Interval, paired_ratio

TAIL_LIMIT = 2.0  # p90/p50 above this: the scheduler, not the model, set the figures
FASTER, SLOWER, NOISE, UNCERTAIN, UNSTABLE, MIXED = "faster", "slower", "within noise", "uncertain", "unstable", "precisions differ"


@dataclass
class BenchResult:
    model: str
    batch_size: int
    threads: int
    latency: Latency  # every round's runs joined
    runtime: str = "onnxruntime"
    precision: str = "float"
    rounds: int = 1
    converged: bool = True  # the median's interval reached the requested precision

    @property
    def throughput(self) -> float:
        return self.batch_size / (self.latency.p50 / 1e3)

    @property
    def interval(self) -> Interval:
        return self.latency.interval

    @property
    def quartiles(self) -> tuple[float, float]:
        """(p25, p75) in ms: the spread of the runs around the median (a point when no samples were kept)."""
        s = self.latency.samples
        return (float(np.percentile(s, 25)), float(np.percentile(s, 75))) if s else (self.latency.p50, self.latency.p50)

    @property
    def stable(self) -> bool:
        return self.latency.tail <= TAIL_LIMIT

    @property
    def note(self) -> str:
        """Why the figure is not a finding (empty when it is)."""
        notes = [f"unstable: p90/p50 {self.latency.tail:.1f} above {TAIL_LIMIT:g}"] if not self.stable else []
        if not self.converged:
            notes.append(f"interval +-{self.interval.relative_width / 2:.1%} of {self.latency.runs} runs when `max_seconds` ran out")
        return "; ".join(notes)

    def to_dict(self) -> dict:
        lat, ci = self.latency, self.interval
        return {"model": self.model, "runtime": self.runtime, "precision": self.precision, "batch_size": self.batch_size,
                "threads": self.threads, "p50_ms": lat.p50, "p50_low_ms": ci.low, "p50_high_ms": ci.high,
                "p25_ms": self.quartiles[0], "p75_ms": self.quartiles[1], "p90_ms": lat.p90,
                "p99_ms": lat.p99, "mean_ms": lat.mean, "std_ms": lat.std, "p90_over_p50": lat.tail, "runs": lat.runs,
                "rounds": self.rounds, "converged": self.converged, "stable": self.stable, "note": self.note,
                "throughput": self.throughput}


@dataclass
class Comparison:
    model: str
    baseline: str
    batch_size: int
    threads: int
    speedup: float | None  # median over interleaved runs of t_base / t (None: precisions differ)
    mac_ratio: float  # executed MACs of the model / of the baseline
    efficiency: float | None  # (1 - t/t_base) / (1 - MACs/MACs_base): share of removed arithmetic that became time
    speedup_low: float | None = None  # the speedup's 95% interval
    speedup_high: float | None = None
    verdict: str = FASTER  # faster | slower | within noise | uncertain | unstable | precisions differ
    note: str = ""
    precision: str = "float"
    baseline_precision: str = "float"
    macs_executed: int = 0
    baseline_macs_executed: int = 0

    @property
    def stable(self) -> bool:
        """A finding: faster or slower beyond the noise, from timings without a long tail."""
        return self.verdict in (FASTER, SLOWER)

    def to_dict(self) -> dict:
        return asdict(self) | {"stable": self.stable}


def compare(model: BenchModel, base: BenchModel, result: BenchResult, base_result: BenchResult, precision: float) -> Comparison:
    """The model against a baseline timed in the same interleaved runs, with its verdict: a gain
    below half of `precision` is within noise too, being finer than the medians were timed to."""
    macs, base_macs = model.executed, base.executed
    ratio = macs / base_macs if base_macs else 1.0
    head = (model.name, base.name, result.batch_size, result.threads)
    tail = dict(precision=model.precision, baseline_precision=base.precision, macs_executed=macs, baseline_macs_executed=base_macs)
    if model.precision != base.precision:
        hint = " or `int8`" if model.precision == "int8" else ""
        return Comparison(*head, None, ratio, None, verdict=MIXED, note=f"{model.precision} model, {base.precision} baseline; "
                          f"add a `baseline` of the model's precision{hint}", **tail)
    speedup = paired_ratio(base_result.latency.samples, result.latency.samples)  # per run: t_base / t
    gain = abs(speedup.median - 1)
    if not (result.stable and base_result.stable):
        verdict, note = UNSTABLE, f"p90/p50 above {TAIL_LIMIT:g}"
    elif speedup.low <= 1 <= speedup.high:
        verdict, note = NOISE, "interval includes 1"
    elif gain < precision / 2:
        verdict, note = NOISE, f"gain below the +-{precision / 2:.1%} timed to"
    elif speedup.high - speedup.low > gain:
        verdict, note = UNCERTAIN, "interval wider than the gain"
    else:
        verdict, note = (FASTER if speedup.median > 1 else SLOWER), ""
    efficiency = None
    if verdict in (FASTER, SLOWER) and ratio < 1:
        efficiency = (1 - 1 / speedup.median) / (1 - ratio)
    elif verdict in (FASTER, SLOWER):
        note = "no executed MACs removed"
    return Comparison(*head, speedup.median, ratio, efficiency, speedup.low, speedup.high, verdict, note, **tail)


@dataclass
class BenchReport:
    """Everything one `bench` measured; `to_dict` for JSON, its text (tables, Markdown) from `render`."""

    environment: dict
    results: list[BenchResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {layer: ms}
    converted: dict[str, dict] = field(default_factory=dict)  # model -> its time in the converted layers (`converted_share`)
    settings: dict = field(default_factory=dict)  # precision, max_seconds, runs per round, warmup, int8 mode
    warnings: list[str] = field(default_factory=list)  # one line each, for the CLI to print

    def to_dict(self) -> dict:
        return {"environment": self.environment, "settings": self.settings, "warnings": self.warnings,
                "results": [r.to_dict() for r in self.results], "comparisons": [c.to_dict() for c in self.comparisons],
                "profiles": self.profiles, "converted": self.converted}

    def result_rows(self) -> list[list[str]]:
        """The cells of the results table (`render.result_rows`)."""
        return render.result_rows(self)

    def comparison_rows(self) -> list[list[str]]:
        """The cells of the comparisons table (`render.comparison_rows`)."""
        return render.comparison_rows(self)

    def share_line(self, model: str) -> str:
        """One line on the converted layers' share of `model`'s profiled time (`render.share_line`)."""
        return render.share_line(self, model)

    def to_markdown(self, title: str = "gaborprune bench") -> str:
        """The report as Markdown (`render.to_markdown`)."""
        return render.to_markdown(self, title)


def converted_share(layers: dict[str, float], converted: list[str]) -> dict:
    """The time a profile spends in the converted layers (a layer and the modules inside it), its share
    of the total, and the speedup bound that share implies if those layers cost nothing: 1 / (1 - share).
    The share and bound are None when no converted layer shows in the profile."""
    inside = sorted(k for k in layers if any(k == c or k.startswith(c + ".") for c in converted))
    ms, total = sum(layers[k] for k in inside), sum(layers.values())
    share = ms / total if inside and total > 0 else None
    bound = 1 / (1 - share) if share is not None and share < 1 else None
    return {"layers": inside, "ms": ms, "total_ms": total, "share": share, "bound": bound}
