"""Parameters and multiply-accumulates of an ONNX graph, for one input image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Counts:
    params: int  # floating-point initializer values
    macs: int  # convolution and matrix products, all-zero kernels skipped (the model's arithmetic)
    macs_executed: int  # the same, zero kernels included (what a dense kernel computes)


def onnx_counts(proto) -> Counts:
    """Count Conv, Gemm and MatMul work per image from the initializers and inferred shapes."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        shapes[v.name] = [d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim]
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
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
