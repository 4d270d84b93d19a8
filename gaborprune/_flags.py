"""The command line's names for the library's arguments, per command, in one place.

Library messages name an argument as Python spells it, in backquotes: "`batch_size` must be an
integer of at least 1, not 0". The CLI passes every message it shows (errors, warnings, notes)
through `cli_message` with the command that runs, which shows that command's flag instead:
"--batch-size must be an integer of at least 1, not 0". A backquoted name the command has no flag
for stays as it is.

A name means one flag on most commands (`FLAGS`); a command lists the names it has flags for and,
where its flag differs, its own: in `prune`, `epochs` are the recovery's (--finetune-epochs); in
`export`, the batch is the N of --input-shape N,C,H,W; in `eval`, ONNX Runtime's `provider` is
--device. Every flag a command's map shows is one of that command's options (tests/test_flags.py).
"""

from __future__ import annotations

import re

#: {library argument: the CLI flag that sets it}, on every command that has the flag (`COMMANDS`).
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
    # PruneSpec, TargetSpec, and the prune and sweep workflows
    "threshold": "--threshold", "ratio": "--ratio", "keep": "--keep", "layer_ratio": "--ratio", "layer_keep": "--keep",
    "round_to": "--round-to", "importance": "--importance", "module": "--module",
    "speedup": "--speedup", "latency_ms": "--latency-ms", "macs": "--macs", "max_drop": "--max-drop",
    "finetune_epochs": "--finetune-epochs", "recovery_epochs": "--finetune-epochs", "dry_run": "--dry-run", "sweep": "--sweep", "thresholds": "--sweep",
    # ExportConfig
    "lowering": "--lowering", "atol": "--atol", "threads": "--threads", "pad_channels": "--pad-channels", "opset": "--opset",
    "quantize": "--quantize", "dynamic_batch": "--dynamic-batch",
    # bench
    "baseline": "--baseline", "batch_sizes": "--batch-size", "warmup": "--warmup", "runs": "--runs", "precision": "--precision",
    "max_seconds": "--max-seconds", "int8": "--int8", "provider": "--provider", "profile": "--profile", "torch_eager": "--torch",
    "markdown": "--markdown",
    # demo, reproduce
    "out": "--out", "seeds": "--seeds", "settings": "--settings",
    # load_model, data, devices and outputs
    "num_classes": "--num-classes", "weights": "--weights", "model_args": "--model-arg", "input_shape": "--input-shape",
    "trust_factory": "--trust-factory", "data": "--data", "device": "--device", "resize": "--resize", "resume": "--resume",
    "force": "--force", "output": "-o", "png": "--png",
}


def _flags(*names: str, **own: str) -> dict[str, str]:
    """A command's map: `FLAGS` for `names`, and its `own` flags where they differ."""
    return {name: FLAGS[name] for name in names} | own


_SOURCE = ("num_classes", "weights", "model_args", "input_shape", "trust_factory")

#: {command: {library argument: the flag of that command that sets it}}.
COMMANDS: dict[str, dict[str, str]] = {
    "convert": _flags(*_SOURCE, "output", "first", "targets", "init", "kernel_size", "freeze", "seed", "to", "heads", "bases", "context",
                      "invariance", "rel_pos", "basis", "data", "calibration_images", "device", "resize", "force", "threads"),
    "inspect": _flags(*_SOURCE, "png", "force", "threads"),
    "finetune": _flags(*_SOURCE, "data", "output", "epochs", "batch_size", "lr", "optimizer", "momentum", "nesterov", "weight_decay",
                       "warmup_epochs", "label_smoothing", "sparsity", "structure", "scope", "latency_aware", "recalibrate", "latency_batch",
                       "seed", "device", "amp", "channels_last", "compile", "deterministic", "resume", "resize", "force", "threads"),
    "eval": _flags(*_SOURCE, "data", "batch_size", "device", "resize", "force", "threads", provider="--device"),
    "prune": _flags("input_shape", "trust_factory", "output", "threshold", "ratio", "keep", "layer_ratio", "layer_keep", "speedup", "latency_ms", "macs",
                    "max_drop", "scope", "round_to", "importance", "module", "dry_run", "data", "recalibrate", "finetune_epochs", "recovery_epochs", "lr",
                    "batch_size", "seed", "sweep", "thresholds", "png", "device", "resize", "force", "threads", epochs="--finetune-epochs"),
    "export": _flags("input_shape", "trust_factory", "output", "dynamic_batch", "opset", "lowering", "threads", "atol", "pad_channels",
                     "quantize", "data", "module", "force", batch_size="N of --input-shape N,C,H,W"),
    "bench": _flags("trust_factory", "baseline", "batch_size", "batch_sizes", "threads", "warmup", "runs", "precision", "max_seconds", "int8",
                    "data", "provider", "profile", "torch_eager", "markdown", "png", "force"),
    "demo": _flags("out", "device", "force", "threads"),
    "reproduce": _flags("data", "seeds", "epochs", "settings", "input_shape", "out", "device", "force", "threads"),
}

_NAME = re.compile(r"`([A-Za-z_]\w*)`")


def cli_message(text: str, command: str) -> str:
    """`text` as `command` shows it: each backquoted library argument that the command has a flag
    for replaced by the flag; others stay backquoted."""
    flags = COMMANDS[command]
    return _NAME.sub(lambda m: flags.get(m.group(1), m.group(0)), text)
