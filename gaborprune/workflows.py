"""Every command's workflow as one call: load a model source, do the work, write the outputs, report.

The CLI only parses its options, calls one of these and renders what it returns (`to_dict()` is
the command's --json), so a notebook does what a command does with the same few lines:

    from gaborprune import workflows as wf
    run = wf.convert("resnet20", gp.ConversionSpec(first=2), "r20.pt")            # gaborprune convert
    run = wf.prune("ft.pt", "pruned.pt", gp.PruneSpec(threshold=0.05), data="digits", finetune_epochs=2)

Nothing here prints: what a workflow is doing goes to `on_stage` (one line of text), training to
`on_step` / `on_epoch`. Each workflow checks all its outputs, and the caller's `extra_outputs` (a
JSON report the caller writes afterwards), before any work; every file is written atomically.
Model-source options (`num_classes`, `weights`, `model_args`, `input_shape`, `trust_factory`) go
to `gaborprune.recipe.load_model` as given. This module imports torch only inside its functions,
so the CLI reads its defaults without waiting for torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaborprune.errors import GaborPruneError
from gaborprune.train.config import TrainConfig

if TYPE_CHECKING:
    from gaborprune.convert.spec import ConversionReport, ConversionSpec
    from gaborprune.export.api import ExportConfig, ExportReport
    from gaborprune.export.bench import BenchReport
    from gaborprune.prune import PruneReport, PruneSpec, SweepPoint, TargetReport, TargetSpec
    from gaborprune.train import Checkpoints, TrainResult

#: The peak learning rate of the fine-tuning that recovers a pruned model's accuracy: a fifth of
#: fine-tuning's default `TrainConfig.lr`, since the weights start trained (the demo recovers so too).
RECOVERY_LR = 0.01
#: Training images that calibrate: a conversion's output fit (`convert(..., data=)`) and the
#: BatchNorm statistics re-estimated after a conversion or a prune.
CALIBRATION_IMAGES = 1024
#: Where the CLI's `prune --sweep` draws its plot when no --png is given (`sweep` draws only when asked).
SWEEP_PNG = "prune-sweep.png"
#: The device a workflow trains and evaluates on: CUDA when available, else the CPU.
DEVICE = "auto"

Stage = Callable[[str], None]
Paths = Iterable["str | os.PathLike | None"]


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None), to pass on so that every default stays the callee's."""
    return {k: v for k, v in options.items() if v is not None}


def _stage(on_stage: Stage | None, text: str) -> None:
    if on_stage is not None:
        on_stage(text)


def _load(source: str, *, seed: int = 0, **load: Any):
    """`load_model(source, **load)`, a fresh source's initial weights drawn from `seed`."""
    from gaborprune.recipe import load_model

    return load_model(source, seed=seed, **load)


def _data(model, recipe, data: str, resize: int | None = None) -> tuple[Any, Any, str]:
    """(train, test, name) of dataset `data` at the model's input shape, refused when the model's
    outputs are not its classes (the check eval, prune and export share)."""
    from gaborprune.data import DataSpec, load_data
    from gaborprune.train.loop import check_classes

    spec = DataSpec.parse(data)
    train, test = load_data(spec, recipe.input_shape, resize=resize)
    check_classes(model, recipe, test.num_classes, str(spec))
    return train, test, str(spec)


def _train(model, recipe, train, test, config: TrainConfig, device, dist, data_name: str, *, checkpoints=None, resume=None,
           on_step=None, on_epoch=None):
    """`gaborprune.train.finetune_`, where Ctrl-C and SIGTERM end in one line that says how to resume."""
    from gaborprune.train import finetune_
    from gaborprune.train.interrupt import Terminated, sigterm_as_interrupt

    with sigterm_as_interrupt():
        try:
            return finetune_(model, recipe, train, test, config, device=device, data_name=data_name, checkpoints=checkpoints,
                             resume=resume, dist=dist, on_step=on_step, on_epoch=on_epoch)
        except KeyboardInterrupt as e:
            hint = f"; continue with the same command plus --resume {checkpoints.last}" if checkpoints else ""
            raise GaborPruneError(f"{'stopped by SIGTERM' if isinstance(e, Terminated) else 'interrupted'}{hint}") from None


