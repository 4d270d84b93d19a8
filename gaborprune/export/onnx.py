"""ONNX export through torch.onnx's dynamo exporter, the full checker, and parity with PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import warnings
import weakref

import numpy as np
import torch
from torch import Tensor, nn

from gaborprune.errors import ExportError

#: Models whose graph torch.export could not capture (a detector's data-dependent box selection):
#: exported with the TorchScript exporter without trying again (one failed capture costs seconds).
_NOT_CAPTURED: weakref.WeakSet = weakref.WeakSet()
#: The TorchScript exporter's opset when none is asked for (it writes up to 20).
TORCHSCRIPT_OPSET = 17


def to_onnx(model: nn.Module, input_shape: tuple[int, int, int, int], *, opset: int | None = None,
            dynamic_batch: bool = False, metadata: dict[str, object] | None = None):
    """Export `model` (eval mode) for inputs of `input_shape` (N, C, H, W) and run the full ONNX checker.

    The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) is the maintained path; its graph
    optimiser folds constants. A model whose graph torch.export cannot capture (a detector: Python
    control flow over its detections) is exported with the TorchScript exporter instead, as
    torchvision's own export tests do; the file's metadata "gaborprune.exporter" says which ran.
    The batch dimension is named "batch" when `dynamic_batch`, else fixed. `metadata` values are
    stored as strings (JSON for non-strings) in the model's metadata_props.

    Returns:
        onnx.ModelProto.
    """
    import onnx

    sample = torch.randn(*input_shape)
    exporter = "torchscript" if model in _NOT_CAPTURED else "dynamo"
    if exporter == "dynamo":
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
        try:
            with _quiet(), torch.no_grad():
                proto = torch.onnx.export(model.eval(), (sample,), dynamo=True, opset_version=opset, input_names=["input"],
                                          output_names=["output"], dynamic_shapes=dynamic_shapes, optimize=True).model_proto
        except Exception as e:
            if not _not_captured(e):
                raise ExportError(f"torch.onnx could not export the model for input {list(input_shape)} ({_first_line(e)})") from None
            _NOT_CAPTURED.add(model)
            exporter = "torchscript"
    if exporter == "torchscript":
        if opset is not None and opset > 20:
            raise ExportError(f"the model needs the TorchScript exporter, which writes opsets up to 20, not {opset}")
        buffer = io.BytesIO()
        try:
            with _quiet(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model.eval(), (sample,), buffer, dynamo=False, opset_version=opset or TORCHSCRIPT_OPSET, input_names=["input"],
                                  dynamic_axes={"input": {0: "batch"}} if dynamic_batch else None)
        except Exception as e:
            raise ExportError(f"torch.onnx could not export the model for input {list(input_shape)}, with torch.export "
                              f"or with TorchScript ({_first_line(e)})") from None
        proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name = "gaborprune"
    for key, value in ({"gaborprune.exporter": exporter} | (metadata or {})).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported model fails the ONNX checker ({str(e).strip().splitlines()[0][:200]})") from None
    return proto


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    detail = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
    return detail[0][:200] if detail else type(cause).__name__


def _not_captured(e: BaseException) -> bool:
    """Whether the dynamo exporter failed at its first step, capturing the graph with torch.export
    (data-dependent shapes, Python control flow), rather than translating a captured graph."""
    return "torch.export" in str(e)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter: its progress prints and torch.export's error logging (we raise instead)."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch.onnx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


#: The share of a detector's boxes that must be found in the other runtime's output (the rest may
#: differ by ties: which of two boxes with equal scores non-maximum suppression or top-k keeps is
#: decided by float rounding, in PyTorch as in onnxruntime).
MATCHED = 0.9


def _row_diff(want: np.ndarray, got: np.ndarray, score_col: int | None) -> tuple[float, float]:
    """(the difference of the detections `want` and `got` (rows), the share of rows matched).

    The difference is the largest of: the sorted scores' (ties swap boxes, never scores), and each
    matched row's relative to its magnitude (box corners are pixels). Each of `want`'s rows in turn
    takes the nearest unmatched row of `got`; a row is matched within 1e-4 relative."""
    scale = np.maximum(1.0, np.abs(want).max(axis=1))  # [n]
    dist = np.abs(want[:, None, :] - got[None, :, :]).max(axis=2) / scale[:, None]  # [n, n]
    nearest = []
    for i in range(len(want)):
        j = int(np.argmin(dist[i]))
        nearest.append(dist[i, j])
        dist[:, j] = np.inf
    nearest = np.array(nearest)
    matched = nearest <= 1e-4
    diff = float(nearest[matched].max(initial=0.0))
    if score_col is not None:
        diff = max(diff, float(np.abs(np.sort(want[:, score_col]) - np.sort(got[:, score_col])).max()))
    return diff, float(matched.mean())


@torch.no_grad()
def parity(sess, reference: nn.Module, inputs: list[Tensor]) -> tuple[float, float]:
    """(max |onnxruntime - PyTorch| over all inputs and every output tensor, the lowest cosine
    similarity of an input's outputs).

    Outputs that are not one tensor (a segmenter's dict, a detector's boxes, scores and labels per
    image) are compared in order (`output_groups`). A group of tensors with one row per detection
    (a dict of tensors of the same length) is compared as a set of rows (`_row_diff`): their
    sorted scores, and at least MATCHED of the rows each found on the other side; a detector keeping
    another number of boxes is refused. Outputs of other shapes differ by infinity.

    Raises:
        ExportError: either side gives a NaN or infinite output (NaN compares false, so it would
            pass), a detector keeps another number of boxes, or fewer than MATCHED of its boxes are
            found on the other side.
    """
    from gaborprune.export.runtime import run_all
    from gaborprune.prune.part import output_groups

    reference = reference.eval()
    worst_diff, worst_cos = 0.0, 1.0
    for x in inputs:
        got = [y.astype(np.float64) for y in run_all(sess, x.numpy())]
        with torch.no_grad():
            groups = [[t.double().numpy() for t in g] for g in output_groups(reference(x))]
        want = [y for g in groups for y in g]
        for side, ys in (("PyTorch", want), ("onnxruntime", got)):
            if not all(np.isfinite(y).all() for y in ys):
                raise ExportError(f"the model's outputs in {side} are NaN or infinite on the check inputs; nothing was written")
        if [y.ndim for y in got] != [y.ndim for y in want]:
            return math.inf, 0.0
        k = 0
        for g in groups:
            theirs, k = got[k:k + len(g)], k + len(g)
            detections = len(g) > 1 and g[0].ndim and len({len(y) for y in g}) == 1 and len({len(y) for y in theirs}) == 1  # a row each
            if detections and len(theirs[0]) != len(g[0]):
                raise ExportError(f"PyTorch keeps {len(g[0])} detections and onnxruntime {len(theirs[0])} on a check input (boxes whose scores tie, "
                                  "or BatchNorm statistics that do not fit the weights, e.g. untrained or after pruning: `gp.recalibrate_norms_`); "
                                  "export it trained; nothing was written")
            if [y.shape for y in theirs] != [y.shape for y in g]:
                return math.inf, 0.0
            if detections and len(g[0]) > 1:
                rows = [np.concatenate([y.reshape(len(y), -1) for y in ys], axis=1) for ys in (g, theirs)]
                widths = np.cumsum([0] + [y[0].size for y in g])
                scores = [int(widths[i]) for i, y in enumerate(g) if y.ndim == 1 and not np.all(np.mod(y, 1) == 0)]
                diff, share = _row_diff(*rows, scores[0] if scores else None)
                if share < MATCHED:
                    raise ExportError(f"only {share:.0%} of the model's {len(rows[0])} detections are found in onnxruntime's output (the rest "
                                      "differ, or tie: untrained weights score many boxes alike and then which are kept is arbitrary); "
                                      "export it trained (`weights`); nothing was written")
                worst_diff = max(worst_diff, diff)
                continue
            for a, b in zip(g, theirs):
                if a.size:
                    worst_diff = max(worst_diff, float(np.abs(a - b).max()))
                denom = np.linalg.norm(a) * np.linalg.norm(b)
                worst_cos = min(worst_cos, float(np.dot(a.ravel(), b.ravel()) / denom) if denom > 0 else 1.0)
    return worst_diff, worst_cos
