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
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gaborprune._validate import check_batch_memory, check_finite, check_int, check_threads, is_int
from gaborprune.export import runtime
from gaborprune.export.macs import onnx_counts
from gaborprune.export.onnx import ExportError
from gaborprune.export.runtime import Latency, session
from gaborprune.export.stats import Interval, paired_ratio

PRECISION = 0.02  # relative width of a median's 95% interval that ends the rounds: +-1%
MAX_SECONDS = 60.0  # timing budget of one bench, all configurations together
BATCH_SIZES, THREADS = (1,), (1,)  # the configurations timed by default
WARMUP, RUNS = 10, 100  # untimed runs per model and configuration; timed runs per model in one round
TAIL_LIMIT = 2.0  # p90/p50 above this: the scheduler, not the model, set the figures
MIN_SAMPLES = 20  # below this, order statistics give no honest 95% interval (5 samples' min..max covers the median 94% of the time)
INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "ConvInteger",
                      "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul"})
FASTER, SLOWER, NOISE, UNCERTAIN, UNSTABLE, MIXED = "faster", "slower", "within noise", "uncertain", "unstable", "precisions differ"

_now = time.perf_counter  # the clock the time budget is read from (tests replace it)


def precision_of(proto) -> str:
    """"int8" for a graph with quantised operators, else "float"."""
    return "int8" if any(n.op_type in INT8_OPS for n in proto.graph.node) else "float"


def _float_view(proto):
    """A copy of an int8 graph that `onnx_counts` can read: weights dequantised back into
    initializers, integer convolutions and products as their float ops (the same shapes, hence the
    same MACs). Shapes are inferred on the int8 graph first, which ONNX knows how to follow."""
    import onnx
    from onnx import helper, numpy_helper

    view = onnx.shape_inference.infer_shapes(proto)
    initializers = {t.name: t for t in view.graph.initializer}
    nodes = []
    for node in view.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)  # zeros stay zeros
            view.graph.initializer.append(numpy_helper.from_array(weight, node.output[0]))
            continue
        if node.op_type in ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul"):
            weight = node.input[3] if node.op_type.startswith("QLinear") else node.input[1]
            plain = helper.make_node("Conv" if "Conv" in node.op_type else "MatMul", [node.input[0], weight], list(node.output), name=node.name)
            plain.attribute.extend(node.attribute)
            node = plain
        nodes.append(node)
    del view.graph.node[:]
    view.graph.node.extend(nodes)
    return view


def _counts(proto):
    return onnx_counts(_float_view(proto) if precision_of(proto) == "int8" else proto)


@dataclass
class BenchModel:
    """One model under test: its ONNX bytes and what is known about it."""

    name: str
    onnx: bytes
    proto: object
    macs: int
    torch_model: object | None = None  # for PyTorch eager timing, when the model came from a recipe
    macs_executed: int | None = None  # what the graph computes, zeros included (None: counted when needed)

    @property
    def precision(self) -> str:
        return precision_of(self.proto)

    @property
    def executed(self) -> int:
        if self.macs_executed is None:
            self.macs_executed = _counts(self.proto).macs_executed
        return self.macs_executed

    @property
    def converted(self) -> list[str]:
        """The Gabor banks the exporter recorded (`gaborprune.kernels_kept`): the converted layers."""
        stored = {e.key: e.value for e in self.proto.metadata_props}
        try:
            return sorted(json.loads(stored.get("gaborprune.kernels_kept", "{}")))
        except (ValueError, TypeError):
            return []

    @property
    def fixed_batch(self) -> int | None:
        dim = self.proto.graph.input[0].type.tensor_type.shape.dim[0]
        return dim.dim_value if dim.dim_value > 0 else None

    @property
    def chw(self) -> tuple[int, int, int]:
        dims = self.proto.graph.input[0].type.tensor_type.shape.dim
        return tuple(d.dim_value for d in dims[1:])

    @property
    def sample_bytes(self) -> int:
        """Bytes of every tensor one sample's run produces (inputs, intermediates, outputs), from ONNX
        shape inference: the same estimate as `gaborprune.probe.activation_bytes`, for models known
        only as ONNX files."""
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        try:
            graph = onnx.shape_inference.infer_shapes(self.proto).graph
        except Exception:  # a graph the inference cannot follow: count what the file declares
            graph = self.proto.graph
        total, batch = 0, self.fixed_batch
        for v in [*graph.input, *graph.value_info, *graph.output]:
            t = v.type.tensor_type
            if not t.HasField("shape") or not t.shape.dim:
                continue
            first = t.shape.dim[0]
            # only tensors with the batch dimension grow with the batch (an int8 graph's dequantised
            # weights do not: counted per sample they made a VGG-16 bench look like 22 GB)
            if not (first.dim_param if batch is None else first.dim_value == batch):
                continue
            try:
                size = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).itemsize
            except (KeyError, TypeError, ValueError):
                size = 4
            total += size * int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]))
        return total // (self.fixed_batch or 1)