# -- convert -----------------------------------------------------------------------------------------
@dataclass
class ConvertRun:
    """What `convert` did: the conversion, and the model's parameters before and after.

    `untrained`: the source had no weights of its own (a fresh built-in, torchvision or factory
    model, seeded random), so a least-squares fit to its kernels means nothing.
    """

    source: str
    output: Path
    conversion: ConversionReport
    params_before: int
    params_after: int
    untrained: bool = False
    calibration: Calibration | None = None

    def to_dict(self) -> dict:
        layers = [asdict(layer) | {"kernel_size": list(layer.kernel_size), "original_kernel_size": list(layer.original_kernel_size)}
                  for layer in self.conversion.layers]
        extra = {"calibration": asdict(self.calibration)} if self.calibration is not None else {}
        return {"model": self.source, "output": str(self.output), "layers": layers,
                "params_before": self.params_before, "params_after": self.params_after} | extra


@dataclass(frozen=True)
class Calibration:
    """A conversion fitted to layer outputs: on `images` training images of `data`, with the test
    split's top-1 (percent) of the model before and right after conversion (no fine-tuning)."""

    data: str
    images: int
    accuracy_before: float
    accuracy_after: float


def convert(source: str, spec: ConversionSpec, output: str | os.PathLike, *, data: str | None = None,
            calibration_images: int = CALIBRATION_IMAGES, device: str = DEVICE, resize: int | None = None, force: bool = False,
            extra_outputs: Paths = (), on_stage: Stage | None = None, **load: Any) -> ConvertRun:
    """Convert the layers `spec` selects of `source` (its fresh weights seeded by `spec.seed`) and
    save the recipe at `output`.

    With `data`, each fitted bank is refitted to the trained layer's outputs on `calibration_images`
    images drawn from the training split, the BatchNorm statistics are re-estimated on them, and the
    test split's top-1 before and after conversion is measured (`ConvertRun.calibration`)."""
    from gaborprune._io import check_outputs
    from gaborprune._validate import check_int
    from gaborprune.convert.spec import gaborize_
    from gaborprune.data import DataSpec, calibration_batches
    from gaborprune.recipe import is_recipe_path, save_recipe
    from gaborprune.summary import summarize
    from gaborprune.train.distributed import resolve_device

    check_int(calibration_images, "`calibration_images`", 2)
    if data is not None:
        DataSpec.parse(data)  # a bad spec fails before the model loads
    check_outputs([output, *extra_outputs], force)
    model, recipe = _load(source, seed=spec.seed, **load)
    before = summarize(model, recipe.input_shape).params
    calibration = batches = None
    if data is not None:
        from gaborprune.train import evaluate as evaluate_model

        dev = resolve_device(device)
        train, test, name = _data(model, recipe, data, resize)
        test = test.to(dev)
        model.to(dev)
        accuracy_before = evaluate_model(model, test, dev).top1
        batches = [x.to(dev) for x in calibration_batches(train, calibration_images, seed=spec.seed)]
    _stage(on_stage, ("fitting Gabor banks" + (f" to their layers' outputs on {calibration_images} {name} images" if data else "") + "...")
                     if spec.init == "fit" and spec.to == "gabor" else "converting...")
    report = gaborize_(model, spec, recipe.input_shape, calibration=batches)
    if data is not None:
        calibration = Calibration(name, sum(len(x) for x in batches), accuracy_before, evaluate_model(model, test, dev).top1)
        recipe = recipe.with_metadata(calibration=asdict(calibration))
        model.cpu()
    recipe = recipe.with_step(report.step)
    after = summarize(model, recipe.input_shape).params
    save_recipe(output, model, recipe, force=force)
    fitted = any(layer.fit_rel_error is not None for layer in report.layers)
    untrained = fitted and load.get("weights") is None and not is_recipe_path(source)
    return ConvertRun(source, Path(output), report, before, after, untrained, calibration)


# -- inspect -----------------------------------------------------------------------------------------
@dataclass
class InspectRun:
    """`summary`: a `ModelSummary` for a model source, an `OnnxSummary` for an .onnx file; `drawn`:
    the layers drawn into the PNG asked for."""

    source: str
    summary: Any
    drawn: list[str] = field(default_factory=list)

    @property
    def onnx(self) -> bool:
        from gaborprune.export.inspect_onnx import OnnxSummary

        return isinstance(self.summary, OnnxSummary)

    def to_dict(self) -> dict:
        return {"model": self.source} | self.summary.to_dict()


