"""`bench`: ONNX Runtime latency over a grid of batch sizes and thread counts, side by side with a
baseline, with the share of removed arithmetic that became saved time."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gaborprune._validate import check_batch_memory, check_int, check_threads
from gaborprune.export.macs import onnx_counts
from gaborprune.export.onnx import ExportError
from gaborprune.export.runtime import Latency, profile, session, time_interleaved


@dataclass
class BenchModel:
    """One model under test: its ONNX bytes and what is known about it."""

    name: str
    onnx: bytes
    proto: object
    macs: int
    torch_model: object | None = None  # for PyTorch eager timing, when the model came from a recipe

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
        total = 0
        for v in [*graph.input, *graph.value_info, *graph.output]:
            t = v.type.tensor_type
            if not t.HasField("shape"):
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
    macs = int(stored["gaborprune.macs"]) if "gaborprune.macs" in stored else onnx_counts(proto).macs
    return BenchModel(name or str(p), data, proto, macs)


def environment(threads: list[int], provider: str) -> dict:
    import onnxruntime as ort
    import torch

    from gaborprune._threads import load_average

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "onnxruntime": ort.__version__, "torch": torch.__version__, "provider": provider, "threads": threads,
        "inter_op_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": load_average(),  # 1-minute load when timing began: above the cores, the figures are noisy
    }


@dataclass
class BenchResult:
    model: str
    batch_size: int
    threads: int
    latency: Latency
    runtime: str = "onnxruntime"

    @property
    def throughput(self) -> float:
        return self.batch_size / (self.latency.p50 / 1e3)

    def to_dict(self) -> dict:
        lat = self.latency
        return {"model": self.model, "runtime": self.runtime, "batch_size": self.batch_size, "threads": self.threads,
                "p50_ms": lat.p50, "p90_ms": lat.p90, "p99_ms": lat.p99, "mean_ms": lat.mean, "std_ms": lat.std,
                "runs": lat.runs, "throughput": self.throughput}


@dataclass
class Comparison:
    model: str
    baseline: str
    batch_size: int
    threads: int
    speedup: float  # baseline p50 / model p50
    mac_ratio: float  # model MACs / baseline MACs
    efficiency: float | None  # (1 - t/t_base) / (1 - MACs/MACs_base): share of removed arithmetic that became time

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    environment: dict
    results: list[BenchResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {layer: ms}

    def to_dict(self) -> dict:
        return {"environment": self.environment, "results": [r.to_dict() for r in self.results],
                "comparisons": [c.to_dict() for c in self.comparisons], "profiles": self.profiles}


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


def bench(models: list[BenchModel], *, baseline: BenchModel | None = None, batch_sizes: tuple[int, ...] = (1,),
          threads: tuple[int, ...] = (1,), warmup: int = 10, runs: int = 100, provider: str = "cpu",
          profile_layers: bool = False, torch_eager: bool = False) -> BenchReport:
    """Time every model (and the baseline) at each (batch size, threads), interleaving the models run
    by run within a configuration so machine drift hits all alike.

    Raises:
        ExportError: a model with a fixed batch dimension asked for another batch size, models
            with different input shapes, thread counts beyond the machine's, or a batch whose
            estimated memory does not fit (all before anything is timed).
    """
    for t in threads:
        check_threads(t, "--threads", ExportError)
    for b in batch_sizes:
        check_int(b, "--batch-size", error=ExportError)
    check_int(runs, "--runs", error=ExportError)
    check_int(warmup, "--warmup", 0, ExportError)
    everyone = models + ([baseline] if baseline is not None else [])
    shapes = {m.chw for m in everyone}
    if len(shapes) > 1:
        raise ExportError(f"the models take different inputs ({', '.join('x'.join(map(str, s)) for s in sorted(shapes))}); bench models of one input shape together")
    for m in everyone:
        bad = [b for b in batch_sizes if m.fixed_batch is not None and b != m.fixed_batch]
        if bad:
            raise ExportError(f"'{m.name}' has a fixed batch of {m.fixed_batch} and cannot run batch {bad[0]}; "
                              f"export it with --dynamic-batch or bench with --batch-size {m.fixed_batch}")
    if batch_sizes:
        per_sample = sum(m.sample_bytes for m in everyone)  # every model's session is alive in a configuration
        check_batch_memory(per_sample * (2 if torch_eager else 1), max(batch_sizes), f"timing at batch {max(batch_sizes)}", "--batch-size", ExportError)
    report = BenchReport(environment(list(threads), provider))
    chw = shapes.pop()
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        x = rng.standard_normal((b, *chw), dtype=np.float32)
        for t in threads:
            sessions = [session(m.onnx, t, provider) for m in everyone]
            latencies = time_interleaved(sessions, x, warmup, runs)
            results = {m.name: BenchResult(m.name, b, t, lat) for m, lat in zip(everyone, latencies)}
            report.results += results.values()
            if torch_eager:
                report.results += [BenchResult(m.name, b, t, _torch_latency(m.torch_model, x, t, warmup, runs), "pytorch")
                                   for m in everyone if m.torch_model is not None]
            if baseline is not None:
                base = results[baseline.name].latency.p50
                for m in models:
                    ratio = m.macs / baseline.macs if baseline.macs else 1.0
                    time_ratio = results[m.name].latency.p50 / base
                    efficiency = (1 - time_ratio) / (1 - ratio) if ratio < 1 else None
                    report.comparisons.append(Comparison(m.name, baseline.name, b, t, base / results[m.name].latency.p50, ratio, efficiency))
    if profile_layers:
        x = rng.standard_normal((batch_sizes[0], *chw), dtype=np.float32)
        for m in everyone:
            report.profiles[m.name] = profile(m.onnx, m.proto, x, _layers(m.proto), threads[0], runs=min(runs, 30), provider=provider)
    return report


def _layers(proto) -> list[str]:
    """Module paths of the convolution and linear layers, from the exporter's node metadata: the
    innermost module, or the lowering wrapper (MapBias, SplitConv) that stands for the layer."""
    layers = set()
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
            entries = [part.split(": ", 1) for part in namespace.split("/") if ": " in part and "aten." not in part]
            wrapper = next((path for path, cls in entries if cls.endswith((".MapBias", ".SplitConv"))), None)
            if wrapper or (entries and entries[-1][0]):
                layers.add(wrapper or entries[-1][0])
    return sorted(layers)
