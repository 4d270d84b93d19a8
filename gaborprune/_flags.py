"""The command line's names for the library's arguments, in one place.

Library messages name an argument as Python spells it, in backquotes: "`batch_size` must be an
integer of at least 1, not 0". The CLI passes every message through `cli_message`, which shows the
flag instead: "--batch-size must be an integer of at least 1, not 0". A backquoted name without a
flag here stays as it is.
"""

from __future__ import annotations

import re

#: {library argument: the CLI flag that sets it}.
FLAGS: dict[str, str] = {
    # TrainConfig
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "optimizer": "--optimizer", "momentum": "--momentum",
    "nesterov": "--nesterov", "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
    "label_smoothing": "--label-smoothing", "sparsity": "--sparsity", "structure": "--structure", "scope": "--scope",
    "latency_aware": "--latency-aware", "latency_batch": "--latency-batch", "recalibrate": "--recalibrate", "seed": "--seed",
    "amp": "--amp", "channels_last": "--channels-last", "compile": "--compile", "deterministic": "--deterministic",
    # ConversionSpec
    "first": "--layers", "targets": "--target", "kernel_size": "--kernel-size", "init": "--init", "freeze": "--freeze",
    "to": "--to", "heads": "--heads", "bases": "--bases", "context": "--context", "invariance": "--invariance",
    "rel_pos": "--rel-pos", "basis": "--basis", "calibration_images": "--calibration-images",
    # PruneSpec, TargetSpec
    "threshold": "--threshold", "ratio": "--ratio", "keep": "--keep", "layer_ratio": "--ratio", "layer_keep": "--keep",
    "round_to": "--round-to", "speedup": "--speedup", "latency_ms": "--latency-ms",
    # ExportConfig
    "lowering": "--lowering", "atol": "--atol", "threads": "--threads", "pad_channels": "--pad-channels", "opset": "--opset",
    "quantize": "--quantize", "dynamic_batch": "--dynamic-batch",
    # load_model, data and outputs
    "num_classes": "--num-classes", "weights": "--weights", "model_args": "--model-arg", "input_shape": "--input-shape",
    "trust_factory": "--trust-factory", "resize": "--resize", "resume": "--resume", "force": "--force",
}

_NAME = re.compile(r"`([A-Za-z_]\w*)`")


def cli_message(text: str) -> str:
    """`text` with each backquoted library argument that has a flag replaced by the flag."""
    return _NAME.sub(lambda m: FLAGS.get(m.group(1), m.group(0)), text)
