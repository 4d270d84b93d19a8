"""int8 quantisation through onnxruntime.quantization, and ONNX top-1 accuracy."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from gaborprune.export.onnx import ExportError
from gaborprune.export.runtime import input_spec, run


def quantize_int8(model: bytes, calibration: list[np.ndarray] | None = None) -> tuple[bytes, str]:
    """An int8 copy of a float ONNX model: static (QDQ, per-channel weights, activations calibrated
    on `calibration` batches) when batches are given, else dynamic (weights int8, activations
    quantised at run time).

    Returns:
        (the quantised model, "static" or "dynamic").
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    root = logging.getLogger()
    level = root.level
    # the quantiser logs "Please consider to run pre-processing before quantization" on the root
    # logger for every model; gaborprune's graphs are already shape-inferred and folded
    root.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model)
        try:
            if calibration:
                quantize_static(src, dst, Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                mode = "static"
            else:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
                mode = "dynamic"
        except Exception as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ExportError(f"int8 quantisation failed ({detail}); export without --quantize") from None
        finally:
            root.setLevel(level)
        return dst.read_bytes(), mode


def calibration_batches(data, batch_size: int, limit: int = 256) -> list[np.ndarray]:
    """Up to `limit` training images as full batches of `batch_size` (normalised, no augmentation)."""
    batches, seen = [], 0
    for x, _ in data.batches(batch_size, train=False):
        if len(x) < batch_size or seen >= limit:
            break
        batches.append(x.float().cpu().numpy())
        seen += len(x)
    return batches


def onnx_top1(sess, data) -> float:
    """Top-1 accuracy (percent) of an ONNX session on `data`, padding a last short batch when the
    model's batch dimension is fixed."""
    _, shape = input_spec(sess)
    fixed = shape[0] if isinstance(shape[0], int) else None
    correct = total = 0
    for x, y in data.batches(fixed or 256, train=False):
        n = len(x)
        if fixed and n < fixed:
            x = torch.cat([x, x.new_zeros(fixed - n, *x.shape[1:])])
        logits = run(sess, x.float().cpu().numpy())[:n]
        correct += int((logits.argmax(1) == y.cpu().numpy()).sum())
        total += n
    return 100 * correct / max(total, 1)