def load_onnx(path: str | os.PathLike, name: str | None = None) -> BenchModel:
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"model file '{p}' not found")
    try:
        data = p.read_bytes()
        proto = onnx.load_from_string(data)
    except Exception:
        raise ExportError(f"'{p}' is not an ONNX model (give .onnx files, or recipes to export on the fly)") from None
    if not proto.graph.input:
        raise ExportError(f"'{p}' has no inputs")
    stored = {e.key: e.value for e in proto.metadata_props}
    counts = _counts(proto)
    macs = int(stored["gaborprune.macs"]) if "gaborprune.macs" in stored else counts.macs
    return BenchModel(name or str(p), data, proto, macs, macs_executed=counts.macs_executed)


def quantized(model: BenchModel, calibration: list[np.ndarray] | None = None) -> tuple[BenchModel, str]:
    """An int8 copy of a float model (`gaborprune.export.quantize.quantize_int8`: static on the
    `calibration` batches, else dynamic), named "NAME (int8)"; quantisation keeps every shape, so
    the executed MACs are the float model's.

    Returns:
        (the int8 model, "static" or "dynamic").
    """
    import onnx

    from gaborprune.export.quantize import quantize_int8

    try:
        blob, mode = quantize_int8(model.onnx, calibration)
    except ExportError as e:
        raise ExportError(f"cannot quantise '{model.name}' to int8: {str(e).split('; ')[0]}; bench without --int8, or give an int8 ONNX file") from None
    proto = onnx.load_from_string(blob)
    _carry_namespaces(model.proto, proto)
    return BenchModel(f"{model.name} (int8)", proto.SerializeToString(), proto, model.macs, macs_executed=model.executed), mode


def _carry_namespaces(source, quantised) -> None:
    """Give the quantiser's new nodes ("node_Conv_8_quant" for "node_Conv_8") the module path of the
    node they replace, so that a profile of the int8 model still names its layers."""
    spaces = {n.name: p.value for n in source.graph.node for p in n.metadata_props if p.key == "namespace"}
    for node in quantised.graph.node:
        if any(p.key == "namespace" for p in node.metadata_props):
            continue
        origin = max((name for name in spaces if node.name.startswith(name)), key=len, default=None)
        if origin is not None:
            entry = node.metadata_props.add()
            entry.key, entry.value = "namespace", spaces[origin]


def environment(threads: list[int], provider: str) -> dict:
    import onnxruntime as ort
    import torch

    from gaborprune._threads import load_average, usable_cores

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(), "platform": platform.platform(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "torch": torch.__version__, "provider": provider,
        "threads": threads, "inter_op_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": load_average(),  # 1-minute load when timing began: above the cores, the figures are noisy
    }


def load_note(env: dict) -> str:
    """" (1-minute load 0.42)" for a title, or "" where the platform has no load average."""
    load = env.get("load_average")
    return "" if load is None else f" (1-minute load {load:.2f})"


