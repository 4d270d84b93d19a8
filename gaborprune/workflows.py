"""Every command's workflow as one call: load a model source, do the work, write the outputs, report.

The CLI only parses its options, calls one of these and renders what it returns (`to_dict()` is
the command's --json), so a notebook does what a command does with the same few lines:

    from gaborprune import workflows as wf
    run = wf.convert("resnet20", gp.ConversionSpec(first=2), "r20.pt")            # gaborprune convert
    run = wf.prune("ft.pt", "pruned.pt", gp.PruneSpec(threshold=0.05), accuracy=wf.Accuracy("digits", recovery_epochs=2))

Three small values carry what every workflow shares: a `Source` (the model source and how to load
it: weights, classes, builder arguments, input shape, trust), `Options` (how the run goes: outputs
that may be overwritten, the caller's extra outputs, the device, progress callbacks) and, for
prune and sweep, `Accuracy` (where accuracy is measured and how it is recovered). A plain string
is a `Source` with no options.

Nothing here prints: what a workflow is doing goes to `Options.on_stage` (one line of text),
training to `on_step` / `on_epoch`. Each workflow checks all its outputs, and the caller's
`extra_outputs` (a JSON report the caller writes afterwards), before any work; every file is
written atomically. This module imports torch only inside its functions, so the CLI reads its
defaults without waiting for torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gaborprune._validate import check_int
from gaborprune.errors import GaborPruneError
from gaborprune.train.config import TrainConfig

if TYPE_CHECKING:
    from gaborprune.convert.spec import ConversionReport, ConversionSpec
    from gaborprune.export.api import ExportConfig, ExportReport
    from gaborprune.export.results import BenchReport
    from gaborprune.prune import PruneReport, PruneSpec, SweepPoint
    from gaborprune.search import TargetReport, TargetSpec
    from gaborprune.train import Checkpoints, TrainResult

#: The peak learning rate of the fine-tuning that recovers a pruned model's accuracy: a fifth of
#: fine-tuning's default `TrainConfig.lr`, since the weights start trained (the demo recovers so too).
RECOVERY_LR = 0.01
#: Training images that calibrate: a conversion's output fit (`convert(..., data=)`) and the
#: BatchNorm statistics re-estimated after a conversion or a prune.
CALIBRATION_IMAGES = 1024
#: The share of the training images an accuracy budget (`TargetSpec.max_drop`) is judged on, held out
#: (seeded) from the training split: choices are never made on the test split.
VALIDATION = 0.1
#: Where the CLI's `prune --sweep` draws its plot when no --png is given (`sweep` draws only when asked).
SWEEP_PNG = "prune-sweep.png"
#: The device a workflow trains and evaluates on: CUDA when available, else the CPU.
DEVICE = "auto"

Stage = Callable[[str], None]
Paths = Iterable["str | os.PathLike | None"]


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None), to pass on so that every default stays the callee's."""
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class Source:
    """A model source and how to load it (`gaborprune.recipe.load_model`): `spec` is a built-in name,
    `torchvision:NAME`, `package.module:factory`, a recipe .pt or (where a workflow takes one) an .onnx
    file; `input_shape` is C,H,W. Options left None are the source's own. A fresh source's initial
    weights are drawn from the seed of the run that loads it (the conversion's or the training's)."""

    spec: str
    weights: str | None = None
    num_classes: int | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    trust_factory: bool = False

    @classmethod
    def of(cls, source: Source | str) -> Source:
        return source if isinstance(source, Source) else cls(str(source))

    def __str__(self) -> str:
        return self.spec

    def options(self) -> dict[str, Any]:
        """The loading options that were given (what an ONNX file fixes itself is refused by them)."""
        return given(weights=self.weights, num_classes=self.num_classes, model_args=dict(self.model_args) or None, input_shape=self.input_shape)

    def files(self) -> list[str | None]:
        """The paths it reads (those that name no file are skipped where it matters): no output may replace them."""
        return [self.spec, self.weights]

    def load(self, seed: int = 0):
        """(model, recipe): `load_model` with these options, a fresh source's weights drawn from `seed`."""
        from gaborprune.recipe import load_model

        return load_model(self.spec, seed=seed, trust_factory=self.trust_factory, **self.options())


