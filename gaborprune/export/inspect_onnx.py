"""ONNX files as a deployment engineer holds them: `describe_onnx` (what `inspect` shows) and
`evaluate_onnx` (what `eval` scores, in ONNX Runtime).

An exported file is judged on its own: its graph, its declared input and output, and the metadata
`gaborprune.export.api.export_model` wrote into it ("gaborprune.*" keys), not on the recipe it came from.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gaborprune._validate import check_batch_memory, check_int, check_threads
from gaborprune.errors import OnnxFileError
from gaborprune.export.onnx_file import metadata_of, read_onnx

#: `evaluate_onnx`'s `provider`: ONNX Runtime's execution providers by the names `--device` takes.
PROVIDERS = ("auto", "cpu", "cuda")


def is_onnx_path(spec: str | os.PathLike) -> bool:
    """A model source that names an ONNX file (by its suffix, as `bench` tells them apart)."""
    return str(spec).lower().endswith(".onnx")


@dataclass
class OnnxSummary:
    """What an ONNX file holds. Shapes list ints, or the dimension's name where it is dynamic ("batch")."""

    path: str
    file_bytes: int
    opset: int
    ir_version: int
    producer: str  # "name version" as the file records it
    precision: str  # "float", or "int8" for a graph with quantised operators
    inputs: list[dict]  # [{"name", "shape", "dtype"}]
    outputs: list[dict]
    ops: dict[str, int]  # {op_type: nodes}, most frequent first
    params: int  # floating-point initializer values (an int8 graph: counted on its dequantised weights)
    macs: int  # per image: Conv/Gemm/MatMul, all-zero kernels skipped (`gaborprune.export.macs.onnx_counts`)
    macs_executed: int  # per image, zero kernels included: what ONNX Runtime computes
    metadata: dict[str, object] = field(default_factory=dict)  # metadata_props, JSON values decoded

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def nodes(self) -> int:
        return sum(self.ops.values())

    @property
    def input_shape(self) -> list:
        """The first input's shape after the batch dimension (C, H, W for an image model)."""
        return self.inputs[0]["shape"][1:]

    def to_dict(self) -> dict:
        d = asdict(self)
        d |= {"format": "onnx", "input_shape": self.input_shape, "nodes": self.nodes, "flops": self.flops}
        return d


def describe_onnx(path: str | os.PathLike) -> OnnxSummary:
    """Summarise an ONNX file: operators, parameters, MACs per image, input and output, opset and
    the metadata gaborprune (or anyone) wrote into it.

    Raises:
        OnnxFileError: see `read_onnx`.
    """
    from gaborprune.export.bench_models import counts_of, precision_of
    from gaborprune.export.onnx import opset_of

    proto = read_onnx(path)
    p = Path(path)
    counts = counts_of(proto, p)
    try:
        opset = opset_of(proto)
    except StopIteration:
        raise OnnxFileError(f"'{p}' imports no default-domain opset; it is not a model ONNX Runtime can run") from None
    ops = dict(Counter(n.op_type for n in proto.graph.node).most_common())
    producer = " ".join(v for v in (proto.producer_name, proto.producer_version) if v)
    return OnnxSummary(str(p), p.stat().st_size, opset, proto.ir_version, producer, precision_of(proto), _values(proto.graph.input),
                       _values(proto.graph.output), ops, counts.params, counts.macs, counts.macs_executed,
                       metadata_of(proto))


def _values(infos) -> list[dict]:
    from onnx.helper import tensor_dtype_to_np_dtype

    out = []
    for v in infos:
        t = v.type.tensor_type
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name
        except (KeyError, TypeError, ValueError):
            dtype = f"type {t.elem_type}"
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


def input_chw(path: str | os.PathLike) -> tuple[int, int, int]:
    """The (C, H, W) of an image model's input (N, C, H, W), to bring data to.

    Raises:
        OnnxFileError: the input is not 4-D, or its C, H or W is dynamic.
    """
    shape = _values(read_onnx(path).graph.input)[0]["shape"]
    if len(shape) != 4:
        raise OnnxFileError(f"'{path}' takes an input of shape {shape}, not N,C,H,W images")
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise OnnxFileError(f"'{path}' takes images of size {shape[1:]} (dynamic); give `input_shape` C,H,W")
    return tuple(shape[1:])


def check_onnx_options(path: str | os.PathLike, **given: object) -> None:
    """Refuse model options an ONNX file fixes itself; `given` maps an argument of `load_model`
    ("weights") to its value, None when not given."""
    passed = [f"`{name}`" for name, value in given.items() if value not in (None, [], ())]
    if passed:
        raise OnnxFileError(f"'{path}' is an ONNX model, which fixes its weights, classes and shape; drop {'/'.join(passed)}")


