"""ONNX Runtime sessions: creation with fixed threads, latency timing, and per-layer profiles."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from gaborprune.errors import GaborPruneError, SessionError
from gaborprune.export.stats import Interval, median_interval


def providers(name: str = "cpu") -> list[str]:
    """The execution providers for `name` ("cpu" or "cuda"), checked against what is installed."""
    import onnxruntime as ort

    wanted = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if name not in wanted:
        raise SessionError(f"unknown provider '{name}'; known: cpu, cuda")
    missing = [p for p in wanted[name] if p not in ort.get_available_providers()]
    if missing:
        raise SessionError(f"ONNX Runtime provider {missing[0]} is not installed here (available: {', '.join(ort.get_available_providers())}); "
                            "install onnxruntime-gpu for cuda, or use `provider` cpu")
    return wanted[name]


def quiet_ort() -> None:
    """ONNX Runtime's default logger to errors only: sessions made without options (the quantiser's)
    log warnings through it ("Removing initializer ...") straight to the terminal."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


def session(model: bytes | str | os.PathLike, threads: int | None = None, provider: str = "cpu", profile_dir: str | None = None):
    """An InferenceSession with intra-op threads fixed (inter-op 1, sequential execution), logging
    errors only. A path is read through the checked loader (`gaborprune.export.onnx_file.read_onnx`)
    and handed over as bytes: ONNX Runtime given a path would follow links to external data.

    Raises:
        OnnxFileError: the file at a path `model` is unusable; SessionError: ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    if not isinstance(model, bytes):
        from gaborprune.export.onnx_file import read_onnx

        model = read_onnx(model).SerializeToString()
    quiet_ort()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort")
    try:
        return ort.InferenceSession(model, options, providers=providers(provider))
    except GaborPruneError:
        raise
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SessionError(f"ONNX Runtime cannot load the model ({detail})") from None


def input_spec(sess) -> tuple[str, list[int | str]]:
    i = sess.get_inputs()[0]
    return i.name, list(i.shape)


def run(sess, x: np.ndarray) -> np.ndarray:
    """The first output of `sess` on `x`."""
    return run_all(sess, x)[0]


def run_all(sess, x: np.ndarray) -> list[np.ndarray]:
    """Every output of `sess` on `x`, in order."""
    name, _ = input_spec(sess)
    try:
        return sess.run(None, {name: x})
    except Exception as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SessionError(f"the model cannot take an input of shape {list(x.shape)} ({detail}); check `input_shape` / `batch_size`") from None


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run of one configuration; `samples` keeps every run, in order, so that
    interleaved timings can be compared round by round (`gaborprune.export.stats.paired_ratio`)."""

    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    runs: int
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        return cls.of_ms(np.asarray(seconds) * 1e3)

    @classmethod
    def of_ms(cls, ms) -> Latency:
        """The summary of samples already in milliseconds (e.g. several rounds' `samples` joined)."""
        ms = np.asarray(ms, dtype=float)
        return cls(*(float(np.percentile(ms, q)) for q in (50, 90, 99)), float(ms.mean()), float(ms.std()), len(ms), tuple(map(float, ms)))

    @property
    def interval(self) -> Interval:
        """The median with its 95% confidence interval (a point when no samples were kept)."""
        return median_interval(self.samples) if self.samples else Interval(self.p50, self.p50, self.p50, self.runs)

    @property
    def tail(self) -> float:
        """p90 / p50: above 2, something else was running (the scheduler, not the model, set the figures)."""
        return self.p90 / self.p50 if self.p50 > 0 else math.inf


def time_interleaved(sessions: list, x: np.ndarray, warmup: int, runs: int) -> list[Latency]:
    """Time several sessions on the same input, taking turns run by run, so machine drift hits all.
    Run i starts with session i mod n: a fixed order would give one session the same place (and the
    same predecessor, whose data it finds in the caches) every time, and that bias is of the order of
    the differences being measured (0.5% between two identical graphs, here)."""
    for sess in sessions:
        for _ in range(warmup):
            run(sess, x)
    seconds: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        for j in range(len(sessions)):
            k = (i + j) % len(sessions)
            t0 = time.perf_counter()
            run(sessions[k], x)
            seconds[k].append(time.perf_counter() - t0)
    return [Latency.of(s) for s in seconds]


def layer_of(namespace: str, layers: list[str]) -> str | None:
    """The deepest of `layers` that a node's module path (from the exporter's namespace) is in."""
    paths = [part.split(": ")[0] for part in namespace.split("/") if ": " in part]
    best = None
    for layer in layers:
        if any(p == layer or p.startswith(layer + ".") for p in paths) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def node_layers(model_proto, layers: list[str]) -> dict[str, str]:
    """{ONNX node name: layer} for nodes inside one of `layers`; others map to their module path."""
    out = {}
    for node in model_proto.graph.node:
        namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        layer = layer_of(namespace, layers)
        if layer is None:
            paths = [part.split(": ")[0] for part in namespace.split("/") if ": " in part and "aten." not in part]
            layer = paths[-1] if paths and paths[-1] else node.op_type
        out[node.name] = layer
    return out


def _source_node(name: str, op: str, nodes: dict, producers: dict) -> str | None:
    """The graph node an optimised ONNX Runtime node came from. ORT renames nodes it rewrites
    ("conv2d_1_nchwc" for "node_conv2d_1") and names a fused Conv+Relu after the Relu; follow the
    Relu back to its Conv so the time lands on the convolution's layer."""
    base = re.sub(r"(_nchwc|_token_\d+)+$", "", name)
    found = next((c for c in (name, base, f"node_{base}") if c in nodes), None) or producers.get(base)  # or named after its output
    for _ in range(3):
        if found is None or nodes[found].op_type == op:
            break
        found = producers.get(nodes[found].input[0]) if nodes[found].input else None
    return found


def profile(model_bytes: bytes, model_proto, x: np.ndarray, layers: list[str], threads: int | None, runs: int = 20,
            provider: str = "cpu") -> dict[str, float]:
    """Median milliseconds per run spent in each layer's nodes (ONNX Runtime's profiler)."""
    mapping = node_layers(model_proto, layers)
    nodes = {n.name: n for n in model_proto.graph.node}
    producers = {out: n.name for n in model_proto.graph.node for out in n.output}
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model_bytes, threads, provider, profile_dir=tmp)
        for _ in range(3 + runs):
            run(sess, x)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per_run: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)
    seen_runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            seen_runs += 1
            if seen_runs > 3:  # skip warm-up runs
                for layer, us in current.items():
                    per_run[layer].append(us / 1e3)
            current = defaultdict(float)
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "")
            node = _source_node(e["name"][: -len("_kernel_time")], op, nodes, producers)
            current[mapping[node] if node else f"({op})"] += e.get("dur", 0)
    return {layer: statistics.median(v) for layer, v in per_run.items()}