@dataclass(frozen=True)
class Options:
    """How a workflow runs and reports, apart from what it computes: `force` overwrites existing
    outputs, `extra_outputs` are files the caller writes afterwards (checked with the workflow's own
    before any work), `device` trains and evaluates (auto: CUDA when available), and the callbacks
    receive progress: `on_stage` one line of text, `on_step` / `on_epoch` training steps and epochs."""

    force: bool = False
    extra_outputs: Paths = ()
    device: str = DEVICE
    on_stage: Stage | None = None
    on_step: Callable | None = None
    on_epoch: Callable[[dict], None] | None = None

    def stage(self, text: str) -> None:
        if self.on_stage is not None:
            self.on_stage(text)


#: What workflows run with when the caller gives no `Options`.
OPTIONS = Options()


@dataclass(frozen=True)
class Accuracy:
    """Where `prune` and `sweep` measure top-1 (the test split of `data`) and how they recover it:
    `recalibrate` re-estimates BatchNorm statistics on CALIBRATION_IMAGES training images (no
    gradient step), `recovery_epochs` of fine-tuning at peak `lr` follow (None: none); `batch_size`
    trains and evaluates, `seed` draws the images, `resize` is ImageFolder's."""

    data: str
    recalibrate: bool = True
    recovery_epochs: int | None = None
    lr: float = RECOVERY_LR
    batch_size: int = TrainConfig.batch_size
    seed: int = TrainConfig.seed
    resize: int | None = None

    def __post_init__(self) -> None:
        from gaborprune.data import DataSpec

        if self.recovery_epochs is not None:
            check_int(self.recovery_epochs, "`recovery_epochs`", 1)
        self.recovery()  # lr, batch size and seed checked as a fine-tuning run checks them
        DataSpec.parse(self.data)  # a bad spec fails before any model loads

    def recovery(self) -> TrainConfig:
        """The recovery fine-tuning's settings (its batch size also evaluates): a trained network's
        (`TRAINED_FINETUNE`: no warm-up), with BatchNorm statistics re-estimated before each evaluation.
        On CIFAR-10, the altered ResNet-20's Gabor banks pruned and recalibrated to 62.57% fell to
        54.21% after one recovery epoch that was all warm-up, without recalibration (docs/results.md)."""
        return TrainConfig(**given(epochs=self.recovery_epochs), lr=self.lr, warmup_epochs=TRAINED_FINETUNE["warmup_epochs"],
                           batch_size=self.batch_size, seed=self.seed, recalibrate=True)


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
            hint = f"; continue with the same command plus `resume` {checkpoints.last}" if checkpoints else ""
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


def convert(source: Source | str, spec: ConversionSpec, output: str | os.PathLike, *, data: str | None = None,
            calibration_images: int = CALIBRATION_IMAGES, resize: int | None = None, options: Options = OPTIONS) -> ConvertRun:
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
    source = Source.of(source)
    check_outputs([output, *options.extra_outputs], options.force, inputs=source.files())
    model, recipe = source.load(spec.seed)
    before = summarize(model, recipe.input_shape).params
    calibration = batches = None
    if data is not None:
        from gaborprune.train import evaluate as evaluate_model

        dev = resolve_device(options.device)
        train, test, name = _data(model, recipe, data, resize)
        test = test.to(dev)
        model.to(dev)
        accuracy_before = evaluate_model(model, test, dev).top1
        batches = [x.to(dev) for x in calibration_batches(train, calibration_images, seed=spec.seed)]
    options.stage(("fitting Gabor banks" + (f" to their layers' outputs on {calibration_images} {name} images" if data else "") + "...")
                     if spec.init == "fit" and spec.to == "gabor" else "converting...")
    report = gaborize_(model, spec, recipe.input_shape, calibration=batches)
    if data is not None:
        calibration = Calibration(name, sum(len(x) for x in batches), accuracy_before, evaluate_model(model, test, dev).top1)
        recipe = recipe.with_metadata(calibration=asdict(calibration))
        model.cpu()
    recipe = recipe.with_step(report.step)
    after = summarize(model, recipe.input_shape).params
    save_recipe(output, model, recipe, force=options.force)
    fitted = any(layer.fit_rel_error is not None for layer in report.layers)
    untrained = fitted and source.weights is None and not is_recipe_path(source.spec)
    return ConvertRun(str(source), Path(output), report, before, after, untrained, calibration)


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


def _check_onnx_options(source: Source, *names: str) -> None:
    """Refuse model-source options that an ONNX file fixes itself."""
    from gaborprune.export.inspect_onnx import check_onnx_options

    given_options = source.options()
    check_onnx_options(source.spec, **{n: given_options.get(n) or None for n in names})


