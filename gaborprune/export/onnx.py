"""ONNX export through torch.onnx's dynamo exporter, the full checker, and parity with PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import numpy as np
import torch
from torch import Tensor, nn

from gaborprune.errors import ExportError


def to_onnx(model: nn.Module, input_shape: tuple[int, int, int, int], *, opset: int | None = None,
            dynamic_batch: bool = False, metadata: dict[str, object] | None = None):
    """Export `model` (eval mode) for inputs of `input_shape` (N, C, H, W) and run the full ONNX checker.

    The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) is the maintained path; its graph
    optimiser folds constants. The batch dimension is named "batch" when `dynamic_batch`, else fixed.
    `metadata` values are stored as strings (JSON for non-strings) in the model's metadata_props.

    Returns:
        onnx.ModelProto.
    """
    import onnx

    sample = torch.randn(*input_shape)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model.eval(), (sample,), dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["output"], dynamic_shapes=dynamic_shapes, optimize=True)
    except Exception as e:
        cause = e.__cause__ or e
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
        raise ExportError(f"torch.onnx could not export the model for input {list(input_shape)} "
                          f"({detail[0][:200] if detail else type(cause).__name__})") from None
    proto = program.model_proto
    proto.producer_name = "gaborprune"
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported model fails the ONNX checker ({str(e).strip().splitlines()[0][:200]})") from None
    return proto


@contextlib.contextmanager
def _quiet():
    """Silence the exporter: its progress prints and torch.export's error logging (we raise instead)."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch.onnx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@torch.no_grad()
def parity(sess, reference: nn.Module, inputs: list[Tensor]) -> tuple[float, float]:
    """(max |onnxruntime - PyTorch| over all inputs, the lowest cosine similarity of an input's outputs).

    Raises:
        ExportError: either side gives a NaN or infinite output (NaN compares false, so it would pass).
    """
    from gaborprune.export.runtime import run

    reference = reference.eval()
    worst_diff, worst_cos = 0.0, 1.0
    for x in inputs:
        got = run(sess, x.numpy()).astype(np.float64)
        with torch.no_grad():
            want = reference(x).double().numpy()
        for side, y in (("PyTorch", want), ("onnxruntime", got)):
            if not np.isfinite(y).all():
                raise ExportError(f"the model's outputs in {side} are NaN or infinite on the check inputs; nothing was written")
        worst_diff = max(worst_diff, float(np.abs(got - want).max()))
        denom = np.linalg.norm(got) * np.linalg.norm(want)
        worst_cos = min(worst_cos, float(np.dot(got.ravel(), want.ravel()) / denom) if denom > 0 else 1.0)
    return worst_diff, worst_cos
