"""`export_model`: lower, choose the form by measuring (`gaborprune.export.search`), export, check, write."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gaborprune import __version__
from gaborprune._io import check_output, write_bytes
from gaborprune._validate import check_batch_memory, check_finite, check_threads
from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import GaborPruneError
from gaborprune.export.macs import onnx_counts
from gaborprune.export.onnx import ExportError, opset_of, parity, to_onnx
from gaborprune.export.quantize import calibration_batches, onnx_top1, quantize_int8
from gaborprune.export.runtime import session
from gaborprune.export.search import Lowerings, search
from gaborprune.models import non_finite
from gaborprune.probe import activation_bytes

LOWERINGS = ("auto", "dense", "sparse")
PAD_CHANNELS = (0, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ExportConfig:
    """How to export.

    Attributes:
        batch_size: the (static) batch dimension; with `dynamic_batch` the batch used for checks.
        lowering: "auto" (time whole-graph candidates on these session settings: the plain dense
            export, constant channels cut at export, padded channel counts, kernel-sparse layers
            split where the profiler finds that faster; keep a candidate only when it is faster than
            the plain dense one beyond the noise, see `gaborprune.export.search`), "dense" (the
            plain dense export), or "sparse" (constant channels cut, split wherever kernels are
            missing), the last two unmeasured.
        atol: the largest |onnxruntime - PyTorch| accepted (float32); beyond it nothing is written.
        threads: intra-op threads of the sessions that measure (default: ONNX Runtime's).
        pad_channels: grow channel counts to a multiple of this with zero channels where exact
            (ONNX Runtime's blocked convolutions), in every form: 0 disables, else a power of two
            from 2 to 64. None: `auto` also times the forms padded to this CPU's block
            (`gaborprune.cpu.cpu_block`: 16 with AVX-512, 8 with AVX2), the others do not pad.
        quantize: write an int8 model (static with calibration data, else dynamic); `atol` applies to
            the float model, the int8 model's difference and accuracy are reported. True or "int8"
            (the only precision there is) turn it on.
    """

    batch_size: int = 1
    dynamic_batch: bool = False
    opset: int | None = None
    lowering: str = "auto"
    atol: float = 1e-4
    threads: int | None = None
    check_inputs: int = 3
    quantize: bool | str = False
    pad_channels: int | None = None

    def __post_init__(self) -> None:
        if self.quantize == "int8":
            object.__setattr__(self, "quantize", True)
        if not isinstance(self.quantize, bool):
            raise ExportError(f"unknown `quantize` {self.quantize!r}; known: int8")
        if self.batch_size < 1:
            raise ExportError(f"the batch size must be at least 1, not {self.batch_size}")
        if self.lowering not in LOWERINGS:
            raise ExportError(f"unknown `lowering` '{self.lowering}'; known: {', '.join(LOWERINGS)}")
        if not check_finite(self.atol, "`atol`", ExportError) > 0:
            raise ExportError(f"`atol` must be positive, not {self.atol}")
        if self.threads is not None:
            check_threads(self.threads, "`threads`", ExportError)
        if self.pad_channels is not None and self.pad_channels not in PAD_CHANNELS:
            raise ExportError("`pad_channels` must be 0 (off) or a power of two from 2 to 64 "
                              f"(ONNX Runtime's channel blocks are 8 or 16), not {self.pad_channels}")
        if self.opset is not None and not 18 <= self.opset <= 23:
            raise ExportError(f"`opset` {self.opset} is not supported by the dynamo exporter; use 18 to 23 (default: its own)")


@dataclass
class ExportReport:
    path: str
    opset: int
    inputs: list[dict]
    max_abs_diff: float
    cosine: float
    file_bytes: int
    params: int
    macs: int  # without removed kernels: the model's arithmetic
    macs_executed: int  # what the lowered graph computes (a dense conv computes its zero kernels)
    lowering: dict[str, str]
    lowering_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # auto: {layer: {form: ms}} (profiler)
    lowering_note: str = ""  # which form was kept, and why
    channels_cut: dict = field(default_factory=dict)
    bias_maps: list[str] = field(default_factory=list)
    padded: list[str] = field(default_factory=list)  # layers grown with zero channels to a multiple of `pad`
    pad: int = 0  # the channel multiple of the kept form (0: none)
    pad_block: int = 0  # auto: the CPU block the padded candidates used (0: none tried)
    candidates: list[dict] = field(default_factory=list)  # every whole-graph form considered (`Candidate.to_dict`)
    skipped: list[str] = field(default_factory=list)  # lowering steps that could not run, and why
    note: str = ""  # one plain line when pruning could not have made this export faster (`speed_note`)
    quantization: dict | None = None  # the int8 model written: {"mode", "max_abs_diff", "cosine", "compared_on", "file_bytes"}
    accuracy: dict[str, float] = field(default_factory=dict)  # top-1 percent on the test split: "onnx" (float), "int8"
    sparse_kernels: dict[str, list[int]] = field(default_factory=dict)  # {layer: [non-zero kernels, dense kernels]}
    exporter: str = "dynamo"  # or torchscript, where torch.export cannot capture the model (a detector)
    module: str = ""  # the module exported ("": the whole model)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("path", "opset", "exporter", "module", "inputs", "max_abs_diff", "cosine", "file_bytes", "params", "macs")}
        d["flops"] = self.flops
        d |= {k: getattr(self, k) for k in ("macs_executed", "lowering", "lowering_ms", "lowering_note", "candidates", "sparse_kernels", "channels_cut",
                                            "bias_maps", "padded", "pad", "pad_block", "skipped", "note")}
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.accuracy:
            d["accuracy"] = self.accuracy
        return d


def kernels_kept(model: nn.Module) -> dict[str, list[int]]:
    """{Gabor layer: [kernels kept, kernels]}."""
    return {n: [m.kernels_alive, m.mask.numel()] for n, m in model.named_modules() if isinstance(m, GaborConv2d)}


def check_inputs(shape: tuple[int, ...], count: int, extra: Tensor | None = None) -> list[Tensor]:
    """Seeded random inputs (unit normal and a wider one) plus real samples when given."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=g) * (1 + 2 * (k % 2)) for k in range(count)]
    if extra is not None:
        inputs.append(extra[: shape[0]].float())
    return inputs


#: What `speed_note` says when the pruning was kernel-level only.
KERNELS_NOT_TIME = ("kernels removed inside kept channels do not become ONNX Runtime time; only whole channels do: "
                    "fine-tune with `structure` channel (the default) so whole channels die")


def speed_note(model: nn.Module, channels_pruned: bool, report: ExportReport) -> str:
    """One plain line when the export of a pruned model cannot be faster than the unpruned one's,
    with the cause; "" otherwise.

    The rule needs no second model: kernels were removed, but no channel (neither by the model's
    prunes, `channels_pruned`, nor at export) and no layer is split, so the written graph executes
    the unpruned layer shapes, zeros included.
    """
    kernels = any(m.kernels_alive < m.mask.numel() for m in model.modules() if isinstance(m, GaborConv2d))
    channels = report.channels_cut or channels_pruned
    split = any(form.startswith("split") for form in report.lowering.values())
    return KERNELS_NOT_TIME if kernels and not channels and not split else ""


def export_model(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike, config: ExportConfig = ExportConfig(), *,
                 provenance: Mapping[str, Any] | None = None, data: tuple | None = None, force: bool = False, module: str | None = None) -> ExportReport:
    """Export `model` (inputs [N, *input_shape]) as a compact ONNX file at `path`, checked against PyTorch.

    `model` is not changed (a float32 CPU copy is exported). `provenance`, what the model was built
    from (`Recipe.provenance()`: `source`, `conversions`, `prune_plans`, `channels_pruned`), goes into
    the file's metadata and decides the report's `note` (whether its prunes removed channels);
    without it both are left out.

    Steps: choose the form (`config.lowering`; `gaborprune.export.search`: the model is lowered once
    per form, Gabor banks baked and BatchNorm folded), export it (`to_onnx`: the dynamo exporter, or
    TorchScript's for a detector), run the full ONNX checker, compare onnxruntime with the PyTorch model on seeded random inputs (and real test
    images when `data` = (train, test) datasets is given), optionally quantise to int8, and only then
    write the file (atomically).

    `module`: export only this module of `model` (a module path, e.g. a detector's `backbone`), for
    the input the whole model feeds it (`gaborprune.prune.part`); the report's `module` says so.

    Raises:
        ExportError: the model cannot be exported, has NaN or infinite weights or outputs, or
            onnxruntime differs from PyTorch by more than `config.atol` (nothing is written).
    """
    input_shape = tuple(input_shape)
    check_output(path, force)
    if module:
        from gaborprune.prune.part import find_part

        try:
            part = find_part(model, input_shape, module)
        except GaborPruneError as e:
            raise ExportError(str(e)) from None
        model, input_shape = part.of(model), part.input_shape
    model = copy.deepcopy(model).cpu().float().eval()  # the caller's model keeps its device, dtype and mode
    bad = non_finite(model.state_dict())
    if bad:
        raise ExportError(f"the model's '{bad[0]}' holds NaN or infinite values" + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                          + "; nothing was written")
    per_sample = activation_bytes(model, input_shape)  # also a clear error for an input the model cannot take
    # every check runs the batch through PyTorch and ONNX Runtime: refuse before allocating one that cannot fit
    check_batch_memory(per_sample, config.batch_size, f"exporting at batch {config.batch_size}", "`batch_size`", ExportError)
    shape = (config.batch_size, *input_shape)
    train, test = data if data is not None else (None, None)
    calibration = calibration_batches(train, config.batch_size) if config.quantize and train is not None else None
    int8 = (lambda blob: quantize_int8(blob, calibration)[0]) if config.quantize else None
    lowerings = Lowerings(model, input_shape, config.batch_size)
    found = search(lowerings, config.lowering, config.pad_channels, config.threads, quantize=int8)
    deploy, lowering = lowerings.lower(found.form)
    recorded = {f"gaborprune.{key}": provenance[key] for key in ("source", "conversions", "prune_plans")} if provenance is not None else {}
    metadata = {"gaborprune.version": __version__, **recorded, "gaborprune.kernels_kept": kernels_kept(model),
                "gaborprune.lowering": lowering.forms, "gaborprune.input_shape": list(shape)}
    proto = to_onnx(deploy, shape, opset=config.opset, dynamic_batch=config.dynamic_batch, metadata=metadata)
    counts = onnx_counts(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "gaborprune.macs", str(counts.macs)
    blob = proto.SerializeToString()
    sess = session(blob, config.threads)
    real = next(iter(test.batches(config.batch_size, train=False)))[0] if test is not None else None
    diff, cosine = parity(sess, model, check_inputs(shape, config.check_inputs, real))
    if not diff <= config.atol:
        raise ExportError(f"onnxruntime differs from PyTorch by {diff:.3g} (cosine {cosine:.6f}), more than `atol` {config.atol:g}; nothing was written")
    accuracy = {"onnx": onnx_top1(sess, test)} if test is not None else {}
    quantization = None
    if config.quantize:
        blob, mode = quantize_int8(blob, calibration)
        qsess = session(blob, config.threads)
        # int8 is calibrated for real images: compare on those when there are some
        qdiff, qcos = parity(qsess, model, [real] if real is not None else check_inputs(shape, config.check_inputs))
        quantization = {"mode": mode, "max_abs_diff": qdiff, "cosine": qcos, "compared_on": "test images" if real is not None else "random inputs",
                        "file_bytes": len(blob)}
        if test is not None:
            accuracy["int8"] = onnx_top1(qsess, test)
    write_bytes(path, blob, force)
    inputs = [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]} for i in proto.graph.input]
    report = ExportReport(
        path=str(Path(path)), opset=opset_of(proto), exporter=next(p.value for p in proto.metadata_props if p.key == "gaborprune.exporter"),
        module=module or "", inputs=inputs, max_abs_diff=diff, cosine=cosine, file_bytes=len(blob),
        params=counts.params, macs=counts.macs, macs_executed=counts.macs_executed, lowering=lowering.forms,
        lowering_ms=found.layer_ms, lowering_note=found.reason, channels_cut=lowering.channels_cut, bias_maps=lowering.bias_maps,
        padded=lowering.padded, pad=found.form.pad, pad_block=found.block, candidates=[c.to_dict() for c in found.candidates],
        skipped=lowering.skipped, quantization=quantization, accuracy=accuracy,
        sparse_kernels={layer.name: [layer.kernels, layer.dense_kernels] for layer in lowering.layers if layer.kernels < layer.dense_kernels},
    )
    if provenance is not None:
        report.note = speed_note(model, bool(provenance.get("channels_pruned")), report)
    return report