def _check_onnx_options(source: str, load: dict, *names: str) -> None:
    """Refuse model-source options that an ONNX file fixes itself."""
    from gaborprune.export.inspect_onnx import check_onnx_options

    flags = {"num_classes": "--num-classes", "weights": "--weights", "model_args": "--model-arg", "input_shape": "--input-shape"}
    check_onnx_options(source, **{flags[n]: load.get(n) or None for n in names})


def inspect(source: str, *, png: str | os.PathLike | None = None, force: bool = False, extra_outputs: Paths = (), **load: Any) -> InspectRun:
    """Count a model's layers, parameters, MACs and FLOPs (an .onnx file: its operators, inputs and
    metadata too); with `png`, draw its Gabor banks (or first convolution)."""
    from gaborprune._io import check_outputs
    from gaborprune.export.inspect_onnx import describe_onnx, is_onnx_path
    from gaborprune.plot import plot_recipe_banks
    from gaborprune.summary import summarize

    check_outputs([png, *extra_outputs], force)
    if is_onnx_path(source):
        _check_onnx_options(source, load, "num_classes", "weights", "model_args", "input_shape")
        if png:
            raise GaborPruneError(f"--png draws a recipe's Gabor banks; '{source}' holds them baked into plain convolutions: "
                                  "inspect the recipe it was exported from")
        return InspectRun(source, describe_onnx(source))
    model, recipe = _load(source, **load)
    run = InspectRun(source, summarize(model, recipe.input_shape))
    if png:
        run.drawn = plot_recipe_banks(model, recipe, png, force=force)
    return run


# -- finetune ----------------------------------------------------------------------------------------
@dataclass
class FinetuneRun:
    """A fine-tuning run: `result` (its `to_dict()` is the JSON), where the recipe and checkpoints
    went, and whether this process is rank 0 (the one that writes and reports, under torchrun)."""

    source: str
    data: str
    output: Path
    config: TrainConfig
    checkpoints: Checkpoints
    result: TrainResult
    main: bool = True

    def to_dict(self) -> dict:
        return self.result.to_dict()


#: Fine-tuning settings for a model that is already trained, where they differ from `TrainConfig`'s
#: (which suit training from scratch): on CIFAR-10 resnet20 with its stem converted, one epoch at
#: lr 0.05 after a warm-up epoch lowered top-1 below the converted model's (docs/results.md).
TRAINED_FINETUNE = {"lr": RECOVERY_LR, "warmup_epochs": 0.0}


def finetune_defaults(source: str, weights: str | None = None, sparsity: float = 0.0) -> dict[str, float]:
    """The `TrainConfig` fields to change for fine-tuning `source`: `TRAINED_FINETUNE` when it is
    trained (a recipe with a fine-tuning step, or `weights` given) and no sparsity pressure is asked
    for, else none. The pressure needs the larger steps: on digits, `--scope all` at `--sparsity 0.3`
    from a trained resnet20 removed 28% of the MACs at lr 0.05 and 17% at lr 0.01."""
    from gaborprune.recipe import is_recipe_path, read_recipe

    if sparsity > 0:
        return {}
    if weights is not None:
        return dict(TRAINED_FINETUNE)
    if is_recipe_path(source) and Path(source).is_file():
        try:
            recipe, _ = read_recipe(source)
        except GaborPruneError:  # loading the source says what is wrong with it
            return {}
        if recipe.finetunes:
            return dict(TRAINED_FINETUNE)
    return {}