def load_warning(env: dict) -> str | None:
    """One line when the 1-minute load was above the usable cores: the models then wait for the CPU."""
    load, cores = env.get("load_average"), env.get("usable_cores") or env.get("cores")
    if load is None or not cores or load <= cores:
        return None
    return (f"the machine is busy (1-minute load {load:.1f} on {cores} cores): these timings are noisy and their intervals wide; "
            "rerun when the machine is quiet")


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
            notes.append(f"interval +-{self.interval.relative_width / 2:.1%} of {self.latency.runs} runs when --max-seconds ran out")
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


def compare(model: BenchModel, base: BenchModel, result: BenchResult, base_result: BenchResult, precision: float = PRECISION) -> Comparison:
    """The model against a baseline timed in the same interleaved runs, with its verdict: a gain
    below half of `precision` is within noise too, being finer than the medians were timed to."""
    macs, base_macs = model.executed, base.executed
    ratio = macs / base_macs if base_macs else 1.0
    head = (model.name, base.name, result.batch_size, result.threads)
    tail = dict(precision=model.precision, baseline_precision=base.precision, macs_executed=macs, baseline_macs_executed=base_macs)
    if model.precision != base.precision:
        hint = " or --int8" if model.precision == "int8" else ""
        return Comparison(*head, None, ratio, None, verdict=MIXED, note=f"{model.precision} model, {base.precision} baseline; "
                          f"add a --baseline of the model's precision{hint}", **tail)
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
        """The cells of the results table (`RESULT_COLUMNS`), shared by the terminal and Markdown reports."""
        rows = []
        for r in self.results:
            d = r.to_dict()
            rows.append([d["model"], d["runtime"], d["precision"], str(d["batch_size"]), str(d["threads"]), f"{d['p50_ms']:.3f}",
                         _ci(d["p50_low_ms"], d["p50_high_ms"]), f"{d['p90_ms']:.3f}", f"{d['p90_over_p50']:.2f}",
                         f"{d['runs']} in {d['rounds']}", f"{d['throughput']:.1f}", d["note"] or "ok"])
        return rows

    def comparison_rows(self) -> list[list[str]]:
        """The cells of the comparisons table (`COMPARISON_COLUMNS`)."""
        rows = []
        for c in self.comparisons:
            speedup = "-" if c.speedup is None else f"{c.speedup:.3f}x"
            eff = f"{c.efficiency:.2f}" if c.efficiency is not None else "n/a (" + (c.note if c.stable else c.verdict) + ")"
            verdict = f"{c.verdict} ({c.note})" if c.note and not c.stable else c.verdict
            rows.append([c.model, c.baseline, str(c.batch_size), str(c.threads), speedup, _ci(c.speedup_low, c.speedup_high),
                         f"{c.mac_ratio:.3f}", eff, verdict])
        return rows

    def share_line(self, model: str) -> str:
        """One line on how much of `model`'s profiled time the converted layers take (`converted_share`)."""
        share = self.converted[model]
        who = f"baseline {model}" if model in {c.baseline for c in self.comparisons} else model
        if share["share"] is None:
            return f"{who}: none of the converted layers shows in the profile"
        bound = f"at most {share['bound']:.2f}x" if share["bound"] is not None else "no bound (all its time)"
        return (f"{who}: {share['share']:.0%} of the time in the converted layers ({', '.join(share['layers'])}: {share['ms']:.3f} of "
                f"{share['total_ms']:.3f} ms); removing them entirely would give {bound}")

    def to_markdown(self, title: str = "gaborprune bench") -> str:
        """The report as Markdown: the settings and machine, the results, the comparisons and the profiles."""
        env, s = self.environment, self.settings
        lines = [f"# {title}", "", f"{env['date']}; {env['cpu']}, {env['cores']} cores{load_note(env)}; onnxruntime {env['onnxruntime']}, "
                 f"torch {env['torch']}, provider {env['provider']}, inter-op threads 1. Rounds of {s['runs_per_round']} interleaved runs "
                 f"until each median's 95% interval is within +-{s['precision'] / 2:.1%} or {s['max_seconds']:g} s are spent.", ""]
        lines += [f"**Warning:** {w}" for w in self.warnings] + ([""] if self.warnings else [])
        lines += ["| " + " | ".join(RESULT_COLUMNS) + " |", "|---|---|---|" + "---:|" * 8 + "---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.result_rows()]
        if self.comparisons:
            lines += ["", "Speedup: the median over interleaved runs of t_base / t, with its 95% interval; efficiency = "
                      "(1 - t/t_base) / (1 - MACs/MACs_base) on executed MACs, given only for a speedup beyond the noise.", "",
                      "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---|---|" + "---:|" * 6 + "---|"]
            lines += ["| " + " | ".join(row) + " |" for row in self.comparison_rows()]
        for model, layers in self.profiles.items():
            lines += ["", f"Per-layer time of {model} (ms per run, top {PROFILE_ROWS}):", "", "| layer | ms |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in top_layers(layers)]
            if model in self.converted:
                lines += ["", self.share_line(model) + "."]
        return "\n".join(lines) + "\n"


RESULT_COLUMNS = ("model", "runtime", "precision", "batch", "threads", "median ms", "95% CI ms", "p90 ms", "p90/p50", "runs in rounds", "images/s", "note")
COMPARISON_COLUMNS = ("model", "baseline", "batch", "threads", "speedup", "95% CI", "executed MAC ratio", "efficiency", "verdict")
PROFILE_ROWS = 15  # layers a profile lists, slowest first


def top_layers(layers: dict[str, float]) -> list[tuple[str, float]]:
    """A profile's slowest `PROFILE_ROWS` layers, slowest first."""
    return sorted(layers.items(), key=lambda kv: -kv[1])[:PROFILE_ROWS]


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def converted_share(layers: dict[str, float], converted: list[str]) -> dict:
    """The time a profile spends in the converted layers (a layer and the modules inside it), its share
    of the total, and the speedup bound that share implies if those layers cost nothing: 1 / (1 - share).
    The share and bound are None when no converted layer shows in the profile."""
    inside = sorted(k for k in layers if any(k == c or k.startswith(c + ".") for c in converted))
    ms, total = sum(layers[k] for k in inside), sum(layers.values())
    share = ms / total if inside and total > 0 else None
    bound = 1 / (1 - share) if share is not None and share < 1 else None
    return {"layers": inside, "ms": ms, "total_ms": total, "share": share, "bound": bound}


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
        check_threads(t, "--threads", ExportError)
    for b in batch_sizes:
        check_int(b, "--batch-size", error=ExportError)
    if not (is_int(runs) and is_int(warmup) and runs >= 1 and warmup >= 0):
        raise ExportError(f"--runs must be at least 1 and --warmup at least 0 (integers), not {runs!r} and {warmup!r}")
    check_timing(precision, max_seconds)


def check_timing(precision: object, max_seconds: object) -> None:
    """`precision` in (0, 1) and `max_seconds` above 0, before anything is exported or timed."""
    check_finite(precision, "--precision", ExportError)
    check_finite(max_seconds, "--max-seconds", ExportError)
    if not 0 < precision < 1:
        raise ExportError(f"--precision must be above 0 and below 1 (0.02: each median known to +-1%), not {precision!r}")
    if max_seconds <= 0:
        raise ExportError(f"--max-seconds must be above 0, not {max_seconds!r}")


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
            raise ExportError(f"two {b.precision} baselines ('{by_precision[b.precision].name}', '{b.name}'); give one --baseline per precision (float, int8)")
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
                              f"export it with --dynamic-batch or bench with --batch-size {m.fixed_batch}")
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
        check_batch_memory(per_sample * (2 if torch_eager else 1), max(batch_sizes), f"timing at batch {max(batch_sizes)}", "--batch-size", ExportError)
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
        report.warnings.append(f"{len(loose)} of {len(report.results)} medians did not reach +-{precision / 2:.1%} within --max-seconds "
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
