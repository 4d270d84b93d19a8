"""int8 quantisation through onnxruntime.quantization, and ONNX top-1 accuracy."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from gaborprune.export.onnx import ExportError
from gaborprune.export.runtime import input_spec, quiet_ort, run


def quantize_int8(model: bytes, calibration: list[np.ndarray] | None = None) -> tuple[bytes, str]:
    """An int8 copy of a float ONNX model: static (QDQ, per-channel weights, activations calibrated
    on `calibration` batches) when batches are given, else dynamic (weights int8, activations
    quantised at run time).

    The float model first goes through ONNX Runtime's quantisation pre-processing (symbolic shape
    inference, its basic graph optimisations), as the quantiser asks. Where that fails, the model
    is quantised as it is, and the int8 model's metadata says so (`PRE_PROCESS_SKIPPED`). Either
    way nothing reaches the console: the quantiser's advice to pre-process is dropped, and the
    handler its `logging.warning` calls install on the root logger is removed again.

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

    quiet_ort()
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        src, pre, dst = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model)
        skipped = _pre_process(src, pre)
        try:
            if calibration:
                quantize_static(src if skipped else pre, dst, Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                mode = "static"
            else:
                quantize_dynamic(src if skipped else pre, dst, weight_type=QuantType.QInt8)
                mode = "dynamic"
        except Exception as e:
            raise ExportError(f"int8 quantisation failed ({_first_line(e)}); export without `quantize`") from None
        if not skipped:
            return dst.read_bytes(), mode
        import onnx

        proto = onnx.load(dst)
        entry = proto.metadata_props.add()
        entry.key, entry.value = PRE_PROCESS_SKIPPED, skipped
        return proto.SerializeToString(), mode


#: The int8 model's metadata key saying why ONNX Runtime's pre-processing was skipped (absent when it ran).
PRE_PROCESS_SKIPPED = "gaborprune.quant_pre_process_skipped"
_ADVICE = "pre-processing before quantization"  # in both forms of the quantiser's advice ("consider (to run) pre-processing ...")


def _pre_process(src: Path, dst: Path) -> str | None:
    """ONNX Runtime's `quant_pre_process` from `src` into `dst`; None when it ran, else why not (one line).

    It reports a failed graph optimisation on its logger instead of raising: that counts as a
    failure too (the model it then writes was not optimised), and the log lines are kept off the console.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    log = logging.getLogger("onnxruntime.quantization.shape_inference")
    failures = _Records(logging.ERROR)
    log.addHandler(failures)
    propagate, log.propagate = log.propagate, False
    try:
        quant_pre_process(src, dst)
    except Exception as e:
        return _first_line(e)
    finally:
        log.removeHandler(failures)
        log.propagate = propagate
    if failures.records:
        return failures.records[0].getMessage().strip().splitlines()[0][:200]
    return None if dst.is_file() else "it wrote no model"


class _Records(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _quiet_quantizer():
    """Drop the quantiser's advice to pre-process, and undo the root handler its module-level
    `logging.warning` calls install (`logging.basicConfig`), through which any later warning of any
    library would print as "WARNING:name:..."."""
    root = logging.getLogger()
    handlers = list(root.handlers)

    def keep(record: logging.LogRecord) -> bool:
        return _ADVICE not in str(record.msg)

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def calibration_batches(data, batch_size: int, limit: int = 256) -> list[np.ndarray]:
    """Up to `limit` training images, drawn at random (seeded: an image tree lists its classes in
    order), as full batches of `batch_size` (normalised, no augmentation)."""
    batches, seen = [], 0
    for x, _ in data.sample(limit + batch_size).batches(batch_size, train=False):
        if len(x) < batch_size or seen >= limit:
            break
        batches.append(x.float().cpu().numpy())
        seen += len(x)
    return batches


def onnx_batches(sess, data, batch_size: int = 256):
    """(logits as numpy float32 [n, ...], labels as Tensor[n]) of an ONNX session over `data`'s
    evaluation batches. A model with a fixed batch dimension gets exactly that batch: the last
    short one is padded with zeros and its padded rows dropped from the logits."""
    _, shape = input_spec(sess)
    fixed = shape[0] if isinstance(shape[0], int) else None
    for x, y in data.batches(fixed or batch_size, train=False):
        n = len(x)
        if fixed and n < fixed:
            x = torch.cat([x, x.new_zeros(fixed - n, *x.shape[1:])])
        yield run(sess, x.float().cpu().numpy())[:n], y.cpu()


def onnx_top1(sess, data) -> float:
    """Top-1 accuracy (percent) of an ONNX session on `data` (`onnx_batches`)."""
    correct = total = 0
    for logits, y in onnx_batches(sess, data):
        correct += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return 100 * correct / max(total, 1)