def inspect(source: Source | str, *, png: str | os.PathLike | None = None, options: Options = OPTIONS) -> InspectRun:
    """Count a model's layers, parameters, MACs and FLOPs (an .onnx file: its operators, inputs and
    metadata too); with `png`, draw its Gabor banks (or first convolution)."""
    from gaborprune._io import check_outputs
    from gaborprune.export.inspect_onnx import describe_onnx, is_onnx_path
    from gaborprune.plot import plot_recipe_banks
    from gaborprune.summary import summarize

    source = Source.of(source)
    check_outputs([png, *options.extra_outputs], options.force, inputs=source.files())
    if is_onnx_path(source.spec):
        _check_onnx_options(source, "num_classes", "weights", "model_args", "input_shape")
        if png:
            raise GaborPruneError(f"`png` draws a recipe's Gabor banks; '{source}' holds them baked into plain convolutions: "
                                  "inspect the recipe it was exported from")
        return InspectRun(str(source), describe_onnx(source.spec))
    model, recipe = source.load()
    run = InspectRun(str(source), summarize(model, recipe.input_shape))
    if png:
        run.drawn = plot_recipe_banks(model, recipe, png, force=options.force)
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


def finetune(source: Source | str, data: str, output: str | os.PathLike, config: TrainConfig = TrainConfig(), *,
             resume: str | os.PathLike | None = None, resize: int | None = None, options: Options = OPTIONS) -> FinetuneRun:
    """Fine-tune `source` on `data` (the Gabor banks under `config`'s sparsity pressure) and save the
    recipe at `output`, with resumable checkpoints beside it (`gaborprune.train.checkpoint`).

    `resume` continues the run saved in an OUT.last.pt; its checkpoints are overwritten by design.
    Under torchrun every process trains and rank 0 alone checks and writes the outputs.

    Raises:
        GaborPruneError: also for Ctrl-C or SIGTERM, naming the checkpoint to resume from.
    """
    from gaborprune._io import check_not_inputs, check_outputs
    from gaborprune.data import DataSpec, load_data
    from gaborprune.recipe import save_recipe
    from gaborprune.train import Checkpoints
    from gaborprune.train.distributed import setup, teardown

    source = Source.of(source)
    checkpoints = Checkpoints(output)
    if resume is not None and not Path(resume).is_file():
        raise GaborPruneError(f"resume file '{resume}' not found")
    spec = DataSpec.parse(data)
    check_not_inputs([output, *options.extra_outputs], [*source.files(), resume])  # before loading: the rest needs the model's checkpoints
    dist, dev = setup(options.device)
    try:
        model, recipe = source.load(config.seed)
        train, test = load_data(spec, recipe.input_shape, resize=resize)
        if dist.main:
            check_outputs([output, *options.extra_outputs] + ([] if resume else checkpoints.paths), options.force,
                          reused=checkpoints.paths if resume else ())
            processes = f" x {dist.world} processes" if dist.world > 1 else ""
            options.stage(f"fine-tuning {source} on {spec} ({len(train)} train / {len(test)} test images) on {dev}{processes}")
        result = _train(model, recipe, train, test, config, dev, dist, str(spec), checkpoints=checkpoints, resume=resume,
                        on_step=options.on_step, on_epoch=options.on_epoch)
        if dist.main:
            save_recipe(output, model.cpu(), recipe.with_step(result.step), force=options.force)
        return FinetuneRun(str(source), str(spec), Path(output), config, checkpoints, result, dist.main)
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