def finetune(source: str, data: str, output: str | os.PathLike, config: TrainConfig = TrainConfig(), *,
             resume: str | os.PathLike | None = None, device: str = DEVICE, resize: int | None = None, force: bool = False,
             extra_outputs: Paths = (), on_stage: Stage | None = None, on_step: Callable | None = None,
             on_epoch: Callable[[dict], None] | None = None, **load: Any) -> FinetuneRun:
    """Fine-tune `source` on `data` (the Gabor banks under `config`'s sparsity pressure) and save the
    recipe at `output`, with resumable checkpoints beside it (`gaborprune.train.checkpoint`).

    `resume` continues the run saved in an OUT.last.pt; its checkpoints are overwritten by design.
    Under torchrun every process trains and rank 0 alone checks and writes the outputs.

    Raises:
        GaborPruneError: also for Ctrl-C or SIGTERM, naming the checkpoint to resume from.
    """
    from gaborprune._io import check_outputs
    from gaborprune.data import DataSpec, load_data
    from gaborprune.recipe import save_recipe
    from gaborprune.train import Checkpoints
    from gaborprune.train.distributed import setup, teardown

    checkpoints = Checkpoints(output)
    if resume is not None and not Path(resume).is_file():
        raise GaborPruneError(f"resume file '{resume}' not found")
    spec = DataSpec.parse(data)
    dist, dev = setup(device)
    try:
        model, recipe = _load(source, seed=config.seed, **load)
        train, test = load_data(spec, recipe.input_shape, resize=resize)
        if dist.main:
            check_outputs([output, *extra_outputs] + ([] if resume else checkpoints.paths), force,
                          reused=checkpoints.paths if resume else ())
            processes = f" x {dist.world} processes" if dist.world > 1 else ""
            _stage(on_stage, f"fine-tuning {source} on {spec} ({len(train)} train / {len(test)} test images) on {dev}{processes}")
        result = _train(model, recipe, train, test, config, dev, dist, str(spec), checkpoints=checkpoints, resume=resume,
                        on_step=on_step, on_epoch=on_epoch)
        if dist.main:
            save_recipe(output, model.cpu(), recipe.with_step(result.step), force=force)
        return FinetuneRun(source, str(spec), Path(output), config, checkpoints, result, dist.main)
    finally:
        teardown()


# -- eval --------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """Test-split accuracy of a model source (PyTorch, on `device`) or an .onnx file (ONNX Runtime):
    `result` is an `EvalResult` or an `OnnxEvalResult`."""

    source: str
    data: str
    runtime: str  # "pytorch" or "onnxruntime"
    device: str
    result: Any

    def to_dict(self) -> dict:
        if self.runtime == "onnxruntime":
            return self.result.to_dict()
        r = self.result
        return {"top1": r.top1, "top5": r.top5, "loss": r.loss, "samples": r.samples, "runtime": "pytorch"}


def evaluate(source: str, data: str, *, batch_size: int | None = None, device: str = DEVICE, resize: int | None = None,
             threads: int | None = None, force: bool = False, extra_outputs: Paths = (), **load: Any) -> EvalRun:
    """Top-1 / top-5 accuracy and loss of `source` on the test split of `data`; an .onnx file runs in
    ONNX Runtime (`threads`: its intra-op threads). `batch_size` None: the evaluators' default."""
    from gaborprune._io import check_outputs
    from gaborprune.data import DataSpec, load_data
    from gaborprune.export.inspect_onnx import evaluate_onnx, input_chw, is_onnx_path

    check_outputs(extra_outputs, force)

    if is_onnx_path(source):
        _check_onnx_options(source, load, "num_classes", "weights", "model_args")
        spec = DataSpec.parse(data)
        _, test = load_data(spec, load.get("input_shape") or input_chw(source), resize=resize)
        result = evaluate_onnx(source, test, batch_size=batch_size, threads=threads, provider=device, data_name=str(spec))
        return EvalRun(source, str(spec), "onnxruntime", result.provider, result)
    from gaborprune.train import evaluate as evaluate_model
    from gaborprune.train.distributed import setup

    DataSpec.parse(data)  # a bad spec fails before the model loads
    dist, dev = setup(device)
    model, recipe = _load(source, **load)
    _, test, name = _data(model, recipe, data, resize)
    result = evaluate_model(model.to(dev), test.to(dev), dev, **given(batch_size=batch_size))
    return EvalRun(source, name, "pytorch", str(dev), result)


