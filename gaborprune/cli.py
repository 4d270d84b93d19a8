"""The command line: parse, call the library, print. The only module that imports typer."""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gaborprune.errors import GaborPruneError
from gaborprune.train.config import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Compress CNNs: convert early convolutions to learnable Gabor banks, fine-tune with sparsity, "
    "prune the zeroed kernels, export compact ONNX, and benchmark it.",
)
# Piped output is not cut to 80 columns: tables of layer names would wrap into noise.
# Names, paths and dataset specs are printed verbatim: no markup, no emoji codes (fake:100:4 has one).
out = Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, emoji=False)

# -- shared options ------------------------------------------------------------------------------
Source = Annotated[str, typer.Argument(help="Model: resnet20|resnet32|resnet56|resnet20_altered|vgg11|vgg13|vgg16|vgg19|cada_net, torchvision:NAME, package.module:factory, or a recipe .pt file.", metavar="SOURCE", show_default=False)]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs (default: the model's own).", show_default=False)]
Weights = Annotated[Optional[str], typer.Option("--weights", metavar="FILE", help="Local state_dict file to load (nothing is downloaded).", show_default=False)]
ModelArg = Annotated[Optional[list[str]], typer.Option("--model-arg", metavar="KEY=VALUE", help="Builder keyword argument KEY=VALUE, repeatable (e.g. k1=9 for resnet20_altered).", show_default=False)]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="Model input C,H,W (default: from the model source).", show_default=False)]
JsonOut = Annotated[Optional[Path], typer.Option("--json", metavar="PATH", help="Also write a machine-readable report here.", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
TrustFactory = Annotated[bool, typer.Option("--trust-factory", help="Let a recipe file import and call the package.module:factory it names as its model source (that runs code from the file's author; only for files you trust).")]
Threads = Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads torch computes with (default: one per core; on a busy machine 1 is often several times faster).", show_default=False)]


def _command(fn):
    """Register a command whose GaborPruneErrors become one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GaborPruneError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return app.command()(wrapper)


def _shape(text: str | None, dims: str = "C,H,W", example: str = "3,32,32") -> tuple[int, ...] | None:
    """--input-shape: C,H,W (or N,C,H,W for export) as positive integers."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    count = dims.count(",") + 1
    if len(shape) != count or min(shape) < 1:
        words = {3: "three", 4: "four"}[count]
        raise typer.BadParameter(f"'{text}' is not {dims} ({words} positive integers, e.g. {example})", param_hint="--input-shape")
    return shape


def _model_args(items: list[str] | None) -> dict:
    args = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise typer.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--model-arg")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = {"true": True, "false": False}.get(value.lower(), value)
    return args


def _threads(threads: int | None) -> int:
    """Set torch's threads before any work; warn in one line when the machine cannot give them."""
    from gaborprune._threads import busy_warning, set_threads

    used = set_threads(threads)
    warning = busy_warning(used)
    if warning:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    return used


def _load(source: str, num_classes, weights, model_args, input_shape, seed: int | None = None, trust_factory: bool = False):
    import torch

    from gaborprune._validate import check_seed
    from gaborprune.recipe import load_model

    torch.manual_seed(check_seed(seed or 0))  # a fresh source's initial weights are reproducible, like the rest of a run
    return load_model(source, num_classes=num_classes, weights=weights, model_args=_model_args(model_args), input_shape=_shape(input_shape),
                      trust_factory=trust_factory)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# -- convert -------------------------------------------------------------------------------------
@_command
def convert(
    source: Source,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Recipe file to write.", show_default=False)],
    layers: Annotated[Optional[int], typer.Option("--layers", metavar="N", help="Convert the first N convolutions in execution order.", show_default=False)] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", metavar="NAME", help="Convert this layer (qualified name, or re:REGEX); repeatable.", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option("--init", metavar="fit|random", help="fit: least squares to the trained kernels (default); random: a spread bank.", show_default=False)] = None,
    kernel_size: Annotated[Optional[int], typer.Option("--kernel-size", metavar="K", help="Enlarge kernels to K x K (padding grows, output shapes stay): K - k even, at most 31 and at most 2*min(H,W)-1 of each layer's input (wider taps only see padding).", show_default=False)] = None,
    freeze: Annotated[Optional[list[str]], typer.Option("--freeze", metavar="PARAM", help="Keep a Gabor parameter fixed in training: amplitude, theta, sigma, wavelength, psi, gamma; repeatable.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of a fresh source's initial weights and of the random bank (default 0).", show_default=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", metavar="gabor|cada", help="gabor: learnable Gabor banks (default); cada: context-aware decomposed attention blocks.", show_default=False)] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="CADA: heads (default 1).", show_default=False)] = None,
    bases: Annotated[Optional[int], typer.Option("--bases", metavar="B", help="CADA: base kernels per head (default 4; 1 for strict/none).", show_default=False)] = None,
    context: Annotated[Optional[int], typer.Option("--context", metavar="R", help="CADA: size of the coefficients' context window, 0 for constant coefficients (default 3).", show_default=False)] = None,
    invariance: Annotated[Optional[str], typer.Option("--invariance", metavar="strict|relaxed|none", help="CADA: spatial invariance (default relaxed).", show_default=False)] = None,
    rel_pos: Annotated[Optional[bool], typer.Option("--rel-pos/--no-rel-pos", help="CADA: add a relative-position kernel per head (default off).", show_default=False)] = None,
    basis: Annotated[Optional[str], typer.Option("--basis", metavar="free|gabor", help="CADA: learned taps or Gabor functions as base kernels (default free).", show_default=False)] = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Turn chosen convolutions of a trained model into learnable Gabor banks (or CADA blocks) and save a recipe."""
    _threads(threads)
    from gaborprune._io import check_outputs, write_json
    from gaborprune.convert.spec import ConversionSpec
    from gaborprune.recipe import convert_model, is_recipe_path, save_recipe
    from gaborprune.summary import summarize

    options = {"first": layers, "targets": tuple(target or ()), "kernel_size": kernel_size, "init": init, "freeze": tuple(freeze or ()), "seed": seed,
               "to": to, "heads": heads, "bases": bases, "context": context, "invariance": invariance, "rel_pos": rel_pos, "basis": basis}
    spec = ConversionSpec(**{k: v for k, v in options.items() if v is not None})
    check_outputs([output, json_path], force)
    model, recipe = _load(source, num_classes, weights, model_arg, input_shape, seed, trust_factory)
    params_before = summarize(model, recipe.input_shape).params
    with err.status("fitting Gabor banks..." if spec.init == "fit" and spec.to == "gabor" else "converting..."):
        report = convert_model(model, recipe, spec)
    params_after = summarize(model, recipe.input_shape).params
    save_recipe(output, model, recipe, force=force)

    table = Table(title=f"{source} -> {output}")
    for col in ("layer", "kernel", "in -> out", "groups", "kernels", "fit error"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer in report.layers:
        kernel = "x".join(map(str, layer.kernel_size))
        if layer.kernel_size != layer.original_kernel_size:
            kernel = f"{'x'.join(map(str, layer.original_kernel_size))} -> {kernel}"
        error = ("random init" if spec.to == "gabor" else "CADA, random init") if layer.fit_rel_error is None else f"{layer.fit_rel_error:.3f}"
        table.add_row(layer.name, kernel, f"{layer.in_channels} -> {layer.out_channels}", str(layer.groups), str(layer.kernels), error)
    out.print(table)
    out.print(f"parameters: {_count(params_before)} -> {_count(params_after)}   (fit error = ||w - g|| / ||w|| over the layer)")
    if json_path:
        write_json(json_path, {
            "model": source,
            "output": str(output),
            "layers": [{
                "name": layer.name, "kernel_size": list(layer.kernel_size), "original_kernel_size": list(layer.original_kernel_size),
                "in_channels": layer.in_channels, "out_channels": layer.out_channels, "groups": layer.groups,
                "kernels": layer.kernels, "fit_rel_error": layer.fit_rel_error,
            } for layer in report.layers],
            "params_before": params_before,
            "params_after": params_after,
        }, force)
    if weights is None and not is_recipe_path(source) and any(layer.fit_rel_error is not None for layer in report.layers):
        # built-in, torchvision and factory sources start from seeded random weights; a recipe carries its own
        err.print(f"[yellow]warning:[/] {escape(source)} has no --weights, so its kernels are untrained (seeded random) and the Gabor fit "
                  "to them is meaningless; pass trained weights with --weights state_dict.pt, or convert a recipe that finetune trained", soft_wrap=True)


# -- inspect -------------------------------------------------------------------------------------
def _inspect_onnx(source: str, png, json_path, force: bool, model_options: dict) -> None:
    import json

    from gaborprune._io import write_json
    from gaborprune.export.inspect_onnx import check_onnx_options, describe_onnx

    check_onnx_options(source, **model_options)
    if png:
        raise GaborPruneError(f"--png draws a recipe's Gabor banks; '{source}' holds them baked into plain convolutions: inspect the recipe it was exported from")
    s = describe_onnx(source)
    table = Table(title=f"{source}: operators")
    for col in ("op", "nodes"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op, n in s.ops.items():
        table.add_row(op, str(n))
    out.print(table)
    out.print(f"ONNX opset {s.opset}, IR version {s.ir_version}, {s.precision}, {s.nodes} nodes, {s.file_bytes / 1024:.1f} KiB, producer: {s.producer or 'not recorded'}")
    for kind, values in (("input", s.inputs), ("output", s.outputs)):
        for v in values:
            out.print(f"{kind}: {v['name']} {v['shape']} {v['dtype']}")
    out.print(f"parameters: {_count(s.params)}   MACs: {_count(s.macs)} (executed: {_count(s.macs_executed)})   FLOPs: {_count(s.flops)}   (per image; FLOPs = 2 x MACs)")
    for key, value in s.metadata.items():
        if key == "gaborprune.kernels_kept" and isinstance(value, dict):  # {layer: [kept, kernels]}
            value = ", ".join(f"{layer} {k[0]}/{k[1]}" for layer, k in value.items()) if value else "no Gabor banks"
        elif key == "gaborprune.lowering" and isinstance(value, dict):  # {layer: form}: one entry per form
            forms: dict = {}
            for layer, form in value.items():
                forms.setdefault(form, []).append(layer)
            value = "; ".join(f"{form} {', '.join(names) if len(names) <= 3 else f'({len(names)} layers)'}" for form, names in forms.items())
        out.print(f"metadata {key}: {value if isinstance(value, str) else json.dumps(value)}")
    if json_path:
        write_json(json_path, {"model": source} | s.to_dict(), force)


@_command
def inspect(
    source: Source,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="Draw the Gabor banks (or the first conv) as a grid of kernels.", show_default=False)] = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Show every convolution (kernels total/alive, parameters) and the model's parameters, MACs and FLOPs; for an .onnx file, its operators, parameters, MACs, input, output and metadata."""
    _threads(threads)
    from gaborprune._io import check_outputs, write_json
    from gaborprune.export.inspect_onnx import is_onnx_path
    from gaborprune.plot import plot_recipe_banks
    from gaborprune.summary import summarize

    check_outputs([png, json_path], force)
    if is_onnx_path(source):
        return _inspect_onnx(source, png, json_path, force, {"--num-classes": num_classes, "--weights": weights, "--model-arg": model_arg, "--input-shape": input_shape})
    model, recipe = _load(source, num_classes, weights, model_arg, input_shape, trust_factory=trust_factory)
    summary = summarize(model, recipe.input_shape)

    table = Table(title=f"{source}  (input {'x'.join(map(str, summary.input_shape))})")
    for col in ("layer", "type", "kernel", "groups", "in -> out", "kernels", "alive", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for layer in summary.layers:
        style = "cyan" if layer.type == "gabor" else None
        table.add_row(
            layer.name, layer.type, "x".join(map(str, layer.kernel_size)), str(layer.groups),
            f"{layer.in_channels} -> {layer.out_channels}", str(layer.kernels), str(layer.kernels_alive),
            _count(layer.params), _count(layer.macs), style=style,
        )
    out.print(table)
    out.print(f"parameters: {_count(summary.params)}   MACs: {_count(summary.macs)}   FLOPs: {_count(summary.flops)}   (FLOPs = 2 x MACs; conv, CADA and linear layers, removed kernels skipped)")
    if png:
        drawn = plot_recipe_banks(model, recipe, png, force=force)
        out.print(f"drew {', '.join(drawn)} -> {png}")
    if json_path:
        write_json(json_path, {"model": source} | summary.to_dict(), force)


# -- finetune and eval ---------------------------------------------------------------------------
_TRAIN = TrainConfig()  # the library defaults, quoted in --help
DataOpt = Annotated[str, typer.Option("--data", metavar="SPEC", help="Dataset: digits, fake:N[:CLASSES], cifar10:DIR, cifar100:DIR or imagefolder:DIR (with train/ and val/).", show_default=False)]
Device = Annotated[Optional[str], typer.Option("--device", metavar="auto|cpu|cuda", help="auto: CUDA when available (default).", show_default=False)]


def _training_context(source, data, device, num_classes, weights, model_arg, input_shape, resize, seed=None, trust_factory=False):
    from gaborprune.data import DataSpec, load_data
    from gaborprune.train.distributed import setup

    spec = DataSpec.parse(data)
    dist, dev = setup(device or "auto")
    model, recipe = _load(source, num_classes, weights, model_arg, input_shape, seed, trust_factory)
    train, test = load_data(spec, recipe.input_shape, resize=resize)
    return dist, dev, model, recipe, str(spec), train, test


def _alive_text(r: dict) -> str:
    """'  alive: conv1 40  conv2 200  groups: conv1 out 12/16, conv2 in 9/16' from an epoch record."""
    alive = "  ".join(f"{n} {a}" for n, a in r["kernels_alive"].items())
    counts = r.get("groups_alive", {})
    if len(counts) > 4:  # --scope all: one family per layer side; the total says how the pressure goes
        groups = f"{sum(counts.values())}/{sum(r['groups_total'][label] for label in counts)} in {len(counts)} families"
    else:
        groups = ", ".join(f"{label} {a}/{r['groups_total'][label]}" for label, a in counts.items())
    return (f"  alive: {alive}" if alive else "") + (f"  groups: {groups}" if groups else "")


def _groups_report(result, structure: str) -> list[str]:
    """Which channel groups the run found (and pressed, with --structure channel), and why other bank sides have none."""
    found = ", ".join(f"{label} {n}" for label, n in result.groups_total.items()) or "none"
    if len(result.groups_total) > 4:
        found = f"{sum(result.groups_total.values())} in {len(result.groups_total)} families (the JSON lists them)"
    lines = [f"channel groups ({'pressed' if structure == 'channel' else 'counted only, --structure kernel'}): {found}"]
    lines += [f"  {label}: {note}" for label, note in result.groups_notes.items()]
    return lines + [f"  no group: {line}" for line in result.groups_missing]


def _train(model, recipe, train, test, config, dev, dist, data_name, checkpoints=None, resume=None):
    """Run the fine-tuning loop with a progress bar (on a terminal) and one line per epoch."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from gaborprune.train import finetune as run_finetune
    from gaborprune.train.interrupt import Terminated, sigterm_as_interrupt

    progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1f}%  {task.fields[ips]:.0f} img/s"),
                        TimeRemainingColumn(), console=err, transient=True, disable=not (dist.main and err.is_terminal))
    task = progress.add_task("train", total=1, epoch=0, loss=0.0, acc=0.0, ips=0.0)

    def on_step(s):
        progress.update(task, completed=s.step, total=s.steps, epoch=f"{s.epoch}/{config.epochs}", loss=s.loss, acc=s.accuracy, ips=s.images_per_second)

    def on_epoch(r):
        out.print(f"epoch {r['epoch']:>3}/{config.epochs}  loss {r['train_loss']:.4f}  train {r['train_accuracy']:5.1f}%  "
                  f"test {r['test_top1']:5.2f}%  {r['images_per_second']:.0f} img/s" + _alive_text(r))

    with progress, sigterm_as_interrupt():
        try:
            return run_finetune(model, recipe, train, test, config, device=dev, data_name=data_name, checkpoints=checkpoints,
                                resume=resume, dist=dist, on_step=on_step, on_epoch=on_epoch)
        except KeyboardInterrupt as e:
            hint = f"; continue with the same command plus --resume {checkpoints.last}" if checkpoints else ""
            raise GaborPruneError(f"{'stopped by SIGTERM' if isinstance(e, Terminated) else 'interrupted'}{hint}") from None


@_command
def finetune(
    source: Source,
    data: DataOpt,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Recipe to write; checkpoints go beside it (FILE.last.pt, FILE.best.pt, FILE.metrics.jsonl).", show_default=False)],
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="N", help=f"Epochs (default {_TRAIN.epochs}).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help=f"Global batch size (default {_TRAIN.batch_size}; split over torchrun processes).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Peak learning rate (default {_TRAIN.lr}), linear warm-up then cosine.", show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", metavar="sgd|adamw", help="sgd (momentum 0.9, Nesterov; default) or adamw.", show_default=False)] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help=f"SGD momentum (default {_TRAIN.momentum}).", show_default=False)] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (default on).", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help=f"On conv/linear weights and Gabor amplitudes, never on Gabor shape parameters (default {_TRAIN.weight_decay}).", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help=f"Linear warm-up length (default {_TRAIN.warmup_epochs}).", show_default=False)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help=f"Default {_TRAIN.label_smoothing}.", show_default=False)] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", metavar="STRENGTH", help="Gabor sparsity pressure: 0 off (default), 1e-3 gentle ... 1e-1 strong.", show_default=False)] = None,
    structure: Annotated[Optional[str], typer.Option("--structure", metavar="channel|kernel", help="What the pressure pushes to zero: channel (default): whole channel groups too, which is what runs faster; kernel: single kernels (the seed paper's).", show_default=False)] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", metavar="banks|all", help="Where channel groups are pressed: banks (default): the Gabor banks; all: every convolution too, plain ones by their BatchNorm gain.", show_default=False)] = None,
    latency_aware: Annotated[Optional[bool], typer.Option("--latency-aware/--no-latency-aware", help="Weigh each channel group by the ONNX Runtime time its removal saves, from a per-layer cost table measured before training (default off: by the MACs it saves).", show_default=False)] = None,
    recalibrate: Annotated[Optional[bool], typer.Option("--recalibrate/--no-recalibrate", help="Re-estimate BatchNorm statistics on the training split before each evaluation (default: on with --scope all and --sparsity > 0).", show_default=False)] = None,
    latency_batch: Annotated[Optional[int], typer.Option("--latency-batch", metavar="N", help=f"Batch size the --latency-aware cost table is measured at, 1 thread (default {_TRAIN.latency_batch}).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Seed for initial weights, data order and augmentation (default {_TRAIN.seed}).", show_default=False)] = None,
    device: Device = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (default on; bf16 where supported).", show_default=False)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Default: on for CUDA.", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (default off).", show_default=False)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic", help="Deterministic algorithms (default off).", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="FILE", help="Continue the run saved in FILE (an OUT.last.pt).", show_default=False)] = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", help="imagefolder: resize the shorter side to N before the centre crop, H to 8*H (default H*256/224).", show_default=False)] = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Fine-tune any model source (Gabor banks get the sparsity pressure); writes a recipe."""
    _threads(threads)
    from gaborprune._io import check_outputs, write_json
    from gaborprune.recipe import save_recipe
    from gaborprune.train import Checkpoints
    from gaborprune.train.distributed import teardown

    options = dict(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum, nesterov=nesterov,
                   weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, sparsity=sparsity,
                   structure=structure, scope=scope, latency_aware=latency_aware, latency_batch=latency_batch, recalibrate=recalibrate, seed=seed, amp=amp,
                   channels_last=channels_last, compile=compile, deterministic=deterministic)
    config = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    checkpoints = Checkpoints(output)
    if resume is not None and not resume.is_file():
        raise GaborPruneError(f"resume file '{resume}' not found")
    dist, dev, model, recipe, data_name, train, test = _training_context(source, data, device, num_classes, weights, model_arg, input_shape, resize, config.seed, trust_factory)
    if dist.main:
        # a resumed run overwrites its own checkpoints by design
        check_outputs([output, json_path] + ([] if resume else checkpoints.paths), force, reused=checkpoints.paths if resume else ())
    try:
        if dist.main:
            out.print(f"fine-tuning {source} on {data_name} ({len(train)} train / {len(test)} test images) on {dev}"
                      + (f" x {dist.world} processes" if dist.world > 1 else ""))
        result = _train(model, recipe, train, test, config, dev, dist, data_name, checkpoints, resume)
        if dist.main:
            save_recipe(output, model.cpu(), recipe, force=force)
            if result.kernels_total:
                out.print("\n".join(_groups_report(result, config.structure)))
            if result.cost_table:
                from gaborprune.export.costs import describe

                out.print(describe(result.cost_table), soft_wrap=True)  # one line, however many layers
            elif config.latency_aware:
                out.print(f"--latency-aware: no cost table measured ({'--sparsity is 0' if not config.sparsity else 'no channel groups'}); groups weigh {result.group_weights}")
            out.print(f"best {result.best_accuracy:.2f}%  final {result.final_accuracy:.2f}%  -> {output}  (checkpoints: {checkpoints.last}, {checkpoints.best})")
            if json_path:
                write_json(json_path, result.to_dict(), force)
    finally:
        teardown()


@_command
def eval(
    source: Source,
    data: DataOpt,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help="Default 256.", show_default=False)] = None,
    device: Device = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", help="imagefolder: resize before the centre crop.", show_default=False)] = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Top-1 / top-5 accuracy and loss on the test split of a dataset (an .onnx file: in ONNX Runtime)."""
    _threads(threads)
    from gaborprune._io import check_output, write_json
    from gaborprune.export.inspect_onnx import is_onnx_path
    from gaborprune.train import evaluate
    from gaborprune.train.loop import check_classes

    check_output(json_path, force)
    if is_onnx_path(source):
        return _eval_onnx(source, data, batch_size, device, resize, input_shape, json_path, force, threads,
                          {"--num-classes": num_classes, "--weights": weights, "--model-arg": model_arg})
    dist, dev, model, recipe, data_name, _, test = _training_context(source, data, device, num_classes, weights, model_arg, input_shape, resize, trust_factory=trust_factory)
    model.to(dev)
    check_classes(model, recipe, test.num_classes, data_name)
    result = evaluate(model, test.to(dev), dev, batch_size=256 if batch_size is None else batch_size)
    out.print(f"{source} on {data_name}: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  ({result.samples} test images, {dev})")
    if json_path:
        write_json(json_path, {"top1": result.top1, "top5": result.top5, "loss": result.loss, "samples": result.samples, "runtime": "pytorch"}, force)


def _eval_onnx(source: str, data: str, batch_size, device, resize, input_shape, json_path, force: bool, threads, model_options: dict) -> None:
    from gaborprune._io import write_json
    from gaborprune.data import DataSpec, load_data
    from gaborprune.export.inspect_onnx import check_onnx_options, evaluate_onnx, input_chw

    check_onnx_options(source, **model_options)
    spec = DataSpec.parse(data)
    _, test = load_data(spec, _shape(input_shape) or input_chw(source), resize=resize)
    result = evaluate_onnx(source, test, batch_size=batch_size, threads=threads, provider=device or "auto", data_name=str(spec))
    out.print(f"{source} on {spec}: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  "
              f"({result.samples} test images, onnxruntime {result.provider}, batch {result.batch_size})")
    if json_path:
        write_json(json_path, result.to_dict(), force)


# -- prune ---------------------------------------------------------------------------------------
def _budgets(items: list[str] | None, option: str, kind: type) -> tuple[float | int | None, dict]:
    """--ratio/--keep values: one global VALUE and/or NAME=VALUE per layer."""
    overall, per_layer = None, {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        try:
            number = kind(value)
        except ValueError:
            raise typer.BadParameter(f"'{item}' is not {'R' if kind is float else 'N'} or NAME={'R' if kind is float else 'N'}", param_hint=option) from None
        if sep:
            per_layer[name] = number
        elif overall is not None:
            raise typer.BadParameter(f"two global values ({overall} and {item}); give one, or NAME=VALUE per layer", param_hint=option)
        else:
            overall = number
    return overall, per_layer


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of thresholds (e.g. 0.01,0.05,0.1)", param_hint="--sweep")
    return values


def _prune_table(report, title: str) -> Table:
    table = Table(title=title)
    for col in ("layer", "type", "kernels", "removed", "out channels", "in channels"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")

    def change(a: int, b: int) -> str:
        return str(a) if a == b else f"{a} -> {b}"

    for c in report.layers:
        table.add_row(c.name, c.type, change(c.kernels_before, c.kernels_after), f"{c.removed:.0%}",
                      change(c.channels_before, c.channels_after), change(c.in_channels_before, c.in_channels_after),
                      style="cyan" if c.type == "gabor" else None)
    return table


def _print_prune(report, dry_run: bool) -> None:
    from itertools import groupby

    def change(label: str, a: int, b: int) -> str:
        return f"{label}: {_count(a)} -> {_count(b)} ({(b - a) / a:+.1%})" if a else f"{label}: 0"

    before, after = report.before, report.after
    out.print("   ".join([change("parameters", before.params, after.params), change("MACs", before.macs, after.macs),
                          change("FLOPs", before.flops, after.flops)]) + "   (FLOPs = 2 x MACs)")
    for (layer, side, reason), kept in groupby(report.kept, key=lambda k: (k.layer, k.side, k.reason)):
        what = "dead channels" if side == "out" else "the channels read by dead input columns"
        out.print(f"kept {what} of {layer} ({', '.join(str(k.channel) for k in kept)}), their kernels masked: {reason}")
    if dry_run:
        for name, sides in report.plan.channels.items():
            cut = "; ".join(f"{side} {', '.join(map(str, idx))}" for side, idx in sides.items() if idx)
            out.print(f"would remove from {name}: {cut}")
    out.print(f"compacted vs masked model, max |output difference|: {report.max_abs_diff:.2g}")
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


def _target_table(report, source: str) -> Table:
    """The timed candidates of `prune --speedup/--latency-ms`, predicted and measured side by side."""
    table = Table(title=f"{source}: pruning to {report.target.describe()} (ONNX Runtime, batch {report.batch_size}, "
                        f"{report.threads} thread{'s' if report.threads != 1 else ''}, {report.groups} channel groups)")
    for col in ("groups removed", "channels", "predicted ms", "predicted", "measured ms", "speedup", "target"):
        table.add_column(col, justify="left" if col == "channels" else "right")
    for c in report.candidates:
        channels = ", ".join(f"{name} {o}x{i}" for name, (o, i) in c.channels.items()) + (f" (x{report.block})" if c.aligned else "")
        m, s = c.measured, c.speedup
        table.add_row(str(c.k), channels, f"{c.predicted_ms:.3f}", f"{c.predicted_speedup:.2f}x",
                      f"{m.median:.3f} [{m.low:.3f}-{m.high:.3f}]", f"{s.median:.2f}x [{s.low:.2f}-{s.high:.2f}]",
                      ("met, chosen" if c.k == report.chosen else "met") if c.meets else "not met",
                      style="cyan" if c.k == report.chosen else None)
    if report.baseline is not None:
        b = report.baseline
        table.caption = f"unpruned: {b.median:.3f} ms [{b.low:.3f}-{b.high:.3f}]; channels: out x in of the layers that change; [95% intervals]"
    return table


@_command
def prune(
    source: Annotated[str, typer.Argument(help="A recipe .pt with Gabor banks (from convert or finetune), or any model source that has them.", metavar="RECIPE", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE", help="Recipe to write (the compacted model and its prune plan).", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="T", help="Remove kernels weaker than T x the strongest of their layer (default 0.05; BatchNorm-scale invariant).", show_default=False)] = None,
    ratio: Annotated[Optional[list[str]], typer.Option("--ratio", metavar="R|NAME=R", help="Remove this fraction of the kernels: R across all Gabor banks (weakest first), or NAME=R for one layer; repeatable.", show_default=False)] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", metavar="N|NAME=N", help="Keep this many kernels: N across all Gabor banks, or NAME=N for one layer; repeatable.", show_default=False)] = None,
    speedup: Annotated[Optional[float], typer.Option("--speedup", metavar="X", help="Remove the weakest channel groups until the pruned ONNX runs X times as fast as the unpruned one, measured with ONNX Runtime (batch 1, --threads or 1 thread).", show_default=False)] = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", metavar="T", help="Like --speedup, until a run takes at most T milliseconds.", show_default=False)] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", metavar="banks|all", help="banks (default): kernels of the Gabor banks; all: also whole channels of every convolution whose channel group is below --threshold (fine-tune with --scope all first).", show_default=False)] = None,
    round_to: Annotated[Optional[int], typer.Option("--round-to", metavar="N", help="With --scope all, keep a multiple of N channels in each layer (default: this CPU's ONNX Runtime channel block, 16 with AVX-512, 8 with AVX2; 1: any count).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed; write no recipe.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Evaluate top-1 accuracy before and after on this dataset (digits, fake:N, cifar10:DIR, ...).", show_default=False)] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option("--finetune-epochs", metavar="N", help="Recover accuracy with N epochs of fine-tuning, removed kernels staying removed (needs --data).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Recovery fine-tuning peak learning rate (default 0.01).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help=f"Recovery and evaluation batch size (default {_TRAIN.batch_size}).", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Recovery fine-tuning seed (default 0).", show_default=False)] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", metavar="T1,T2,...", help="Prune at each threshold, evaluate on --data, print and plot accuracy vs kernels kept; writes no recipe.", show_default=False)] = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="--sweep's plot (default prune-sweep.png).", show_default=False)] = None,
    device: Device = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", help="imagefolder: resize before the centre crop.", show_default=False)] = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Remove the dead kernels of the Gabor banks and cut the channels they leave empty or unread out of the network."""
    _threads(threads)
    from gaborprune._io import check_outputs, write_json
    from gaborprune.data import DataSpec, load_data
    from gaborprune.prune import PruneSpec, TargetSpec, prune_model, prune_to_target
    from gaborprune.recipe import save_recipe
    from gaborprune.train import evaluate
    from gaborprune.train.distributed import setup, teardown
    from gaborprune.train.loop import check_classes

    global_ratio, layer_ratio = _budgets(ratio, "--ratio", float)
    global_keep, layer_keep = _budgets(keep, "--keep", int)
    if round_to is not None and scope != "all":
        raise GaborPruneError("--round-to counts channels that --scope all removes; add --scope all or drop --round-to")
    if scope == "all" and round_to is None:
        from gaborprune.prune.structured import default_round_to

        round_to = default_round_to()
    options = dict(threshold=threshold, ratio=global_ratio, keep=global_keep, scope=scope, round_to=round_to)
    spec = PruneSpec(**{k: v for k, v in options.items() if v is not None}, layer_ratio=layer_ratio, layer_keep=layer_keep)
    thresholds = _thresholds(sweep) if sweep is not None else None
    target = None
    if speedup is not None or latency_ms is not None:
        given = [f for f, v in (("--threshold", threshold), ("--ratio", ratio), ("--keep", keep), ("--sweep", sweep)) if v is not None]
        if given or (speedup is not None and latency_ms is not None):
            first = "--speedup" if speedup is not None else "--latency-ms"
            raise GaborPruneError(f"{first} chooses the kernels itself; drop {given[0] if given else '--latency-ms'} (give one of --speedup, --latency-ms, or --threshold/--ratio/--keep)")
        target = TargetSpec(speedup, latency_ms)
        if scope == "all":
            raise GaborPruneError("--speedup and --latency-ms search the Gabor banks' channel groups; with --scope all prune by --threshold "
                                  "(--sweep T1,T2,... --data SPEC shows accuracy and MACs at each)")
    if thresholds is not None:
        bad = [t for t in thresholds if not 0 <= t < 1]
        if bad:
            raise GaborPruneError(f"--sweep threshold {bad[0]} is out of range; thresholds are fractions in [0, 1)")
        if output is not None:
            raise GaborPruneError("a sweep writes no recipe; drop -o, pick a threshold from its table, then prune with --threshold")
        png = png or Path("prune-sweep.png")
    elif output is None and not dry_run:
        raise GaborPruneError("say where to write the pruned recipe with -o FILE (or look first with --dry-run)")
    if (finetune_epochs is not None or sweep is not None) and data is None:
        raise GaborPruneError(f"{'--sweep' if sweep is not None else '--finetune-epochs'} needs --data SPEC to measure accuracy")
    if finetune_epochs is not None and finetune_epochs < 1:
        raise GaborPruneError(f"--finetune-epochs must be at least 1, not {finetune_epochs}")
    # channels cut all over the network leave BatchNorm statistics that recovery alone follows too slowly
    recovery = dict(epochs=finetune_epochs, lr=0.01 if lr is None else lr, batch_size=batch_size, seed=seed,
                    recalibrate=True if spec.scope == "all" else None)
    config = TrainConfig(**{k: v for k, v in recovery.items() if v is not None})
    check_outputs([json_path, png] + ([] if dry_run else [output]), force)

    data_spec = DataSpec.parse(data) if data is not None else None
    model, recipe = _load(source, None, None, None, input_shape, trust_factory=trust_factory)
    dist, dev = setup(device or "auto")
    try:
        if data_spec is not None:
            train, test = load_data(data_spec, recipe.input_shape, resize=resize)
            check_classes(model, recipe, test.num_classes, str(data_spec))
            test = test.to(dev)

        def accuracy(m) -> float:
            return evaluate(m.to(dev), test, dev, batch_size=config.batch_size).top1

        def recover(m, r) -> float:
            _train(m, r, train, test, config, dev, dist, str(data_spec))
            return accuracy(m)

        if thresholds is not None:
            _prune_sweep(model, recipe, thresholds, recover if finetune_epochs else lambda m, r: accuracy(m), accuracy(model), spec, png, json_path, source, force)
            return
        before = accuracy(model) if data_spec is not None else None
        if target is not None:
            with err.status(f"pruning to {target.describe()}: exporting and timing candidates with ONNX Runtime..."):
                reached = prune_to_target(model.to("cpu"), recipe, speedup=target.speedup, latency_ms=target.latency_ms,
                                          threads=threads if threads is not None else 1)
            out.print(_target_table(reached, source))
            for note in reached.notes:
                out.print(note)
            if reached.prune is None:
                raise GaborPruneError(reached.message + "; no recipe written")
            report = reached.prune
            what = f"{reached.chosen} weakest channel groups for {target.describe()}"
        else:
            with err.status("pruning..."):
                report = prune_model(model, recipe, spec)
            what = spec.describe([c.name for c in report.gabor_layers])
        title = f"{source} -> {'(dry run)' if dry_run else output}: {what}"
        out.print(_prune_table(report, title))
        _print_prune(report, dry_run)
        if data_spec is not None:
            report.accuracy_before = before
            report.accuracy_pruned = report.accuracy_after = accuracy(model)
            if finetune_epochs and not dry_run:
                out.print(f"recovering: {finetune_epochs} epoch(s) on {data_spec}, removed kernels stay removed")
                report.accuracy_after = recover(model, recipe)
            recovered = f"  after recovery {report.accuracy_after:.2f}%" if finetune_epochs and not dry_run else ""
            out.print(f"top-1 accuracy on {data_spec}: before {before:.2f}%  pruned {report.accuracy_pruned:.2f}%{recovered}")
        extra = {"target": reached.to_dict()} if target is not None else {}
        if not dry_run:
            recipe.metadata.setdefault("prunes", []).append(report.to_dict() | {"source": source} | extra)
            save_recipe(output, model.to("cpu"), recipe, force=force)
            out.print(f"-> {output}")
        if json_path:
            write_json(json_path, {"model": source, "output": None if dry_run else str(output)} | report.to_dict() | extra, force)
    finally:
        teardown()


def _prune_sweep(model, recipe, thresholds, accuracy, unpruned, spec, png, json_path, source, force) -> None:
    from gaborprune._io import write_json
    from gaborprune.plot import plot_sweep
    from gaborprune.prune import sweep
    from gaborprune.summary import summarize

    with err.status(f"pruning at {len(thresholds)} thresholds..."):
        points = sweep(model, recipe, thresholds, accuracy, spec)
    table = Table(title=f"{source}: accuracy vs kernels kept")
    for col in ("threshold", "kernels kept", "kept", "parameters", "MACs", "top-1"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(f"{p.threshold:g}", f"{p.kernels_kept}/{p.kernels_total}", f"{p.kernels_kept / p.kernels_total:.1%}" if p.kernels_total else "-",
                      _count(p.params), _count(p.macs), f"{p.accuracy:.2f}%")
    out.print(table)
    plot_sweep(points, png, unpruned_accuracy=unpruned, unpruned_macs=summarize(model.cpu(), recipe.input_shape).macs, title=source, force=force)
    out.print(f"plot -> {png}")
    if json_path:
        from dataclasses import asdict

        write_json(json_path, {"model": source, "points": [asdict(p) for p in points]}, force)


# -- export --------------------------------------------------------------------------------------
@_command
def export(
    source: Annotated[str, typer.Argument(help="A recipe .pt (or any model source) to export.", metavar="RECIPE", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="ONNX file to write.", show_default=False)],
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="N,C,H,W", help="Static input shape, e.g. 1,3,32,32 (default: batch 1 and the model's C,H,W).", show_default=False)] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Let the batch dimension vary (default: static, for embedded runtimes).")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, 18 to 23 (default: the exporter's).", show_default=False)] = None,
    lowering: Annotated[Optional[str], typer.Option("--lowering", metavar="auto|dense|sparse", help="auto (default) times the plain dense export against cut, padded and split forms in ONNX Runtime and keeps another only when faster beyond the noise; dense: the plain dense export; sparse: cut and split, unmeasured.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads of torch and of the ONNX Runtime sessions that measure and check (default: one per core).", show_default=False)] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Largest accepted |onnxruntime - PyTorch| (default 1e-4); beyond it nothing is written.", show_default=False)] = None,
    pad_channels: Annotated[Optional[int], typer.Option("--pad-channels", metavar="N", help="Grow channel counts pruning left off a multiple of N with zero channels, where exact: 0 (off) or a power of two from 2 to 64 (default: auto also times padding to this CPU's block, 16 with AVX-512, 8 with AVX2, and keeps it only when faster).", show_default=False)] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", metavar="int8", help="Write an int8 model: static (calibrated on --data) or, without --data, dynamic.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Real images for the checks, int8 calibration and ONNX accuracy.", show_default=False)] = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
) -> None:
    """Write a compact ONNX model for inference: plain ops, BatchNorm folded, checked against PyTorch."""
    _threads(threads)
    from gaborprune._io import check_outputs, write_json
    from gaborprune.export.api import ExportConfig, export_model

    shape = _shape(input_shape, "N,C,H,W", "1,3,32,32")
    if quantize not in (None, "int8"):
        raise GaborPruneError(f"unknown --quantize '{quantize}'; known: int8")
    options = dict(batch_size=shape[0] if shape else None, dynamic_batch=dynamic_batch, opset=opset, lowering=lowering, atol=atol,
                   threads=threads, pad_channels=pad_channels)
    config = ExportConfig(**{k: v for k, v in options.items() if v is not None}, quantize=quantize == "int8")
    check_outputs([output, json_path], force)
    model, recipe = _load(source, None, None, None, ",".join(map(str, shape[1:])) if shape else None, trust_factory=trust_factory)
    pair = None
    if data is not None:
        from gaborprune.data import DataSpec, load_data
        from gaborprune.train.loop import check_classes

        train, test = load_data(DataSpec.parse(data), recipe.input_shape)
        check_classes(model, recipe, test.num_classes, data)
        pair = (train, test)
    with err.status("lowering, exporting and checking..." + (" (timing the candidate forms)" if config.lowering == "auto" else "")):
        report = export_model(model, recipe, output, config, data=pair, force=force)

    table = Table(title=f"{source} -> {output}: kernel-sparse layers")
    for col in ("layer", "kernels", "lowering", "dense ms", "split ms"):
        table.add_column(col, justify="left" if col in ("layer", "lowering") else "right")
    for name, (kernels, dense) in report.sparse_kernels.items():
        times = report.lowering_ms.get(name, {})
        ms = [f"{times[f]:.3f}" if f in times else "" for f in ("dense", "split")]
        table.add_row(name, f"{kernels}/{dense}", report.lowering[name], *ms)
    if table.row_count:
        out.print(table)
    for c in report.candidates if len(report.candidates) > 1 else []:
        timing = f"{c['median_ms']:.3f} ms [{c['low_ms']:.3f}-{c['high_ms']:.3f}]" if "median_ms" in c else ""
        ratio = f"  time ratio {c['ratio']['median']:.3f} [{c['ratio']['low']:.3f}-{c['ratio']['high']:.3f}]" if c["ratio"] else "  (baseline)"
        out.print(f"  {'kept' if c['kept'] else '    '}  {c['form']}: {timing}{ratio}  {_count(c['params'])} params")
    out.print(f"lowering: {report.lowering_note}")
    for line in report.skipped:
        out.print(f"skipped: {line}")
    if report.channels_cut:
        maps = f"; bias maps added to {', '.join(report.bias_maps)}" if report.bias_maps else ""
        out.print(f"cut at export (constant channels{maps}): " + "; ".join(
            f"{m} {side} {len(idx)}" for m, sides in report.channels_cut.items() for side, idx in sides.items()))
    if report.padded:
        out.print(f"grown with zero channels to a multiple of {report.pad}: {', '.join(report.padded)}")
    out.print(f"parameters: {_count(report.params)}   MACs: {_count(report.macs)} (executed: {_count(report.macs_executed)})   FLOPs: {_count(report.flops)}")
    out.print(f"onnxruntime vs PyTorch: max |diff| {report.max_abs_diff:.2g}, cosine {report.cosine:.6f}   opset {report.opset}   input {report.inputs[0]['shape']}")
    if report.quantization:
        q = report.quantization
        out.print(f"int8 ({q['mode']}): max |diff| vs PyTorch {q['max_abs_diff']:.3g}, cosine {q['cosine']:.5f} on {q['compared_on']}")
    if report.accuracy:
        out.print("top-1 on " + data + ": " + "  ".join(f"{k} {v:.2f}%" for k, v in report.accuracy.items()))
    out.print(f"-> {output} ({report.file_bytes / 1024:.1f} KiB)")
    if report.note:
        out.print(f"note: {report.note}")  # `out` prints verbatim (no markup)
    if json_path:
        write_json(json_path, {"model": source} | report.to_dict(), force)


# -- bench ---------------------------------------------------------------------------------------
def _ints(text: str | None, option: str, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of positive integers", param_hint=option)
    return values


def _bench_model(spec: str, workdir: Path, batch: int, threads: int, trust_factory: bool = False):
    """An ONNX file as is; a recipe or model source exported on the fly (dynamic batch, auto lowering)."""
    from gaborprune.export.api import ExportConfig, export_model
    from gaborprune.export.bench import load_onnx

    if spec.endswith(".onnx"):
        return load_onnx(spec)
    model, recipe = _load(spec, None, None, None, None, trust_factory=trust_factory)
    path = workdir / f"{len(list(workdir.iterdir()))}.onnx"
    with err.status(f"exporting {spec}..."):
        export_model(model, recipe, path, ExportConfig(batch_size=batch, dynamic_batch=True, threads=threads))
    m = load_onnx(path, name=spec)
    m.torch_model = model.eval()
    return m


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def _bench_rows(report) -> tuple[list[list[str]], list[list[str]]]:
    """The cells of the results and comparisons tables, shared by the terminal and Markdown reports."""
    results = []
    for r in report.results:
        d = r.to_dict()
        results.append([d["model"], d["runtime"], d["precision"], str(d["batch_size"]), str(d["threads"]), f"{d['p50_ms']:.3f}",
                        _ci(d["p50_low_ms"], d["p50_high_ms"]), f"{d['p90_ms']:.3f}", f"{d['p90_over_p50']:.2f}",
                        f"{d['runs']} in {d['rounds']}", f"{d['throughput']:.1f}", d["note"] or "ok"])
    comparisons = []
    for c in report.comparisons:
        speedup = "-" if c.speedup is None else f"{c.speedup:.3f}x"
        if c.efficiency is not None:
            eff = f"{c.efficiency:.2f}"
        else:
            eff = "n/a (" + (c.note if c.stable else c.verdict) + ")"
        verdict = f"{c.verdict} ({c.note})" if c.note and not c.stable else c.verdict
        comparisons.append([c.model, c.baseline, str(c.batch_size), str(c.threads), speedup, _ci(c.speedup_low, c.speedup_high),
                            f"{c.mac_ratio:.3f}", eff, verdict])
    return results, comparisons


RESULT_COLUMNS = ("model", "runtime", "precision", "batch", "threads", "median ms", "95% CI ms", "p90 ms", "p90/p50", "runs in rounds", "images/s", "note")
COMPARISON_COLUMNS = ("model", "baseline", "batch", "threads", "speedup", "95% CI", "executed MAC ratio", "efficiency", "verdict")


def _share_line(model: str, share: dict, baselines: set[str]) -> str:
    who = f"baseline {model}" if model in baselines else model
    if share["share"] is None:
        return f"{who}: none of the converted layers shows in the profile"
    bound = f"at most {share['bound']:.2f}x" if share["bound"] is not None else "no bound (all its time)"
    return (f"{who}: {share['share']:.0%} of the time in the converted layers ({', '.join(share['layers'])}: {share['ms']:.3f} of "
            f"{share['total_ms']:.3f} ms); removing them entirely would give {bound}")


def _baseline_names(report) -> set[str]:
    return {c.baseline for c in report.comparisons}


def _bench_markdown(report, title: str) -> str:
    from gaborprune.export.bench import load_note

    env, s = report.environment, report.settings
    lines = [f"# {title}", "", f"{env['date']}; {env['cpu']}, {env['cores']} cores{load_note(env)}; onnxruntime {env['onnxruntime']}, "
             f"torch {env['torch']}, provider {env['provider']}, inter-op threads 1. Rounds of {s['runs_per_round']} interleaved runs "
             f"until each median's 95% interval is within +-{s['precision'] / 2:.1%} or {s['max_seconds']:g} s are spent.", ""]
    lines += [f"**Warning:** {w}" for w in report.warnings] + ([""] if report.warnings else [])
    results, comparisons = _bench_rows(report)
    lines += ["| " + " | ".join(RESULT_COLUMNS) + " |", "|---|---|---|" + "---:|" * 8 + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in results]
    if comparisons:
        lines += ["", "Speedup: the median over interleaved runs of t_base / t, with its 95% interval; efficiency = "
                  "(1 - t/t_base) / (1 - MACs/MACs_base) on executed MACs, given only for a speedup beyond the noise.", "",
                  "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|---|---|" + "---:|" * 6 + "---|"]
        lines += ["| " + " | ".join(row) + " |" for row in comparisons]
    for model, layers in report.profiles.items():
        lines += ["", f"Per-layer time of {model} (ms per run, top 15):", "", "| layer | ms |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(layers.items(), key=lambda kv: -kv[1])[:15]]
        if model in report.converted:
            lines += ["", _share_line(model, report.converted[model], _baseline_names(report)) + "."]
    return "\n".join(lines) + "\n"


@_command
def bench(
    models: Annotated[list[str], typer.Argument(help="ONNX files (float or int8), or recipes / model sources (exported on the fly).", metavar="MODEL...", show_default=False)],
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", metavar="MODEL", help="Reference timed in the same runs (speedup, executed-MAC ratio, efficiency); repeat to give a float and an int8 one: each model is compared with its own precision's.", show_default=False)] = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", metavar="B1,B2,...", help="Batch sizes (default 1).", show_default=False)] = None,
    threads: Annotated[Optional[str], typer.Option("--threads", metavar="T1,T2,...", help="Intra-op thread counts, each 1 to the cores available (default 1).", show_default=False)] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per model and configuration.")] = 10,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model in one round; rounds repeat until --precision or --max-seconds.")] = 100,
    precision: Annotated[Optional[float], typer.Option("--precision", metavar="R", help="Stop when every median's 95% interval is narrower than R times the median (default 0.02: +-1%).", show_default=False)] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", metavar="S", help="Timing budget, all configurations together (default 60).", show_default=False)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also time an int8 copy of every float model and baseline (static on --data, else dynamic), against the int8 baseline.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Images to calibrate --int8 on (static quantisation).", show_default=False)] = None,
    provider: Annotated[str, typer.Option("--provider", metavar="cpu|cuda", help="ONNX Runtime execution provider.")] = "cpu",
    profile: Annotated[bool, typer.Option("--profile", help="Per-layer time from ONNX Runtime's profiler (first configuration), and the share spent in the converted layers.")] = False,
    torch_eager: Annotated[bool, typer.Option("--torch", help="Also time PyTorch eager (models given as recipes / sources).")] = False,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="FILE", help="Write a Markdown report.", show_default=False)] = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="Plot median latency per configuration (bars: p25-p75 of the runs), with the speedups.", show_default=False)] = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
) -> None:
    """Latency of ONNX models in ONNX Runtime (medians with 95% intervals), side by side with a baseline of the same precision."""
    import tempfile

    from gaborprune._io import check_outputs, write_json, write_text
    from gaborprune._validate import check_threads
    from gaborprune.export.bench import MAX_SECONDS, PRECISION, check_timing, load_note
    from gaborprune.export.bench import bench as run_bench
    from gaborprune.export.runtime import providers
    from gaborprune.plot import plot_latency

    batches, thread_counts = _ints(batch_size, "--batch-size", (1,)), _ints(threads, "--threads", (1,))
    for t in thread_counts:  # before exporting anything
        check_threads(t)
    if warmup < 0 or runs < 1:
        raise GaborPruneError(f"--runs must be at least 1 and --warmup at least 0, not {runs} and {warmup}")
    check_timing(PRECISION if precision is None else precision, MAX_SECONDS if max_seconds is None else max_seconds)
    if data is not None and not int8:
        raise GaborPruneError(f"--data {data} calibrates --int8; add --int8, or leave out --data")
    if data is not None:
        from gaborprune.data import DataSpec, load_data

        spec = DataSpec.parse(data)  # before exporting anything
    providers(provider)
    check_outputs([json_path, markdown, png], force)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [_bench_model(m, Path(tmp), batches[0], thread_counts[0], trust_factory) for m in models]
        bases = [_bench_model(b, Path(tmp), batches[0], thread_counts[0], trust_factory) for b in baseline or []]
        calibration = None
        if data is not None:
            from gaborprune.export.quantize import calibration_batches

            train, _ = load_data(spec, loaded[0].chw)
            calibration = calibration_batches(train, next((m.fixed_batch for m in loaded + bases if m.fixed_batch), 32))
        timing = {k: v for k, v in (("precision", precision), ("max_seconds", max_seconds)) if v is not None}
        with err.status(f"timing {len(loaded) + len(bases)} model(s){' and their int8 copies' if int8 else ''} x "
                        f"{len(batches) * len(thread_counts)} configuration(s), in rounds until the medians are tight..."):
            report = run_bench(loaded, baseline=bases or None, batch_sizes=batches, threads=thread_counts, warmup=warmup, runs=runs,
                               provider=provider, profile_layers=profile, torch_eager=torch_eager, int8=int8, calibration=calibration, **timing)

    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    env, s = report.environment, report.settings
    results, comparisons = _bench_rows(report)
    table = Table(title=f"latency: {env['cpu']}, {env['cores']} cores{load_note(env)}, onnxruntime {env['onnxruntime']} ({provider}); "
                        f"medians with 95% intervals, rounds of {s['runs_per_round']} runs until +-{s['precision'] / 2:.1%} or {s['max_seconds']:g} s")
    for col in RESULT_COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "runtime", "precision", "note") else "right")
    for row in results:
        table.add_row(*row)
    out.print(table)
    if comparisons:
        comp = Table(title="against the baseline of the same precision: speedup = median of t_base/t over interleaved runs; "
                           "efficiency = (1 - t/t_base) / (1 - MACs/MACs_base) on executed MACs")
        for col in COMPARISON_COLUMNS:
            comp.add_column(col, justify="left" if col in ("model", "baseline", "efficiency", "verdict") else "right")
        for row in comparisons:
            comp.add_row(*row)
        out.print(comp)
    for model, layers in report.profiles.items():
        prof = Table(title=f"where the time goes: {model} (batch {batches[0]}, {thread_counts[0]} thread(s))")
        prof.add_column("layer")
        prof.add_column("ms per run", justify="right")
        prof.add_column("share", justify="right")
        total = sum(layers.values()) or 1.0
        for name, ms in sorted(layers.items(), key=lambda kv: -kv[1])[:15]:
            prof.add_row(name, f"{ms:.3f}", f"{ms / total:.0%}")
        out.print(prof)
        if model in report.converted:
            out.print(_share_line(model, report.converted[model], _baseline_names(report)))
    if json_path:
        write_json(json_path, report.to_dict(), force)
    if markdown:
        text = _bench_markdown(report, "gaborprune bench")
        write_text(markdown, text, force)
    if png:
        plot_latency(report, png, force=force)


