"""`bench`: ONNX Runtime latency over a grid of batch sizes and thread counts, side by side with a
baseline of the same precision, with the share of removed arithmetic that became saved time.

Honest by construction: the models take turns run by run (machine drift hits all alike), rounds of
`runs` turns repeat until every median's 95% interval is within `precision` of it (or `max_seconds`
is spent), and a speedup is the median of the per-run ratio with its interval
(`gaborprune.export.stats`). A comparison is called faster or slower only when that interval is on
one side of 1 and narrower than the gain, the gain is at least the +-precision/2 the medians were
timed to, and neither timing had a long tail (p90/p50 above 2); otherwise its verdict says why not,
and no efficiency is given. Efficiency is counted on the MACs
the graphs execute (zeros inside dense convolutions included: ONNX Runtime computes them), and
int8 is compared only with int8.

What is timed is in `bench_models`, the results and their verdicts in `results`, their text in
`render`, the machine in `environment`.
"""

from __future__ import annotations

import time

import numpy as np

from gaborprune._validate import check_batch_memory, check_finite, check_int, check_threads, is_int
from gaborprune.export import runtime
from gaborprune.export.bench_models import BenchModel, quantized
from gaborprune.export.environment import environment, load_warning
from gaborprune.export.onnx import ExportError
from gaborprune.export.results import BenchReport, BenchResult, compare, converted_share
from gaborprune.export.runtime import Latency, session

PRECISION = 0.02  # relative width of a median's 95% interval that ends the rounds: +-1%
MAX_SECONDS = 60.0  # timing budget of one bench, all configurations together
BATCH_SIZES, THREADS = (1,), (1,)  # the configurations timed by default
WARMUP, RUNS = 10, 100  # untimed runs per model and configuration; timed runs per model in one round
MIN_SAMPLES = 20  # below this, order statistics give no honest 95% interval (5 samples' min..max covers the median 94% of the time)

_now = time.perf_counter  # the clock the time budget is read from (tests replace it)


def _torch_latency(model, x: np.ndarray, threads: int, warmup: int, runs: int) -> Latency:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            for _ in range(warmup):
                model(xt)
            seconds = []
            for _ in range(runs):
                t0 = time.perf_counter()
                model(xt)
                seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return Latency.of(seconds)


def check_settings(batch_sizes: tuple[int, ...], threads: tuple[int, ...], warmup: object, runs: object, precision: object,
                   max_seconds: object) -> None:
    """Every timing setting of `bench`, checked before anything is exported or timed."""
    for t in threads:
        check_threads(t, "`threads`", ExportError)
    for b in batch_sizes:
        check_int(b, "`batch_sizes`", error=ExportError)
    if not (is_int(runs) and is_int(warmup) and runs >= 1 and warmup >= 0):
        raise ExportError(f"`runs` must be at least 1 and `warmup` at least 0 (integers), not {runs!r} and {warmup!r}")
    check_timing(precision, max_seconds)


def check_timing(precision: object, max_seconds: object) -> None:
    """`precision` in (0, 1) and `max_seconds` above 0, before anything is exported or timed."""
    check_finite(precision, "`precision`", ExportError)
    check_finite(max_seconds, "`max_seconds`", ExportError)
    if not 0 < precision < 1:
        raise ExportError(f"`precision` must be above 0 and below 1 (0.02: each median known to +-1%), not {precision!r}")
    if max_seconds <= 0:
        raise ExportError(f"`max_seconds` must be above 0, not {max_seconds!r}")


def _tight(latency: Latency, precision: float) -> bool:
    return latency.runs >= MIN_SAMPLES and latency.interval.relative_width <= precision


def _rounds(sessions: list, eager: list, x: np.ndarray, threads: int, warmup: int, runs: int, precision: float,
            deadline: float) -> tuple[list[list[float]], int]:
    """Rounds of `runs` interleaved runs of every session (then `runs` of each eager model) until every
    median's interval is within `precision` of it or the clock passes `deadline`; at least one round.
    Returns every timing's samples (ms, sessions first) and the rounds run."""
    samples: list[list[float]] = [[] for _ in [*sessions, *eager]]
    rounds, checked = 0, 0
    while True:
        latencies = runtime.time_interleaved(sessions, x, warmup if rounds == 0 else 0, runs)
        latencies += [_torch_latency(m, x, threads, warmup if rounds == 0 else 0, runs) for m in eager]
        for s, lat in zip(samples, latencies):
            s += lat.samples
        rounds += 1
        if _now() >= deadline:
            break
        if len(samples[0]) >= 1.25 * checked:  # sorting every sample after every short round would cost more than the runs
            checked = len(samples[0])
            if all(_tight(Latency.of_ms(s), precision) for s in samples):
                break
    return samples, rounds