# -- prune -------------------------------------------------------------------------------------------
@dataclass
class PruneRun:
    """What `prune` did. `report` (None when a target was not met) carries the accuracies when data
    was given; `target` the timed candidates of a `TargetSpec`; `rule` says in words what was
    removed; `output` is None for a dry run."""

    source: str
    output: Path | None
    spec: PruneSpec | None
    rule: str = ""
    report: PruneReport | None = None
    target: TargetReport | None = None
    data: str | None = None
    recovery_epochs: int | None = None  # the recovery fine-tuning that runs after the prune (None: none)

    def to_dict(self) -> dict:
        extra = {"target": self.target.to_dict()} if self.target is not None else {}
        head = {"model": self.source, "output": None if self.output is None else str(self.output)}
        return head | (self.report.to_dict() if self.report is not None else {}) | extra

    def record(self) -> dict:
        """What the pruned recipe keeps of this prune under metadata["prunes"]: the report, the
        accuracies, the source, and the target's candidates."""
        extra = {"target": self.target.to_dict()} if self.target is not None else {}
        return self.report.to_dict() | {"source": self.source} | extra


def _prune_spec(spec: PruneSpec | None, target: TargetSpec | None) -> PruneSpec | None:
    """The spec a workflow prunes by: PruneSpec() when neither is given; with scope "all", rounded to
    this CPU's channel block unless `round_to` says otherwise."""
    from dataclasses import replace

    from gaborprune.prune import PruneSpec
    from gaborprune.prune.structured import default_round_to

    if spec is None:
        return None if target is not None else PruneSpec()
    if spec.round_to is not None and spec.scope != "all":
        raise GaborPruneError("`round_to` counts channels that `scope` all removes; add `scope` all or drop `round_to`")
    if target is not None and spec.scope != "all":  # with scope "all" the spec carries the scope and rounding of the search
        raise GaborPruneError("give a PruneSpec or a TargetSpec, not both")
    return replace(spec, round_to=default_round_to()) if spec.scope == "all" and spec.round_to is None else spec


def _recovery(finetune_epochs: int | None, lr: float, batch_size: int, seed: int, scope: str) -> TrainConfig:
    """The recovery fine-tuning's settings (its batch size also evaluates); checked even when no
    recovery runs, so that a bad value is refused before anything is loaded."""
    if finetune_epochs is not None and finetune_epochs < 1:
        raise GaborPruneError(f"--finetune-epochs must be at least 1, not {finetune_epochs}")
    # channels cut all over the network leave BatchNorm statistics that recovery alone follows too slowly
    return TrainConfig(**given(epochs=finetune_epochs), lr=lr, batch_size=batch_size, seed=seed, **given(recalibrate=True if scope == "all" else None))


class _Measures:
    """Accuracy on the test split, and recovery fine-tuning then accuracy, of a model on one dataset."""

    def __init__(self, model, recipe, data: str, resize, config: TrainConfig, device, dist, on_step, on_epoch) -> None:
        self.train, self.test, self.name = _data(model, recipe, data, resize)
        self.test = self.test.to(device)
        self.config, self.device, self.dist, self.on_step, self.on_epoch = config, device, dist, on_step, on_epoch

    def accuracy(self, model) -> float:
        from gaborprune.train import evaluate as evaluate_model

        return evaluate_model(model.to(self.device), self.test, self.device, batch_size=self.config.batch_size).top1

    def recalibrate(self, model) -> float:
        """Re-estimate `model`'s BatchNorm statistics on CALIBRATION_IMAGES training images (no
        gradient steps, nothing else changes); returns the accuracy after."""
        from gaborprune.data import calibration_batches
        from gaborprune.norms import recalibrate_norms_

        batches = calibration_batches(self.train, CALIBRATION_IMAGES, self.config.batch_size, seed=self.config.seed)
        recalibrate_norms_(model.to(self.device), (x.to(self.device) for x in batches))
        return self.accuracy(model)

    def recover(self, model, recipe):
        """(accuracy after recovery, `recipe` with the recovery's step)."""
        result = _train(model, recipe, self.train, self.test, self.config, self.device, self.dist, self.name, on_step=self.on_step,
                        on_epoch=self.on_epoch)
        return self.accuracy(model), recipe.with_step(result.step)