def evaluate(source: Source | str, data: str, *, batch_size: int | None = None, resize: int | None = None, threads: int | None = None,
             options: Options = OPTIONS) -> EvalRun:
    """Top-1 / top-5 accuracy and loss of `source` on the test split of `data`; an .onnx file runs in
    ONNX Runtime (`threads`: its intra-op threads). `batch_size` None: the evaluators' default."""
    from gaborprune._io import check_outputs
    from gaborprune.data import DataSpec, load_data
    from gaborprune.export.inspect_onnx import evaluate_onnx, input_chw, is_onnx_path

    source = Source.of(source)
    check_outputs(options.extra_outputs, options.force, inputs=source.files())

    if is_onnx_path(source.spec):
        _check_onnx_options(source, "num_classes", "weights", "model_args")
        spec = DataSpec.parse(data)
        _, test = load_data(spec, source.input_shape or input_chw(source.spec), resize=resize)
        result = evaluate_onnx(source.spec, test, batch_size=batch_size, threads=threads, provider=options.device, data_name=str(spec))
        return EvalRun(str(source), str(spec), "onnxruntime", result.provider, result)
    from gaborprune.train import evaluate as evaluate_model
    from gaborprune.train.distributed import setup

    DataSpec.parse(data)  # a bad spec fails before the model loads
    dist, dev = setup(options.device)
    model, recipe = source.load()
    _, test, name = _data(model, recipe, data, resize)
    result = evaluate_model(model.to(dev), test.to(dev), dev, **given(batch_size=batch_size))
    return EvalRun(str(source), name, "pytorch", str(dev), result)


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
    this CPU's channel block unless `round_to` says otherwise. Which of a spec's own fields combine,
    `PruneSpec` checks; here, which combine with a target."""
    from gaborprune.prune import PruneSpec
    from gaborprune.prune.structured import default_round_to

    if spec is None:
        return None if target is not None else PruneSpec()
    if target is not None and spec.scope != "all":  # with scope "all" the spec carries the scope and rounding of the search
        raise GaborPruneError("give a PruneSpec or a TargetSpec, not both")
    if target is not None and spec.threshold != PruneSpec().threshold:  # the target's search chooses the thresholds
        raise GaborPruneError(f"a TargetSpec chooses the kernels itself; drop `threshold` {spec.threshold:g} (with a target, a PruneSpec gives "
                              "only `scope` and `round_to`)")
    return replace(spec, round_to=default_round_to()) if spec.scope == "all" and spec.round_to is None else spec


class _Measures:
    """Accuracy on the test split, and recovery fine-tuning then accuracy, of a model on one dataset;
    with `validation`, a share of the training split is held out to score candidates on (`score`)."""

    def __init__(self, model, recipe, accuracy: Accuracy, device, dist, options: Options, validation: bool = False) -> None:
        self.train, self.test, self.name = _data(model, recipe, accuracy.data, accuracy.resize)
        self.test, self.val = self.test.to(device), None
        if validation:
            self.train, self.val = self.train.split(max(1, round(VALIDATION * len(self.train))), seed=accuracy.seed)
            self.val = self.val.to(device)
        self.recipe, self.recalibrates, self.recovers = recipe, accuracy.recalibrate, accuracy.recovery_epochs is not None
        self.config, self.device, self.dist, self.on_step, self.on_epoch = accuracy.recovery(), device, dist, options.on_step, options.on_epoch
        self._calibration: list | None = None

    def accuracy(self, model, split=None) -> float:
        from gaborprune.train import evaluate as evaluate_model

        split = self.test if split is None else split
        return evaluate_model(model.to(self.device), split, self.device, batch_size=self.config.batch_size).top1

    def score(self, model) -> float:
        """Validation top-1 of a pruned copy after what the prune does next (recalibration, recovery)."""
        if self.recalibrates:
            self.recalibrate_(model)
        if self.recovers:
            _train(model, self.recipe, self.train, self.val, self.config, self.device, self.dist, self.name, on_step=self.on_step)
        return self.accuracy(model, self.val)

    def calibration(self) -> list:
        """CALIBRATION_IMAGES augmented training images with their labels, drawn once (seeded): what
        recalibration and the Taylor importance use."""
        from gaborprune.data import calibration_batches

        if self._calibration is None:
            self._calibration = calibration_batches(self.train, CALIBRATION_IMAGES, self.config.batch_size, seed=self.config.seed, labels=True)
        return self._calibration

    def recalibrate_(self, model) -> None:
        """Re-estimate `model`'s BatchNorm statistics on the calibration images (no gradient steps,
        nothing else changes)."""
        from gaborprune.norms import recalibrate_norms_

        recalibrate_norms_(model.to(self.device), (x.to(self.device) for x, _ in self.calibration()))

    def taylor_scores(self, model, input_shape) -> dict[str, float]:
        """Each removable channel's Taylor importance (`gaborprune.prune.importance`) on the
        calibration images, on the CPU."""
        from gaborprune.prune.importance import taylor_scores

        return taylor_scores(model.to("cpu"), input_shape, [(x.cpu(), y.cpu()) for x, y in self.calibration()])

    def recalibrate(self, model) -> float:
        """`recalibrate_`, then the test accuracy."""
        self.recalibrate_(model)
        return self.accuracy(model)

    def recover(self, model, recipe):
        """(accuracy after recovery, `recipe` with the recovery's step)."""
        result = _train(model, recipe, self.train, self.test, self.config, self.device, self.dist, self.name, on_step=self.on_step,
                        on_epoch=self.on_epoch)
        return self.accuracy(model), recipe.with_step(result.step)


def prune(source: Source | str, output: str | os.PathLike | None = None, spec: PruneSpec | None = None, *, target: TargetSpec | None = None,
          accuracy: Accuracy | None = None, dry_run: bool = False, threads: int | None = None,
          on_pruned: Callable[[PruneRun], None] | None = None, options: Options = OPTIONS) -> PruneRun:
    """Prune a recipe's Gabor banks by `spec` (default `PruneSpec()`) or to a measured `target`
    (`prune_to_target_`, timed on `threads`, default 1); with `accuracy`, evaluate before and after,
    re-estimate the BatchNorm statistics on training images (`Accuracy.recalibrate`: removed kernels
    and channels shift what every later BatchNorm sees) and recover with its recovery epochs of
    fine-tuning (removed kernels stay removed); save the pruned recipe at `output`, its run recorded
    under metadata["prunes"] (`PruneRun.record`). `dry_run` writes nothing.

    With `scope` all and a `ratio` or a target, channels are ranked by their Taylor importance when
    `accuracy` is given and the spec leaves `importance` None (`PruneSpec.importance`): the channels'
    first-order loss changes are estimated on CALIBRATION_IMAGES of its training images before
    anything is removed. `importance` "taylor" needs `accuracy`.

    A target with an accuracy budget (`TargetSpec.max_drop`) needs `accuracy`: each candidate is
    recalibrated and recovered as the final prune will be, then scored on VALIDATION of the training
    images, held out (seeded by `Accuracy.seed`) from what recalibration and recovery see; the test
    split is measured before and after, as always, and never decides.

    `on_pruned(run)` is called once the model is pruned, before its accuracy is measured and before
    recovery, so the prune can be shown while recovery runs; also when a target is not met
    (`run.report` None), before the call raises.
    """
    from gaborprune._io import check_outputs
    from gaborprune.prune import prune_model_
    from gaborprune.recipe import save_recipe
    from gaborprune.search import prune_to_target_
    from gaborprune.train.distributed import setup, teardown

    source, spec = Source.of(source), _prune_spec(spec, target)
    budget = target is not None and target.max_drop is not None
    if spec is not None and spec.scope == "all" and spec.importance is None and (spec.ratio is not None or target is not None):
        spec = replace(spec, importance="taylor" if accuracy is not None else "gain")
    taylor = spec is not None and spec.importance == "taylor"
    if taylor and accuracy is None:
        raise GaborPruneError("`importance` taylor estimates each channel's loss change on training images; give `data`")
    if budget and accuracy is None:
        raise GaborPruneError("an accuracy budget (`max_drop`) is judged on a validation split held out from the training images; give `data`")
    if output is None and not dry_run:
        raise GaborPruneError("say where to write the pruned recipe with `output` (or look first with `dry_run`)")
    check_outputs([*options.extra_outputs] + ([] if dry_run else [output]), options.force, inputs=source.files())
    model, recipe = source.load()
    dist, dev = setup(options.device)
    try:
        measures = _Measures(model, recipe, accuracy, dev, dist, options, validation=budget) if accuracy else None
        before = measures.accuracy(model) if measures else None
        run = PruneRun(str(source), None if dry_run else Path(output), spec, data=measures.name if measures else None,
                       recovery_epochs=accuracy.recovery_epochs if measures and not dry_run else None)
        scores = None
        if taylor:
            options.stage(f"estimating each channel's loss change on {CALIBRATION_IMAGES} training images (Taylor importance)...")
            scores = measures.taylor_scores(model, recipe.input_shape)
        if target is not None:
            options.stage(f"pruning to {target.describe()}: " + ("scoring candidates on the validation split" if budget else
                                                                  "exporting and timing candidates with ONNX Runtime" if target.timed else
                                                                  "counting the candidates' MACs") + "...")
            scoped = dict(scope=spec.scope, round_to=spec.round_to, scores=scores, module=spec.module) if spec is not None else {}
            run.target = prune_to_target_(model.to("cpu"), recipe.input_shape, target, **scoped, **given(threads=threads),
                                          accuracy=measures.score if budget else None)
            if run.target.prune is None:
                if on_pruned is not None:
                    on_pruned(run)
                raise GaborPruneError(run.target.message + "; no recipe written")
            scope = " (scope all)" if spec is not None and spec.scope == "all" else ""
            run.report, run.rule = run.target.prune, f"{run.target.chosen_candidate.label}{scope} for {target.describe()}"
        else:
            options.stage("pruning...")
            run.report = prune_model_(model, recipe.input_shape, spec, scores=scores)
            run.rule = spec.describe([c.name for c in run.report.gabor_layers])
        recipe = recipe.with_step(run.report.step)
        if on_pruned is not None:
            on_pruned(run)
        if measures is not None:
            run.report.accuracy_before = before
            run.report.accuracy_pruned = run.report.accuracy_after = measures.accuracy(model)
            if accuracy.recalibrate:
                run.report.accuracy_recalibrated = run.report.accuracy_after = measures.recalibrate(model)
            if run.recovery_epochs:
                run.report.accuracy_after, recipe = measures.recover(model, recipe)
        if not dry_run:
            recipe = recipe.with_metadata(prunes=[*recipe.metadata.get("prunes", []), run.record()])
            save_recipe(output, model.to("cpu"), recipe, force=options.force)
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


def sweep(source: Source | str, thresholds: Sequence[float], spec: PruneSpec | None = None, *, accuracy: Accuracy | None = None,
          png: str | os.PathLike | None = None, options: Options = OPTIONS) -> SweepRun:
    """Prune copies of `source` at each threshold (the rest of `spec` as given: scope, rounding),
    measure each as `accuracy` says (BatchNorm statistics re-estimated as `prune` does, and after its
    recovery epochs when given) and, with `png`, plot accuracy and MACs against kernels kept. Writes
    no recipe."""
    from gaborprune._io import check_outputs
    from gaborprune.plot import plot_sweep
    from gaborprune.prune import sweep as prune_sweep
    from gaborprune.summary import summarize
    from gaborprune.train.distributed import setup, teardown

    thresholds = list(thresholds)
    bad = [t for t in thresholds if not 0 <= t < 1]
    if bad or not thresholds:
        raise GaborPruneError(f"`sweep` threshold {bad[0] if bad else '(none)'} is out of range; thresholds are fractions in [0, 1)")
    if accuracy is None:
        raise GaborPruneError("`sweep` needs `data` to measure accuracy")
    source, spec = Source.of(source), _prune_spec(spec, None)
    check_outputs([png, *options.extra_outputs], options.force, inputs=source.files())
    model, recipe = source.load()
    dist, dev = setup(options.device)
    try:
        measures = _Measures(model, recipe, accuracy, dev, dist, options)
        unpruned = measures.accuracy(model)
        options.stage(f"pruning at {len(thresholds)} thresholds...")
        measure = ((lambda m, report: measures.recover(m, recipe.with_step(report.step))[0]) if accuracy.recovery_epochs
                   else (lambda m, report: measures.recalibrate(m)) if accuracy.recalibrate else (lambda m, report: measures.accuracy(m)))
        points = prune_sweep(model, recipe.input_shape, thresholds, measure, spec)
        run = SweepRun(str(source), points, unpruned, summarize(model.cpu(), recipe.input_shape).macs, None if png is None else Path(png))
        if png is not None:
            plot_sweep(points, png, unpruned_accuracy=unpruned, unpruned_macs=run.unpruned_macs, title=str(source), force=options.force)
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


def export(source: Source | str, output: str | os.PathLike, config: ExportConfig | None = None, *, data: str | None = None,
           module: str | None = None, options: Options = OPTIONS) -> ExportRun:
    """Export `source` as compact ONNX at `output` (`export_model`; `config` default `ExportConfig()`),
    checked against PyTorch, and on `data` (checks, int8 calibration and ONNX accuracy) when given;
    only its `module` (a detector's backbone) when given."""
    from gaborprune._io import check_outputs
    from gaborprune.export.api import ExportConfig, export_model

    source, config = Source.of(source), config if config is not None else ExportConfig()
    check_outputs([output, *options.extra_outputs], options.force, inputs=source.files())
    model, recipe = source.load()
    pair = None
    if data is not None:
        train, test, _ = _data(model, recipe, data)
        pair = (train, test)
    options.stage("lowering, exporting and checking..." + (" (timing the candidate forms)" if config.lowering == "auto" else ""))
    report = export_model(model, recipe.input_shape, output, config, provenance=recipe.provenance(), data=pair, force=options.force, module=module)
    return ExportRun(str(source), report, data)


# -- bench -------------------------------------------------------------------------------------------
def _bench_model(source: Source, workdir: Path, batch: int, threads: int, options: Options):
    """An ONNX file as it is; a recipe or model source exported on the fly into `workdir` (dynamic
    batch, auto lowering at the first configuration), its PyTorch model kept for eager timing."""
    from gaborprune.export.api import ExportConfig, export_model
    from gaborprune.export.bench_models import load_onnx
    from gaborprune.export.inspect_onnx import is_onnx_path

    if is_onnx_path(source.spec):
        return load_onnx(source.spec)
    model, recipe = source.load()
    path = workdir / f"{len(list(workdir.iterdir()))}.onnx"
    options.stage(f"exporting {source}...")
    export_model(model, recipe.input_shape, path, ExportConfig(batch_size=batch, dynamic_batch=True, threads=threads), provenance=recipe.provenance())
    m = load_onnx(path, name=str(source))
    m.torch_model = model.eval()
    return m


@dataclass(frozen=True)
class BenchSettings:
    """How `bench` times: batch sizes, intra-op thread counts, untimed runs and timed runs per round,
    the relative width of a median's 95% interval that ends the rounds, the time budget (seconds, all
    configurations together) and the ONNX Runtime provider. None: bench's default."""

    batch_sizes: tuple[int, ...] | None = None
    threads: tuple[int, ...] | None = None
    warmup: int | None = None
    runs: int | None = None
    precision: float | None = None
    max_seconds: float | None = None
    provider: str = "cpu"

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults filled in and checked (`gaborprune.export.bench.check_settings`)."""
        from gaborprune.export import bench as timing
        from gaborprune.export.runtime import providers

        values = dict(batch_sizes=tuple(self.batch_sizes or timing.BATCH_SIZES), threads=tuple(self.threads or timing.THREADS),
                      warmup=timing.WARMUP if self.warmup is None else self.warmup, runs=timing.RUNS if self.runs is None else self.runs,
                      precision=timing.PRECISION if self.precision is None else self.precision,
                      max_seconds=timing.MAX_SECONDS if self.max_seconds is None else self.max_seconds)
        timing.check_settings(*values.values())
        providers(self.provider)
        return values | {"provider": self.provider}


def bench(models: Sequence[Source | str], *, baseline: Sequence[Source | str] = (), settings: BenchSettings = BenchSettings(), int8: bool = False,
          data: str | None = None, profile: bool = False, torch_eager: bool = False, options: Options = OPTIONS) -> BenchReport:
    """`gaborprune.export.bench.bench` over ONNX files and recipes / model sources (exported on the fly
    to a temporary folder), with the `baseline`s timed in the same runs; `data` calibrates `int8`.
    Every setting is checked before anything is exported."""
    import tempfile

    from gaborprune._io import check_outputs
    from gaborprune.export import bench as timing

    chosen = settings.resolved()
    batches, counts = chosen["batch_sizes"], chosen["threads"]
    if data is not None and not int8:
        raise GaborPruneError(f"`data` {data} calibrates `int8`; add `int8`, or leave out `data`")
    if data is not None:
        from gaborprune.data import DataSpec, load_data

        spec = DataSpec.parse(data)
    check_outputs(options.extra_outputs, options.force, inputs=[f for m in [*models, *baseline] for f in Source.of(m).files()])
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [_bench_model(Source.of(m), Path(tmp), batches[0], counts[0], options) for m in models]
        bases = [_bench_model(Source.of(b), Path(tmp), batches[0], counts[0], options) for b in baseline]
        calibration = None
        if data is not None:
            from gaborprune.export.quantize import calibration_batches

            train, _ = load_data(spec, loaded[0].chw)
            calibration = calibration_batches(train, next((m.fixed_batch for m in loaded + bases if m.fixed_batch), 32))
        options.stage(f"timing {len(loaded) + len(bases)} model(s){' and their int8 copies' if int8 else ''} x "
                      f"{len(batches) * len(counts)} configuration(s), in rounds until the medians are tight...")
        return timing.bench(loaded, baseline=bases or None, profile_layers=profile, torch_eager=torch_eager, int8=int8, calibration=calibration,
                            **chosen)