def bench(models: list[BenchModel], *, baseline: BenchModel | list[BenchModel] | None = None, batch_sizes: tuple[int, ...] = BATCH_SIZES,
          threads: tuple[int, ...] = THREADS, warmup: int = WARMUP, runs: int = RUNS, provider: str = "cpu",
          profile_layers: bool = False, torch_eager: bool = False, precision: float = PRECISION,
          max_seconds: float = MAX_SECONDS, int8: bool = False, calibration: list[np.ndarray] | None = None) -> BenchReport:
    """Time every model (and the baselines) at each (batch size, threads), interleaving the models run
    by run within a configuration so machine drift hits all alike, in rounds of `runs` runs until
    each median is known to `precision` (relative width of its 95% interval) or `max_seconds` (all
    configurations together) is spent.

    Args:
        baseline: one reference, or one per precision (a float and an int8 model); each model is
            compared with the baseline of its own precision.
        int8: also time an int8 copy of every float model and float baseline (static on the
            `calibration` batches, else dynamic), compared with the int8 baseline.
        profile_layers: per-layer time of every model in the first configuration, and the share of
            it spent in the converted layers (those the files' `gaborprune.kernels_kept` lists).

    Raises:
        ExportError: a model with a fixed batch dimension asked for another batch size, models
            with different input shapes, thread counts beyond the machine's, two baselines of one
            precision, or a batch whose estimated memory does not fit (all before anything is timed).
    """
    check_settings(batch_sizes, threads, warmup, runs, precision, max_seconds)
    if not models:
        raise ExportError("no models to bench; give at least one MODEL")
    baselines = [] if baseline is None else [baseline] if isinstance(baseline, BenchModel) else list(baseline)
    by_precision = {}
    for b in baselines:
        if b.precision in by_precision:
            raise ExportError(f"two {b.precision} baselines ('{by_precision[b.precision].name}', '{b.name}'); give one `baseline` per precision (float, int8)")
        by_precision[b.precision] = b
    everyone = models + baselines
    shapes = {m.chw for m in everyone}
    if len(shapes) > 1:
        raise ExportError(f"the models take different inputs ({', '.join('x'.join(map(str, s)) for s in sorted(shapes))}); "
                          "bench models of one input shape together")
    for m in everyone:
        bad = [b for b in batch_sizes if m.fixed_batch is not None and b != m.fixed_batch]
        if bad:
            raise ExportError(f"'{m.name}' has a fixed batch of {m.fixed_batch} and cannot run batch {bad[0]}; "
                              f"export it with `dynamic_batch` or bench with `batch_sizes` {m.fixed_batch}")
    settings = {"precision": precision, "max_seconds": max_seconds, "runs_per_round": runs, "warmup": warmup}
    if int8:
        models = list(models)
        for m in [*models]:
            if m.precision == "float":
                q, settings["int8"] = quantized(m, calibration)
                models.append(q)
        if "float" in by_precision and "int8" not in by_precision:
            by_precision["int8"], settings["int8"] = quantized(by_precision["float"], calibration)
            baselines.append(by_precision["int8"])
        everyone = models + baselines
    if batch_sizes:
        per_sample = sum(m.sample_bytes for m in everyone)  # every model's session is alive in a configuration
        check_batch_memory(per_sample * (2 if torch_eager else 1), max(batch_sizes), f"timing at batch {max(batch_sizes)}", "`batch_sizes`", ExportError)
    report = BenchReport(environment(list(threads), provider), settings=settings)
    report.warnings += filter(None, [load_warning(report.environment)])
    chw = shapes.pop()
    rng = np.random.default_rng(0)
    configs = [(b, t) for b in batch_sizes for t in threads]
    start = _now()
    for k, (b, t) in enumerate(configs):
        x = rng.standard_normal((b, *chw), dtype=np.float32)
        sessions = [session(m.onnx, t, provider) for m in everyone]
        eager = [m for m in everyone if torch_eager and m.torch_model is not None]
        left = max_seconds - (_now() - start)
        samples, rounds = _rounds(sessions, [m.torch_model for m in eager], x, t, warmup, runs, precision,
                                  _now() + left / (len(configs) - k))  # time a configuration leaves goes to the next
        results = [BenchResult(m.name, b, t, Latency.of_ms(s), precision=m.precision, rounds=rounds) for m, s in zip(everyone, samples)]
        results += [BenchResult(m.name, b, t, Latency.of_ms(s), "pytorch", "float", rounds) for m, s in zip(eager, samples[len(everyone):])]
        for r in results:
            r.converged = _tight(r.latency, precision)
        report.results += results
        for m, r in zip(models, results):
            base = by_precision.get(m.precision) or (baselines[0] if baselines else None)
            if base is not None:
                report.comparisons.append(compare(m, base, r, next(q for e, q in zip(everyone, results) if e is base), precision))
    loose = [r for r in report.results if not r.converged]
    if loose:
        report.warnings.append(f"{len(loose)} of {len(report.results)} medians did not reach +-{precision / 2:.1%} within `max_seconds` "
                               f"{max_seconds:g}: their intervals are wider (the note column says which); give more time or a quieter machine")
    if profile_layers:
        x = rng.standard_normal((batch_sizes[0], *chw), dtype=np.float32)
        converted = sorted({c for m in everyone for c in m.converted})
        for m in everyone:
            report.profiles[m.name] = runtime.profile(m.onnx, m.proto, x, _layers(m.proto), threads[0], runs=min(runs, 30), provider=provider)
            if converted:
                report.converted[m.name] = converted_share(report.profiles[m.name], converted)
    return report


def _layers(proto) -> list[str]:
    """Module paths of the convolution and linear layers, from the exporter's node metadata: the
    innermost module, or the lowering wrapper (MapBias, SplitConv) that stands for the layer."""
    layers = set()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul"):
            namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
            entries = [part.split(": ", 1) for part in namespace.split("/") if ": " in part and "aten." not in part]
            wrapper = next((path for path, cls in entries if cls.endswith((".MapBias", ".SplitConv"))), None)
            if wrapper or (entries and entries[-1][0]):
                layers.add(wrapper or entries[-1][0])
    return sorted(layers)