def prune(source: str, output: str | os.PathLike | None = None, spec: PruneSpec | None = None, *, target: TargetSpec | None = None,
          data: str | None = None, recalibrate: bool = True, finetune_epochs: int | None = None, lr: float = RECOVERY_LR,
          batch_size: int = TrainConfig.batch_size, seed: int = TrainConfig.seed, dry_run: bool = False, device: str = DEVICE,
          resize: int | None = None, input_shape: tuple[int, int, int] | None = None, threads: int | None = None, trust_factory: bool = False,
          force: bool = False, extra_outputs: Paths = (), on_stage: Stage | None = None, on_pruned: Callable[[PruneRun], None] | None = None,
          on_step: Callable | None = None, on_epoch: Callable[[dict], None] | None = None) -> PruneRun:
    """Prune a recipe's Gabor banks by `spec` (default `PruneSpec()`) or to a measured `target`
    (`prune_to_target_`, timed on `threads`, default 1), evaluate before and after on `data`, re-estimate
    the BatchNorm statistics on training images (`recalibrate`, with `data`: removed kernels and channels
    shift what every later BatchNorm sees), recover with `finetune_epochs` of fine-tuning (removed kernels
    stay removed), and save the pruned recipe
    at `output`, its run recorded under metadata["prunes"] (`PruneRun.record`). `dry_run` writes nothing.

    `on_pruned(run)` is called once the model is pruned, before its accuracy is measured and before
    recovery, so the prune can be shown while recovery runs; also when a target is not met
    (`run.report` None), before the call raises.
    """
    from gaborprune._io import check_outputs
    from gaborprune.data import DataSpec
    from gaborprune.prune import prune_model_, prune_to_target_
    from gaborprune.prune.structured import prune_all_to_target_
    from gaborprune.recipe import save_recipe
    from gaborprune.train.distributed import setup, teardown

    spec = _prune_spec(spec, target)
    if output is None and not dry_run:
        raise GaborPruneError("say where to write the pruned recipe with -o FILE (or look first with --dry-run)")
    if finetune_epochs is not None and data is None:
        raise GaborPruneError("--finetune-epochs needs --data SPEC to measure accuracy")
    config = _recovery(finetune_epochs, lr, batch_size, seed, spec.scope if spec else "banks")
    check_outputs([*extra_outputs] + ([] if dry_run else [output]), force)
    if data is not None:
        DataSpec.parse(data)  # a bad spec fails before the model loads
    model, recipe = _load(source, **given(input_shape=input_shape), trust_factory=trust_factory)
    dist, dev = setup(device)
    try:
        measures = _Measures(model, recipe, data, resize, config, dev, dist, on_step, on_epoch) if data is not None else None
        before = measures.accuracy(model) if measures else None
        run = PruneRun(source, None if dry_run else Path(output), spec, data=measures.name if measures else None,
                       recovery_epochs=finetune_epochs if measures and not dry_run else None)
        if target is not None:
            _stage(on_stage, f"pruning to {target.describe()}: exporting and timing candidates with ONNX Runtime...")
            if spec is not None and spec.scope == "all":  # the lowest threshold that meets it
                run.target = prune_all_to_target_(model.to("cpu"), recipe.input_shape, speedup=target.speedup, latency_ms=target.latency_ms,
                                                  round_to=spec.round_to, **given(threads=threads))
            else:
                run.target = prune_to_target_(model.to("cpu"), recipe.input_shape, speedup=target.speedup, latency_ms=target.latency_ms,
                                              **given(threads=threads))
            if run.target.prune is None:
                if on_pruned is not None:
                    on_pruned(run)
                raise GaborPruneError(run.target.message + "; no recipe written")
            what = (f"threshold {run.target.chosen:g} (--scope all)" if spec is not None and spec.scope == "all"
                    else f"{run.target.chosen} weakest channel groups")
            run.report, run.rule = run.target.prune, f"{what} for {target.describe()}"
        else:
            _stage(on_stage, "pruning...")
            run.report = prune_model_(model, recipe.input_shape, spec)
            run.rule = spec.describe([c.name for c in run.report.gabor_layers])
        recipe = recipe.with_step(run.report.step)
        if on_pruned is not None:
            on_pruned(run)
        if measures is not None:
            run.report.accuracy_before = before
            run.report.accuracy_pruned = run.report.accuracy_after = measures.accuracy(model)
            if recalibrate:
                run.report.accuracy_recalibrated = run.report.accuracy_after = measures.recalibrate(model)
            if run.recovery_epochs:
                run.report.accuracy_after, recipe = measures.recover(model, recipe)
        if not dry_run:
            recipe = recipe.with_metadata(prunes=[*recipe.metadata.get("prunes", []), run.record()])
            save_recipe(output, model.to("cpu"), recipe, force=force)
        return run
    finally:
        teardown()