@dataclass(frozen=True)
class OnnxEvalResult:
    """`gaborprune.train.EvalResult`'s figures, computed the same way, from ONNX Runtime's logits."""

    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float  # mean cross-entropy
    samples: int
    provider: str  # "cpu" or "cuda"
    batch_size: int  # the batch fed (a fixed-batch file's own; the last short batch zero-padded)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_onnx(path: str | os.PathLike, dataset, *, batch_size: int | None = None, threads: int | None = None,
                  provider: str = "auto", data_name: str | None = None) -> OnnxEvalResult:
    """Top-1 / top-5 accuracy and mean cross-entropy of an ONNX file in ONNX Runtime on `dataset`'s
    evaluation split (a `TensorData` or `FolderData`: normalised Tensor[B, C, H, W] batches).

    Args:
        batch_size: images per run (default 256); a file with a fixed batch takes only its own.
        threads: ONNX Runtime's intra-op threads (default: its own, one per core).
        provider: "cpu", "cuda" (onnxruntime-gpu), or "auto" (CUDA when ONNX Runtime has it).
        data_name: the dataset's name in error messages.

    Raises:
        OnnxFileError: the file is unreadable, or its input shape, dtype, output width or fixed
            batch does not fit the data or `batch_size` (one line naming both sides).
    """
    import torch
    import torch.nn.functional as F

    from gaborprune.export.bench_models import BenchModel
    from gaborprune.export.quantize import onnx_batches
    from gaborprune.export.runtime import session

    if batch_size is not None:
        check_int(batch_size, "`batch_size`", error=OnnxFileError)
    if threads is not None:
        check_threads(threads, "`threads`", OnnxFileError)
    if provider not in PROVIDERS:
        raise OnnxFileError(f"unknown device '{provider}' for ONNX Runtime; known: {', '.join(PROVIDERS)}")
    proto = read_onnx(path)
    (given,), (made,) = _values(proto.graph.input[:1]), _values(proto.graph.output[:1])
    shape, width = given["shape"], made["shape"][1] if len(made["shape"]) == 2 else None
    if len(proto.graph.input) > 1:
        raise OnnxFileError(f"'{path}' takes {len(proto.graph.input)} inputs; eval feeds one batch of images")
    if len(shape) != 4 or given["dtype"] != "float32":
        raise OnnxFileError(f"'{path}' takes {given['dtype']} {shape}, not float32 N,C,H,W images")
    if len(made["shape"]) != 2:
        raise OnnxFileError(f"'{path}' outputs {made['shape']}, not [N, classes] logits")
    what = f"dataset '{data_name}'" if data_name else "the data"
    if isinstance(width, int) and width != dataset.num_classes:
        raise OnnxFileError(f"'{path}' has {width} outputs but {what} has {dataset.num_classes} classes; "
                            f"evaluate it on data with {width} classes, or export a model built with `num_classes` {dataset.num_classes}")
    sample = next(iter(dataset.batches(1, train=False)), None)
    if sample is None:
        raise OnnxFileError(f"{what} has no test images")
    chw = list(sample[0].shape[1:])
    if any(isinstance(want, int) and want != got for want, got in zip(shape[1:], chw)):
        raise OnnxFileError(f"'{path}' takes images of {'x'.join(map(str, shape[1:]))} but {what} gives {'x'.join(map(str, chw))}; "
                            f"bring the data to {','.join(map(str, shape[1:]))} (drop `input_shape`)")
    fixed = shape[0] if isinstance(shape[0], int) else None
    if fixed is not None and batch_size not in (None, fixed):
        raise OnnxFileError(f"'{path}' has a fixed batch of {fixed}, not `batch_size` {batch_size}; drop `batch_size`, or export with `dynamic_batch`")
    batch = fixed or batch_size or 256
    model = BenchModel(str(path), b"", proto, 0)
    check_batch_memory(model.sample_bytes, min(batch, len(dataset)), f"evaluating '{path}' at batch {batch}", "`batch_size`", OnnxFileError)
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not cuda:
        raise OnnxFileError(f"ONNX Runtime has no CUDA provider here (available: {', '.join(ort.get_available_providers())}); "
                            "install onnxruntime-gpu, or give `provider` cpu")
    provider = provider if provider != "auto" else "cuda" if cuda else "cpu"
    sess = session(proto.SerializeToString(), threads, provider)  # the checked model, its external data inlined: never the path
    k = min(5, dataset.num_classes)
    correct1 = correct5 = count = 0
    loss_sum = 0.0
    for logits, y in onnx_batches(sess, dataset, batch):
        if logits.shape[1] != dataset.num_classes:  # a dynamic output width, known only now
            raise OnnxFileError(f"'{path}' has {logits.shape[1]} outputs but {what} has {dataset.num_classes} classes; "
                                f"evaluate it on data with {logits.shape[1]} classes, or export a model built with `num_classes` {dataset.num_classes}")
        logits = torch.from_numpy(np.ascontiguousarray(logits)).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        count += len(y)
    return OnnxEvalResult(100 * correct1 / count, 100 * correct5 / count, loss_sum / count, count, provider, batch)
