"""What `bench` times: ONNX files loaded with their MAC counts and precision (`BenchModel`,
`load_onnx`), and int8 copies of float models (`quantized`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gaborprune.errors import OnnxFileError
from gaborprune.export.macs import onnx_counts
from gaborprune.export.onnx import ExportError
from gaborprune.export.onnx_file import metadata_of, read_onnx

INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "ConvInteger",
                      "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul"})


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


def counts_of(proto, path: str | os.PathLike):
    """`onnx_counts` of a model read from `path` (an int8 one on its float view).

    Raises:
        OnnxFileError: ONNX cannot follow the graph's shapes or read its weights (one line).
    """
    try:
        return _counts(proto)
    except Exception as e:  # a graph ONNX shape inference cannot follow
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise OnnxFileError(f"cannot count the arithmetic of '{path}': ONNX shape inference fails ({detail})") from None


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
        kept = metadata_of(self.proto).get("gaborprune.kernels_kept", {})
        return sorted(kept) if isinstance(kept, dict) else []  # another shape is ignored (`metadata_of`)

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
    """An ONNX file to bench, read through the one checked loader (`gaborprune.export.onnx_file.read_onnx`:
    sizes checked before anything is allocated, external data only from inside the model's folder,
    inlined), with its MAC counts.

    Raises:
        OnnxFileError: every way the file can be unusable (one line): missing, corrupt, a size it does
            not hold, external data outside its folder, metadata `gaborprune.macs` that is not a count,
            a graph ONNX cannot count.
    """
    p = Path(path)
    proto = read_onnx(p)
    stored = {e.key: e.value for e in proto.metadata_props}
    if "gaborprune.macs" in stored and not isinstance(metadata_of(proto)["gaborprune.macs"], int):
        raise OnnxFileError(f"'{p}' records metadata gaborprune.macs {stored['gaborprune.macs'][:40]!r}, not a count of MACs; "
                            "export the model again, or remove that key")
    counts = counts_of(proto, p)
    macs = int(stored["gaborprune.macs"]) if "gaborprune.macs" in stored else counts.macs
    return BenchModel(name or str(p), proto.SerializeToString(), proto, macs, macs_executed=counts.macs_executed)


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
        raise ExportError(f"cannot quantise '{model.name}' to int8: {str(e).split('; ')[0]}; bench without `int8`, or give an int8 ONNX file") from None
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