@dataclass
class SweepRun:
    """Accuracy and MACs at each threshold of a sweep, and the unpruned model's."""

    source: str
    points: list[SweepPoint]
    unpruned_accuracy: float
    unpruned_macs: int
    png: Path | None = None

    def to_dict(self) -> dict:
        return {"model": self.source, "points": [asdict(p) for p in self.points]}


def sweep(source: str, thresholds: Sequence[float], spec: PruneSpec | None = None, *, data: str | None = None,
          finetune_epochs: int | None = None, lr: float = RECOVERY_LR, batch_size: int = TrainConfig.batch_size,
          seed: int = TrainConfig.seed, png: str | os.PathLike | None = None, device: str = DEVICE, resize: int | None = None,
          input_shape: tuple[int, int, int] | None = None, trust_factory: bool = False, force: bool = False,
          extra_outputs: Paths = (), on_stage: Stage | None = None, on_step: Callable | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> SweepRun:
    """Prune copies of `source` at each threshold (the rest of `spec` as given: scope, rounding),
    measure each on `data` (after `finetune_epochs` of recovery when given) and, with `png`, plot
    accuracy and MACs against kernels kept. Writes no recipe."""
    from gaborprune._io import check_outputs
    from gaborprune.data import DataSpec
    from gaborprune.plot import plot_sweep
    from gaborprune.prune import sweep as prune_sweep
    from gaborprune.summary import summarize
    from gaborprune.train.distributed import setup, teardown

    thresholds = list(thresholds)
    bad = [t for t in thresholds if not 0 <= t < 1]
    if bad or not thresholds:
        raise GaborPruneError(f"--sweep threshold {bad[0] if bad else '(none)'} is out of range; thresholds are fractions in [0, 1)")
    if data is None:
        raise GaborPruneError("--sweep needs --data SPEC to measure accuracy")
    spec = _prune_spec(spec, None)
    config = _recovery(finetune_epochs, lr, batch_size, seed, spec.scope)
    check_outputs([png, *extra_outputs], force)
    DataSpec.parse(data)
    model, recipe = _load(source, **given(input_shape=input_shape), trust_factory=trust_factory)
    dist, dev = setup(device)
    try:
        measures = _Measures(model, recipe, data, resize, config, dev, dist, on_step, on_epoch)
        unpruned = measures.accuracy(model)
        _stage(on_stage, f"pruning at {len(thresholds)} thresholds...")
        measure = (lambda m, report: measures.recover(m, recipe.with_step(report.step))[0]) if finetune_epochs else (lambda m, report: measures.accuracy(m))
        points = prune_sweep(model, recipe.input_shape, thresholds, measure, spec)
        run = SweepRun(source, points, unpruned, summarize(model.cpu(), recipe.input_shape).macs, None if png is None else Path(png))
        if png is not None:
            plot_sweep(points, png, unpruned_accuracy=unpruned, unpruned_macs=run.unpruned_macs, title=source, force=force)
        return run
    finally:
        teardown()


# -- export ------------------------------------------------------------------------------------------
@dataclass
class ExportRun:
    """An export (`report`: `ExportReport`) of `source`, with the dataset it was checked on."""

    source: str
    report: ExportReport
    data: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.source} | self.report.to_dict()


