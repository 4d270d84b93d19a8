"""Parameters and multiply-accumulates of an ONNX graph, for one input image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    params: int  # floating-point initializer values
    macs: int  # convolution and matrix products, all-zero kernels skipped (the model's arithmetic)
    macs_executed: int  # the same, zero kernels included (what a dense kernel computes)


def _run_shapes(proto, names: list[str]) -> dict[str, list[int]]:
    """The shapes of tensors `names` in one onnxruntime run of `proto` on zeros (a dynamic dimension
    taken as 1), or {} where the graph does not run so."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    from gaborprune.export.runtime import session

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    feeds = {}
    for i in proto.graph.input:
        try:
            dtype = tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        except (KeyError, ValueError):
            return {}
        feeds[i.name] = np.zeros([d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim], dtype=dtype)
    try:
        outputs = session(probe.SerializeToString(), threads=1).run(names, feeds)
    except Exception:  # a graph that does not run on zeros: the inferred shapes stand
        return {}
    return {n: list(y.shape) for n, y in zip(names, outputs)}


def onnx_counts(proto) -> Counts:
    """Count Conv, Gemm and MatMul work per image from the initializers and inferred shapes.

    Where shape inference cannot follow the graph (a detector exported by TorchScript resizes its
    input with computed sizes), the outputs of its Conv, Gemm and MatMul nodes are measured in one
    onnxruntime run on zeros instead."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes, unknown = {}, set()
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.dim_value > 0 else 1 for d in dims]
        if any(d.dim_value <= 0 for d in list(dims)[1:]) or not v.type.tensor_type.HasField("shape"):  # a named batch is fine
            unknown.add(v.name)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    counted = [n.output[0] for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in weights]
    missing = [name for name in counted if name in unknown or name not in shapes]
    if missing:
        shapes |= _run_shapes(proto, missing)
    params = sum(w.size for w in weights.values() if np.issubdtype(w.dtype, np.floating))
    macs = executed = 0
    for node in proto.graph.node:
        out = shapes.get(node.output[0])
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or out is None:
            continue
        batch = out[0] if out else 1
        if node.op_type == "Conv" and w.ndim == 4:
            spatial = int(np.prod(out[2:]))
            taps = w.shape[2] * w.shape[3]
            present = int((np.abs(w).reshape(w.shape[0], w.shape[1], -1).max(axis=2) > 0).sum())
            macs += present * taps * spatial
            executed += w.shape[0] * w.shape[1] * taps * spatial
        elif node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
            rows = int(np.prod(out[:-1])) // max(batch, 1)
            macs += int((w != 0).sum()) * rows
            executed += w.size * rows
    return Counts(int(params), int(macs), int(executed))