# -- demo ----------------------------------------------------------------------------------------
def _brief_epoch(r: dict) -> None:
    """One indented line per epoch for the multi-stage commands (demo, reproduce)."""
    out.print(f"    epoch {r['epoch']:>3}  loss {r['train_loss']:.4f}  test {r['test_top1']:5.2f}%" + _alive_text(r))

@_command
def demo(
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where the recipes, ONNX files, PNGs and report go.")] = Path("demo-out"),
    device: Device = None,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """The whole pipeline on the bundled digits, offline: train, convert, fine-tune with sparsity, prune, export, bench."""
    _threads(threads)
    import time

    from gaborprune.demo import FILES, DemoConfig, file_figures, run_demo
    from gaborprune.train.distributed import resolve_device

    config = DemoConfig()
    taken = [n for n in FILES if (out_dir / n).exists()]
    if taken and not force:
        raise GaborPruneError(f"'{out_dir}' already holds a demo ({taken[0]}, ...); pass --force to overwrite it or choose --out")
    dev = resolve_device(device or "auto")
    t0 = time.perf_counter()

    report = run_demo(out_dir, config, device=dev, on_stage=lambda s: out.print(f"[{time.perf_counter() - t0:5.0f} s] {s}"),
                      on_epoch=_brief_epoch, force=force)

    table = Table(title=f"gaborprune demo: {config.model} on {config.data} ({time.perf_counter() - t0:.0f} s on {dev})")
    for col in ("stage", "top-1", "parameters", "MACs"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for st in report.stages:
        table.add_row(st.name, f"{st.accuracy:.2f}%", _count(st.params), _count(st.macs))
    out.print(table)
    out.print("kernels kept: " + "  ".join(f"{n} {k}/{t}" for n, (k, t) in report.kernels.items()) + f"   ({report.removed:.0%} removed)")
    for name, e in report.onnx.items():
        top1, diff = file_figures(e)
        out.print(f"{name + '.onnx':19s} {e['file_bytes'] / 1024:7.0f} KiB   {_count(e['params'])} parameters   {_count(e['macs_executed'])} MACs executed   "
                  f"top-1 {top1:.2f}%   max |diff| vs PyTorch {diff:.1e}")
    for c in report.latency["comparisons"]:
        eff = f", efficiency {c['efficiency']:.2f}" if c["efficiency"] is not None else ""
        out.print(f"pruned vs unpruned, {c['precision']:5s} batch {c['batch_size']:>2}: speedup {c['speedup']:.3f}x "
                  f"[{c['speedup_low']:.3f}, {c['speedup_high']:.3f}] {c['verdict']}, executed-MAC ratio {c['mac_ratio']:.3f}{eff}")
    if report.note:
        out.print(f"note: {report.note}")
    out.print(f"report: {out_dir / 'report.md'}  (and report.json, banks-*.png, latency.png, summary.png)")


# -- reproduce -----------------------------------------------------------------------------------
@_command
def reproduce(
    experiment: Annotated[str, typer.Argument(help="vgg16-cifar10, resnet20-altered-cifar10 (Gabor paper) or cada-ablation (CADA paper).", metavar="EXPERIMENT", show_default=False)],
    data: DataOpt,
    seeds: Annotated[int, typer.Option("--seeds", metavar="K", help="Seeds 0..K-1; mean and std over them.")] = 1,
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="N", help="Override the recipe's epochs (toy runs).", show_default=False)] = None,
    settings: Annotated[Optional[str], typer.Option("--settings", metavar="A,B,...", help="cada-ablation: run only these settings (default all).", show_default=False)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="cada-ablation: image size (default 3,16,16 for digits and fake, else 3,32,32).", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where recipes and results.md / results.json go.")] = Path("reproduce-out"),
    device: Device = None,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Run one of the seed papers' experiments: Gabor (plain vs Gabor network, kernels kept) or the CADA ablation."""
    _threads(threads)
    from gaborprune.reproduce import EXPERIMENTS, reproduce as run_reproduce
    from gaborprune.train.distributed import resolve_device

    ablation = experiment == "cada-ablation"
    if experiment not in EXPERIMENTS and not ablation:
        raise GaborPruneError(f"unknown experiment '{experiment}'; known: {', '.join(EXPERIMENTS)}, cada-ablation")
    if not ablation and (settings or input_shape):
        raise GaborPruneError(f"--{'settings' if settings else 'input-shape'} applies to cada-ablation only, not to '{experiment}'")
    for name in ("results.md", "results.json"):
        if (out_dir / name).exists() and not force:
            raise GaborPruneError(f"'{out_dir / name}' exists; pass --force to overwrite it or choose --out")
    dev = resolve_device(device or "auto")

    if ablation:
        from gaborprune.ablation import run_ablation

        shape = _shape(input_shape, "C,H,W", "3,16,16")
        names = [s.strip() for s in settings.split(",") if s.strip()] if settings else None
        report = run_ablation(data, seeds=seeds, settings=names, epochs=epochs, input_shape=shape, out=out_dir, device=dev,
                              on_stage=lambda s: out.print(s), on_epoch=_brief_epoch, force=force)
    else:
        report = run_reproduce(experiment, data, seeds=seeds, epochs=epochs, out=out_dir, device=dev,
                               on_stage=lambda s: out.print(s), on_epoch=_brief_epoch, force=force)
    out.print(report.markdown())
    out.print(f"-> {out_dir / 'results.md'}, {out_dir / 'results.json'}")


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("gaborprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from gaborprune import __version__ as number
    out.print(f"gaborprune {number}")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version, help="Print gaborprune's version and exit.")] = False,
) -> None:
    pass  # no docstring: the app's help stays the --help text


def main() -> None:
    """Console-script entry point."""
    app()