def export(source: str, output: str | os.PathLike, config: ExportConfig | None = None, *, input_shape: tuple[int, int, int] | None = None,
           data: str | None = None, trust_factory: bool = False, force: bool = False, extra_outputs: Paths = (),
           on_stage: Stage | None = None) -> ExportRun:
    """Export `source` as compact ONNX at `output` (`export_model`; `config` default `ExportConfig()`),
    checked against PyTorch, and on `data` (checks, int8 calibration and ONNX accuracy) when given."""
    from gaborprune._io import check_outputs
    from gaborprune.export.api import ExportConfig, export_model

    config = config if config is not None else ExportConfig()
    check_outputs([output, *extra_outputs], force)
    model, recipe = _load(source, **given(input_shape=input_shape), trust_factory=trust_factory)
    pair = None
    if data is not None:
        train, test, _ = _data(model, recipe, data)
        pair = (train, test)
    _stage(on_stage, "lowering, exporting and checking..." + (" (timing the candidate forms)" if config.lowering == "auto" else ""))
    return ExportRun(source, export_model(model, recipe.input_shape, output, config, recipe=recipe, data=pair, force=force), data)


# -- bench -------------------------------------------------------------------------------------------
def _bench_model(source: str, workdir: Path, batch: int, threads: int, trust_factory: bool, on_stage: Stage | None):
    """An ONNX file as it is; a recipe or model source exported on the fly into `workdir` (dynamic
    batch, auto lowering at the first configuration), its PyTorch model kept for eager timing."""
    from gaborprune.export.api import ExportConfig, export_model
    from gaborprune.export.bench import load_onnx
    from gaborprune.export.inspect_onnx import is_onnx_path

    if is_onnx_path(source):
        return load_onnx(source)
    model, recipe = _load(source, trust_factory=trust_factory)
    path = workdir / f"{len(list(workdir.iterdir()))}.onnx"
    _stage(on_stage, f"exporting {source}...")
    export_model(model, recipe.input_shape, path, ExportConfig(batch_size=batch, dynamic_batch=True, threads=threads), recipe=recipe)
    m = load_onnx(path, name=source)
    m.torch_model = model.eval()
    return m


def bench(models: Sequence[str], *, baseline: Sequence[str] = (), batch_sizes: Sequence[int] | None = None,
          threads: Sequence[int] | None = None, warmup: int | None = None, runs: int | None = None, precision: float | None = None,
          max_seconds: float | None = None, int8: bool = False, data: str | None = None, provider: str = "cpu",
          profile: bool = False, torch_eager: bool = False, trust_factory: bool = False, force: bool = False, extra_outputs: Paths = (),
          on_stage: Stage | None = None) -> BenchReport:
    """`gaborprune.export.bench.bench` over ONNX files and recipes / model sources (exported on the fly
    to a temporary folder), with the `baseline`s timed in the same runs; `data` calibrates `int8`.
    Settings left None are bench's defaults. Every setting is checked before anything is exported."""
    import tempfile

    from gaborprune._io import check_outputs
    from gaborprune.export import bench as timing
    from gaborprune.export.runtime import providers

    batches, counts = tuple(batch_sizes or timing.BATCH_SIZES), tuple(threads or timing.THREADS)
    settings = dict(warmup=timing.WARMUP if warmup is None else warmup, runs=timing.RUNS if runs is None else runs,
                    precision=timing.PRECISION if precision is None else precision,
                    max_seconds=timing.MAX_SECONDS if max_seconds is None else max_seconds)
    timing.check_settings(batches, counts, **settings)
    if data is not None and not int8:
        raise GaborPruneError(f"--data {data} calibrates --int8; add --int8, or leave out --data")
    if data is not None:
        from gaborprune.data import DataSpec, load_data

        spec = DataSpec.parse(data)
    providers(provider)
    check_outputs(extra_outputs, force)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [_bench_model(m, Path(tmp), batches[0], counts[0], trust_factory, on_stage) for m in models]
        bases = [_bench_model(b, Path(tmp), batches[0], counts[0], trust_factory, on_stage) for b in baseline]
        calibration = None
        if data is not None:
            from gaborprune.export.quantize import calibration_batches

            train, _ = load_data(spec, loaded[0].chw)
            calibration = calibration_batches(train, next((m.fixed_batch for m in loaded + bases if m.fixed_batch), 32))
        _stage(on_stage, f"timing {len(loaded) + len(bases)} model(s){' and their int8 copies' if int8 else ''} x "
                         f"{len(batches) * len(counts)} configuration(s), in rounds until the medians are tight...")
        return timing.bench(loaded, baseline=bases or None, batch_sizes=batches, threads=counts, provider=provider, profile_layers=profile,
                            torch_eager=torch_eager, int8=int8, calibration=calibration, **settings)
