"""The command line: parse the options, call one workflow of `gaborprune.workflows`, render what it returns.

Every default is the library's: an option left out is not passed on (`given`), and the help texts
quote the library's values. The only module that imports typer.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gaborprune import workflows
from gaborprune._flags import COMMANDS, cli_message
from gaborprune.errors import GaborPruneError
from gaborprune.train.config import TrainConfig
from gaborprune.workflows import given

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Compress CNNs: convert early convolutions to learnable Gabor banks, fine-tune with sparsity, "
    "prune the zeroed kernels, export compact ONNX, and benchmark it.",
)
# Control characters, line and paragraph separators, bidirectional overrides and isolates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _plain(text: str) -> str:
    """`text` with its control characters written as escapes (`\\x1b`, `\\n`, `\\r`, `\\u202e`): a name,
    path, spec or metadata value from a file or an argument cannot move the cursor, recolour or clear
    the terminal, set its title, or start a line of its own (a forged `error:` line)."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return _CONTROL.sub(lambda m: named.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}"), text)


class _PlainConsole(Console):
    """A Console that renders every string (printed lines, table cells, titles, captions) as
    `_plain` text: one line each; print multi-line text line by line."""

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(_plain(text), **kwargs)


# Piped output is not cut to 80 columns: tables of layer names would wrap into noise.
# Names, paths and dataset specs are printed verbatim: no markup, no emoji codes (fake:100:4 has one);
# `err` has markup for its red and yellow labels, so what follows them goes through `escape`.
out = _PlainConsole(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)
err = _PlainConsole(stderr=True, highlight=False, emoji=False)
_TRAIN = TrainConfig()  # the library defaults, quoted in --help

# -- shared options ------------------------------------------------------------------------------
Source = Annotated[str, typer.Argument(help="Model: resnet20|resnet32|resnet56|resnet20_altered|vgg11|vgg13|vgg16|vgg19|cada_net, torchvision:NAME, "
                                            "package.module:factory, or a recipe .pt file.", metavar="SOURCE", show_default=False)]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier outputs (default: the model's own).", show_default=False)]
Weights = Annotated[Optional[str], typer.Option("--weights", metavar="FILE", help="Local state_dict file to load (nothing is downloaded).", show_default=False)]
ModelArg = Annotated[Optional[list[str]], typer.Option("--model-arg", metavar="KEY=VALUE", help="Builder keyword argument KEY=VALUE, repeatable "
                                                                                                "(e.g. k1=9 for resnet20_altered).", show_default=False)]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="Model input C,H,W (default: from the model source).",
                                                   show_default=False)]
JsonOut = Annotated[Optional[Path], typer.Option("--json", metavar="PATH", help="Also write a machine-readable report here.", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
TrustFactory = Annotated[bool, typer.Option("--trust-factory", help="Let a recipe file import and call the package.module:factory it names as its model source "
                                                                    "(that runs code from the file's author; only for files you trust).")]
Threads = Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads torch computes with (default: one per core; "
                                                                               "on a busy machine 1 is often several times faster).", show_default=False)]


Device = Annotated[Optional[str], typer.Option("--device", metavar="auto|cpu|cuda", help=f"auto: CUDA when available (default {workflows.DEVICE}).",
                                               show_default=False)]
DataOpt = Annotated[str, typer.Option("--data", metavar="SPEC", help="Dataset: digits, fake:N[:CLASSES], cifar10:DIR, "
                                                                     "cifar100:DIR or imagefolder:DIR (with train/ and val/).", show_default=False)]


#: The command that runs: the library's texts it shows name its flags (`_say`).
_running = ""


def _command(fn):
    """Register a command whose GaborPruneErrors become one red line (library names shown as the command's flags)
    and exit code 1."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _running
        _running = name
        try:
            return fn(*args, **kwargs)
        except GaborPruneError as e:
            err.print(f"[bold red]error:[/] {escape(cli_message(str(e), name))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except typer.BadParameter as e:  # click prints it as is: the value quoted in it is the user's
            e.message = _plain(e.message)
            raise

    return app.command(name)(wrapper)


def _say(text: str) -> str:
    """A library text (a warning, a note, a report) as the running command shows it: arguments as its flags."""
    return cli_message(text, _running) if _running else text


# -- parsing ---------------------------------------------------------------------------------------
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


def _source(source: str, num_classes=None, weights=None, model_arg=None, input_shape=None, trust_factory: bool = False) -> workflows.Source:
    """The model source with its loading options (those not given left to the source)."""
    return workflows.Source(source, weights, num_classes, _model_args(model_arg) or {}, _shape(input_shape), trust_factory)


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise typer.BadParameter(f"'{text}' is not a comma-separated list of positive integers", param_hint=option)
    return values


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


def _prune_rule(threshold, ratio, keep, scope, round_to, importance, speedup, latency_ms, macs, max_drop, sweep, module=None):
    """(PruneSpec or None, TargetSpec or None) from prune's options. A spec refuses its own fields that do not combine
    (`round_to` without `scope` all, ...) and `workflows.prune` specs that do not; refused here is only what the command
    line alone sees: a kernel rule or --sweep given with a target (the library cannot tell --threshold 0.02 from its default)."""
    from gaborprune.prune import PruneSpec
    from gaborprune.search import TargetSpec

    targets = [f for f, v in (("--speedup", speedup), ("--latency-ms", latency_ms), ("--macs", macs), ("--max-drop", max_drop)) if v is not None]
    if not targets:
        (global_ratio, layer_ratio), (global_keep, layer_keep) = _budgets(ratio, "--ratio", float), _budgets(keep, "--keep", int)
        options = given(threshold=threshold, ratio=global_ratio, keep=global_keep, scope=scope, round_to=round_to, importance=importance, module=module)
        return PruneSpec(**options, layer_ratio=layer_ratio, layer_keep=layer_keep), None
    chosen = [f for f, v in (("--threshold", threshold), ("--ratio", ratio), ("--keep", keep), ("--sweep", sweep)) if v is not None]
    floors = [t for t in targets if t != "--max-drop"]
    if chosen or len(floors) > 1:
        raise GaborPruneError(f"{targets[0]} chooses the kernels itself; drop {chosen[0] if chosen else floors[1]} "
                              "(give one of --speedup, --latency-ms, --macs, and/or --max-drop, or --threshold/--ratio/--keep)")
    scoped = (PruneSpec(**given(scope=scope, round_to=round_to, importance=importance, module=module))
              if scope not in (None, "banks") or round_to is not None or importance is not None or module is not None else None)
    return scoped, TargetSpec(speedup, latency_ms, macs, max_drop)


# -- rendering -------------------------------------------------------------------------------------
def _threads(threads: int | None) -> int:
    """Set torch's threads before any work; warn in one line when the machine cannot give them."""
    from gaborprune._threads import busy_warning, set_threads

    used = set_threads(threads)
    warning = busy_warning(used)
    if warning:
        _warn(warning)
    return used


def _said(rows: list[list[str]]) -> list[list[str]]:
    """Table rows of a library report (notes among them) as `_say` shows them."""
    return [[_say(cell) for cell in row] for row in rows]


def _warn(text: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(_say(text))}", soft_wrap=True)


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _json(path: Path | None, run, force: bool) -> None:
    """The --json report: the run's `to_dict()`."""
    if path:
        from gaborprune._io import write_json

        write_json(path, run.to_dict(), force)


def _table(title: str, columns: tuple[str, ...], left: tuple[str, ...], rows, styles=()) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    for row, style in zip(rows, [*styles] + [None] * (len(rows) - len(styles))):
        table.add_row(*row, style=style)
    return table


class _Feedback:
    """What a library call shows while it runs, on a terminal's stderr only: a spinner with the stage
    it is at (`stage`), or the training bar (`step`) of its epochs; Rich allows one live display at a time."""

    def __init__(self, epochs: int | None = None) -> None:
        self.epochs, self.live, self.task = epochs, None, None

    def __enter__(self) -> _Feedback:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def stage(self, text: str) -> None:
        if err.is_terminal:
            self._stop()
            self.live = err.status(Text(_plain(text)))  # a str would be read as markup
            self.live.start()

    def step(self, s) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        if not err.is_terminal:
            return
        if not isinstance(self.live, Progress):
            self._stop()
            self.live = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.1f}%  {task.fields[ips]:.0f} img/s"),
                                 TimeRemainingColumn(), console=err, transient=True)
            self.task = self.live.add_task("train", total=1, epoch=0, loss=0.0, acc=0.0, ips=0.0)
            self.live.start()
        self.live.update(self.task, completed=s.step, total=s.steps, epoch=f"{s.epoch}/{self.epochs}", loss=s.loss, acc=s.accuracy,
                         ips=s.images_per_second)


def _alive_text(r: dict) -> str:
    """'  alive: conv1 40  conv2 200  groups: conv1 out 12/16, conv2 in 9/16' from an epoch record."""
    alive = "  ".join(f"{n} {a}" for n, a in r["kernels_alive"].items())
    counts = r.get("groups_alive", {})
    if len(counts) > 4:  # --scope all: one family per layer side; the total says how the pressure goes
        groups = f"{sum(counts.values())}/{sum(r['groups_total'][label] for label in counts)} in {len(counts)} families"
    else:
        groups = ", ".join(f"{label} {a}/{r['groups_total'][label]}" for label, a in counts.items())
    return (f"  alive: {alive}" if alive else "") + (f"  groups: {groups}" if groups else "")


def _epoch_line(epochs: int):
    """The finetune (and recovery) epoch line, for `on_epoch`."""

    def on_epoch(r: dict) -> None:
        out.print(f"epoch {r['epoch']:>3}/{epochs}  loss {r['train_loss']:.4f}  train {r['train_accuracy']:5.1f}%  "
                  f"test {r['test_top1']:5.2f}%  {r['images_per_second']:.0f} img/s" + _alive_text(r))

    return on_epoch


def _brief_epoch(r: dict) -> None:
    """One indented line per epoch for the multi-stage commands (demo, reproduce)."""
    out.print(f"    epoch {r['epoch']:>3}  loss {r['train_loss']:.4f}  test {r['test_top1']:5.2f}%" + _alive_text(r))


# -- convert ---------------------------------------------------------------------------------------
@_command
def convert(
    source: Source,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Recipe file to write.", show_default=False)],
    layers: Annotated[Optional[int], typer.Option("--layers", metavar="N", help="Convert the first N convolutions in execution order.",
                                                  show_default=False)] = None,
    target: Annotated[Optional[list[str]], typer.Option("--target", metavar="NAME", help="Convert this layer (qualified name, or re:REGEX); repeatable.",
                                                        show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option("--init", metavar="fit|random",
                                                help="fit: least squares to the trained kernels (default); random: a spread bank.", show_default=False)] = None,
    kernel_size: Annotated[Optional[int], typer.Option("--kernel-size", metavar="K",
                                                       help="Enlarge kernels to K x K (padding grows, output shapes stay): K - k even, at most 31 and at most "
                                                            "2*min(H,W)-1 of each layer's input (wider taps only see padding).", show_default=False)] = None,
    freeze: Annotated[Optional[list[str]], typer.Option("--freeze", metavar="PARAM", help="Keep a Gabor parameter fixed in training: amplitude, theta, sigma, "
                                                                                          "wavelength, psi, gamma; repeatable.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of a fresh source's initial weights and of the random bank (default 0).",
                                                show_default=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", metavar="gabor|cada", help="gabor: learnable Gabor banks (default); cada: "
                                                                                 "context-aware decomposed attention blocks.", show_default=False)] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="CADA: heads (default 1).", show_default=False)] = None,
    bases: Annotated[Optional[int], typer.Option("--bases", metavar="B", help="CADA: base kernels per head (default 4; 1 for strict/none).",
                                                 show_default=False)] = None,
    context: Annotated[Optional[int], typer.Option("--context", metavar="R", help="CADA: size of the coefficients' context window, "
                                                                                  "0 for constant coefficients (default 3).", show_default=False)] = None,
    invariance: Annotated[Optional[str], typer.Option("--invariance", metavar="strict|relaxed|none", help="CADA: spatial invariance (default relaxed).",
                                                      show_default=False)] = None,
    rel_pos: Annotated[Optional[bool], typer.Option("--rel-pos/--no-rel-pos", help="CADA: add a relative-position kernel per head (default off).",
                                                    show_default=False)] = None,
    basis: Annotated[Optional[str], typer.Option("--basis", metavar="free|gabor", help="CADA: learned taps or Gabor functions as base kernels (default free).",
                                                 show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC",
                                                help="Fit each bank to the trained layer's outputs on training images of SPEC (not only to its weights), "
                                                     "re-estimate BatchNorm statistics, and report top-1 before and after.", show_default=False)] = None,
    calibration_images: Annotated[Optional[int], typer.Option("--calibration-images", metavar="N", help="Training images the --data fit and statistics use "
                                                                                                        f"(default {workflows.CALIBRATION_IMAGES}).",
                                                              show_default=False)] = None,
    device: Device = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", help="imagefolder: resize the shorter side to N before the centre "
                                                                                "crop, H to 8*H (default H*256/224).", show_default=False)] = None,
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
    from gaborprune.convert.spec import ConversionSpec

    spec = ConversionSpec(**given(first=layers, kernel_size=kernel_size, init=init, seed=seed, to=to, heads=heads, bases=bases, context=context,
                                  invariance=invariance, rel_pos=rel_pos, basis=basis), targets=tuple(target or ()), freeze=tuple(freeze or ()))
    if calibration_images is not None and data is None:
        raise GaborPruneError("--calibration-images counts the training images of --data; add --data SPEC")
    with _Feedback() as show:
        run = workflows.convert(_source(source, num_classes, weights, model_arg, input_shape, trust_factory), spec, output, data=data,
                                **given(calibration_images=calibration_images, resize=resize),
                                options=workflows.Options(force, [json_path], **given(device=device), on_stage=show.stage))
    out.print(_convert_table(run))
    fitted = "fit error = ||w - g|| / ||w|| over the layer"
    if run.calibration is not None:
        fitted += "; output error = ||conv_g(x') - conv_w(x)|| / ||conv_w(x)|| on the calibration images, of the weight fit -> the output fit"
    out.print(f"parameters: {_count(run.params_before)} -> {_count(run.params_after)}   ({fitted})")
    if run.calibration is not None:
        c = run.calibration
        out.print(f"top-1 on {c.data} (test split, no fine-tuning): {c.accuracy_before:.2f}% before -> {c.accuracy_after:.2f}% converted "
                  f"({c.accuracy_after - c.accuracy_before:+.2f} points; fitted to outputs on {c.images} training images, BatchNorm statistics re-estimated)")
    _json(json_path, run, force)
    if run.untrained:  # built-in, torchvision and factory sources start from seeded random weights; a recipe carries its own
        _warn(f"{source} has no --weights, so its kernels are untrained (seeded random) and the Gabor fit to them is meaningless; "
              "pass trained weights with --weights state_dict.pt, or convert a recipe that finetune trained")


def _convert_table(run) -> Table:
    rows = []
    for layer in run.conversion.layers:
        kernel = "x".join(map(str, layer.kernel_size))
        if layer.kernel_size != layer.original_kernel_size:
            kernel = f"{'x'.join(map(str, layer.original_kernel_size))} -> {kernel}"
        random = "random init" if run.conversion.spec.to == "gabor" else "CADA, random init"
        row = [layer.name, kernel, f"{layer.in_channels} -> {layer.out_channels}", str(layer.groups), str(layer.kernels),
               random if layer.fit_rel_error is None else f"{layer.fit_rel_error:.3f}"]
        if run.calibration is not None:
            row.append("-" if layer.output_error is None else f"{layer.weight_fit_output_error:.3f} -> {layer.output_error:.3f}")
        rows.append(row)
    columns = ("layer", "kernel", "in -> out", "groups", "kernels", "fit error") + (("output error",) if run.calibration is not None else ())
    return _table(f"{run.source} -> {run.output}", columns, ("layer",), rows)


# -- inspect ---------------------------------------------------------------------------------------
@_command
def inspect(
    source: Source,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="Draw the Gabor banks (or the first conv) as a grid of kernels.",
                                                show_default=False)] = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    model_arg: ModelArg = None,
    input_shape: InputShape = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Show every convolution (kernels total/alive, parameters) and the model's parameters, MACs and FLOPs; for an .onnx file,
    its operators, parameters, MACs, input, output and metadata."""
    _threads(threads)
    run = workflows.inspect(_source(source, num_classes, weights, model_arg, input_shape, trust_factory), png=png,
                            options=workflows.Options(force, [json_path]))
    (_print_onnx if run.onnx else _print_summary)(source, run.summary)
    if run.drawn:
        out.print(f"drew {', '.join(run.drawn)} -> {png}")
    _json(json_path, run, force)


def _print_summary(source: str, s) -> None:
    rows = [[layer.name, layer.type, "x".join(map(str, layer.kernel_size)), str(layer.groups), f"{layer.in_channels} -> {layer.out_channels}",
             str(layer.kernels), str(layer.kernels_alive), _count(layer.params), _count(layer.macs)] for layer in s.layers]
    out.print(_table(f"{source}  (input {'x'.join(map(str, s.input_shape))})",
                     ("layer", "type", "kernel", "groups", "in -> out", "kernels", "alive", "params", "MACs"), ("layer", "type"), rows,
                     ["cyan" if layer.type == "gabor" else None for layer in s.layers]))
    out.print(f"parameters: {_count(s.params)}   MACs: {_count(s.macs)}   FLOPs: {_count(s.flops)}   (FLOPs = 2 x MACs; conv, "
              "CADA and linear layers, removed kernels skipped)")


def _print_onnx(source: str, s) -> None:
    import json

    out.print(_table(f"{source}: operators", ("op", "nodes"), ("op",), [[op, str(n)] for op, n in s.ops.items()]))
    out.print(f"ONNX opset {s.opset}, IR version {s.ir_version}, {s.precision}, {s.nodes} nodes, {s.file_bytes / 1024:.1f} KiB, producer: "
              f"{s.producer or 'not recorded'}")
    for kind, values in (("input", s.inputs), ("output", s.outputs)):
        for v in values:
            out.print(f"{kind}: {v['name']} {v['shape']} {v['dtype']}")
    out.print(f"parameters: {_count(s.params)}   MACs: {_count(s.macs)} (executed: {_count(s.macs_executed)})   FLOPs: "
              f"{_count(s.flops)}   (per image; FLOPs = 2 x MACs)")
    for key, value in s.metadata.items():
        if key == "gaborprune.kernels_kept" and isinstance(value, dict):  # {layer: [kept, kernels]}
            value = ", ".join(f"{layer} {k[0]}/{k[1]}" for layer, k in value.items()) if value else "no Gabor banks"
        elif key == "gaborprune.lowering" and isinstance(value, dict):  # {layer: form}: one entry per form
            forms: dict = {}
            for layer, form in value.items():
                forms.setdefault(form, []).append(layer)
            value = "; ".join(f"{form} {', '.join(names) if len(names) <= 3 else f'({len(names)} layers)'}" for form, names in forms.items())
        out.print(f"metadata {key}: {value if isinstance(value, str) else json.dumps(value)}")


# -- finetune and eval -----------------------------------------------------------------------------
@_command
def finetune(
    source: Source,
    data: DataOpt,
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="Recipe to write; checkpoints go beside it (FILE.last.pt, "
                                                                                "FILE.best.pt, FILE.metrics.jsonl).", show_default=False)],
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="N", help=f"Epochs (default {_TRAIN.epochs}).", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help=f"Global batch size (default {_TRAIN.batch_size}; "
                                                                                        "split over torchrun processes).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Peak learning rate (default {_TRAIN.lr}), linear warm-up then cosine.",
                                                show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", metavar="sgd|adamw",
                                                     help=f"sgd (momentum 0.9, Nesterov) or adamw (default {_TRAIN.optimizer}).", show_default=False)] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help=f"SGD momentum (default {_TRAIN.momentum}).", show_default=False)] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help=f"Nesterov momentum (default {'on' if _TRAIN.nesterov else 'off'}).",
                                                     show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="On conv/linear weights and Gabor amplitudes, never on Gabor shape parameters "
                                                                                 f"(default {_TRAIN.weight_decay}).", show_default=False)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help=f"Linear warm-up length (default {_TRAIN.warmup_epochs}).",
                                                           show_default=False)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option("--label-smoothing", help=f"Default {_TRAIN.label_smoothing}.", show_default=False)] = None,
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", metavar="STRENGTH",
                                                      help=f"Gabor sparsity pressure: 0 off (default {_TRAIN.sparsity:g}), 1e-3 gentle ... 1e-1 strong.",
                                                      show_default=False)] = None,
    structure: Annotated[Optional[str], typer.Option("--structure", metavar="channel|kernel",
                                                     help=f"What the pressure pushes to zero (default {_TRAIN.structure}): channel: whole channel groups too, "
                                                          "which is what runs faster; kernel: single kernels (the seed paper's).", show_default=False)] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", metavar="banks|all",
                                                 help=f"Where channel groups are pressed (default {_TRAIN.scope}): banks: the Gabor banks; all: "
                                                      "every convolution too, plain ones by their BatchNorm gain.", show_default=False)] = None,
    latency_aware: Annotated[Optional[bool],
                             typer.Option("--latency-aware/--no-latency-aware",
                                          help="Weigh each channel group by the ONNX Runtime time its removal saves, from a per-layer cost table measured "
                                               f"before training (default {'on' if _TRAIN.latency_aware else 'off'}: by the MACs it saves).",
                                          show_default=False)] = None,
    recalibrate: Annotated[Optional[bool], typer.Option("--recalibrate/--no-recalibrate",
                                                        help="Re-estimate BatchNorm statistics on the training split before each evaluation (default: "
                                                             "on with --scope all and --sparsity > 0).", show_default=False)] = None,
    latency_batch: Annotated[Optional[int], typer.Option("--latency-batch", metavar="N", help="Batch size the --latency-aware cost table is measured at, "
                                                                                              f"1 thread (default {_TRAIN.latency_batch}).",
                                                         show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Seed for initial weights, data order and augmentation (default {_TRAIN.seed}).",
                                                show_default=False)] = None,
    device: Device = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (default "
                                                                       f"{'on' if _TRAIN.amp else 'off'}; bf16 where supported).", show_default=False)] = None,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Default: on for CUDA.", show_default=False)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help=f"torch.compile the model (default {'on' if _TRAIN.compile else 'off'}).",
                                                    show_default=False)] = None,
    deterministic: Annotated[Optional[bool], typer.Option("--deterministic/--no-deterministic",
                                                          help=f"Deterministic algorithms (default {'on' if _TRAIN.deterministic else 'off'}).",
                                                          show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", metavar="FILE", help="Continue the run saved in FILE (an OUT.last.pt).",
                                                   show_default=False)] = None,
    resize: Annotated[Optional[int], typer.Option("--resize", metavar="N", help="imagefolder: resize the shorter side to N before the centre "
                                                                                "crop, H to 8*H (default H*256/224).", show_default=False)] = None,
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
    chosen = given(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum, nesterov=nesterov,
                   weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, sparsity=sparsity,
                   structure=structure, scope=scope, latency_aware=latency_aware, latency_batch=latency_batch, recalibrate=recalibrate,
                   seed=seed, amp=amp, channels_last=channels_last, compile=compile, deterministic=deterministic)
    defaults = workflows.finetune_defaults(source, weights, chosen.get("sparsity", _TRAIN.sparsity)) if resume is None else {}
    trained = {k: v for k, v in defaults.items() if k not in chosen}
    config = TrainConfig(**(trained | chosen))
    if trained:
        flags = COMMANDS["finetune"]
        out.print(f"{source} is trained: fine-tuning with {', '.join(f'{flags[k]} {v:g}' for k, v in trained.items())} "
                  "(training from scratch warms up to a higher rate, which would undo what it learned); pass them to change")
    with _Feedback(config.epochs) as show:
        run = workflows.finetune(_source(source, num_classes, weights, model_arg, input_shape, trust_factory), data, output, config, resume=resume,
                                 **given(resize=resize), options=workflows.Options(force, [json_path], **given(device=device), on_stage=out.print,
                                                                                   on_step=show.step, on_epoch=_epoch_line(config.epochs)))
    if run.main:  # under torchrun, rank 0 reports and writes
        _print_finetune(run)
        _json(json_path, run, force)


def _print_finetune(run) -> None:
    result, config = run.result, run.config
    if result.kernels_total:
        for line in _groups_report(result, config.structure):
            out.print(line)
    if result.cost_table:
        from gaborprune.export.costs import describe

        out.print(describe(result.cost_table), soft_wrap=True)  # one line, however many layers
    elif config.latency_aware:
        out.print(f"--latency-aware: no cost table measured ({'--sparsity is 0' if not config.sparsity else 'no channel groups'}); "
                  f"groups weigh {result.group_weights}")
    out.print(f"best {result.best_accuracy:.2f}%  final {result.final_accuracy:.2f}%  -> {run.output}  (checkpoints: "
              f"{run.checkpoints.last}, {run.checkpoints.best})")


def _groups_report(result, structure: str) -> list[str]:
    """Which channel groups the run found (and pressed, with --structure channel), and why other bank sides have none."""
    found = ", ".join(f"{label} {n}" for label, n in result.groups_total.items()) or "none"
    if len(result.groups_total) > 4:
        found = f"{sum(result.groups_total.values())} in {len(result.groups_total)} families (the JSON lists them)"
    lines = [f"channel groups ({'pressed' if structure == 'channel' else 'counted only, --structure kernel'}): {found}"]
    lines += [f"  {label}: {note}" for label, note in result.groups_notes.items()]
    return lines + [f"  no group: {line}" for line in result.groups_missing]


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
    run = workflows.evaluate(_source(source, num_classes, weights, model_arg, input_shape, trust_factory), data,
                             **given(batch_size=batch_size, resize=resize, threads=threads),
                             options=workflows.Options(force, [json_path], **given(device=device)))
    r = run.result
    where = f"onnxruntime {r.provider}, batch {r.batch_size}" if run.runtime == "onnxruntime" else run.device
    out.print(f"{source} on {run.data}: top-1 {r.top1:.2f}%  top-5 {r.top5:.2f}%  loss {r.loss:.4f}  ({r.samples} test images, {where})")
    _json(json_path, run, force)


# -- prune -----------------------------------------------------------------------------------------
@_command
def prune(
    source: Annotated[str, typer.Argument(help="A recipe .pt with Gabor banks (from convert or finetune), or any model source that has them.", metavar="RECIPE",
                                          show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", metavar="FILE", help="Recipe to write (the compacted model and its prune plan).",
                                                   show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="T", help="Remove kernels weaker than T x the strongest of their layer (default "
                                                                                        "0.02; BatchNorm-scale invariant).", show_default=False)] = None,
    ratio: Annotated[Optional[list[str]], typer.Option("--ratio", metavar="R|NAME=R",
                                                       help="Remove this fraction of the kernels: R across all Gabor banks (weakest first), "
                                                            "or NAME=R for one layer; repeatable. With --scope all: R of the channels that can "
                                                            "go, weakest first.", show_default=False)] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", metavar="N|NAME=N", help="Keep this many kernels: N across all Gabor banks, "
                                                                                         "or NAME=N for one layer; repeatable.", show_default=False)] = None,
    speedup: Annotated[Optional[float], typer.Option("--speedup", metavar="X",
                                                     help="Remove the weakest channel groups until the pruned ONNX runs X times as fast as the unpruned one, "
                                                          "measured with ONNX Runtime (batch 1, --threads or 1 thread).", show_default=False)] = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", metavar="T", help="Like --speedup, until a run takes at most T milliseconds.",
                                                        show_default=False)] = None,
    macs: Annotated[Optional[float], typer.Option("--macs", metavar="R", help="Like --speedup, until the model's MACs are at most R times the unpruned "
                                                                              "model's (counted, not timed; e.g. 0.5).", show_default=False)] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", metavar="P",
                                                      help="With --data: the most pruning whose top-1, after recalibration and any "
                                                           "--finetune-epochs, stays within P points of the unpruned model's on a validation "
                                                           f"split ({workflows.VALIDATION:.0%} of the training images, seeded; the test top-1 is "
                                                           "reported beside it); --speedup/--latency-ms/--macs then set a floor.",
                                                      show_default=False)] = None,
    scope: Annotated[Optional[str], typer.Option("--scope", metavar="banks|all",
                                                 help="banks (default): kernels of the Gabor banks; all: also whole channels of every convolution whose "
                                                      "channel group is below --threshold (fine-tune with --scope all first), or the weakest --ratio "
                                                      "of them or what a target needs (no pressure needed).", show_default=False)] = None,
    round_to: Annotated[Optional[int], typer.Option("--round-to", metavar="N",
                                                    help="With --scope all, keep a multiple of N channels in each layer (default: this CPU's ONNX Runtime "
                                                         "channel block, 16 with AVX-512, 8 with AVX2; 1: any count).", show_default=False)] = None,
    importance: Annotated[Optional[str], typer.Option("--importance", metavar="gain|taylor",
                                                      help="With --scope all and --ratio or a target, rank channels by their BatchNorm gain (gain) "
                                                           "or by the first-order loss change of removing each on training images (taylor, needs "
                                                           "--data). Default: taylor with --data, else gain.", show_default=False)] = None,
    module: Annotated[Optional[str], typer.Option("--module", metavar="NAME",
                                                  help="The part of the model whose channels --scope all removes (a module path, e.g. backbone). "
                                                       "Default: the whole model when torch.fx traces it, else its backbone (detectors).",
                                                  show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be removed; write no recipe.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Evaluate top-1 accuracy before and after on this dataset "
                                                                               "(digits, fake:N, cifar10:DIR, ...).", show_default=False)] = None,
    recalibrate: Annotated[Optional[bool], typer.Option("--recalibrate/--no-recalibrate",
                                                        help=f"With --data: re-estimate BatchNorm statistics on {workflows.CALIBRATION_IMAGES} training "
                                                             "images after pruning, no gradient steps (default on).", show_default=False)] = None,
    finetune_epochs: Annotated[Optional[int], typer.Option("--finetune-epochs", metavar="N", help="Recover accuracy with N epochs of fine-tuning, "
                                                                                                  "removed kernels staying removed (needs --data).",
                                                           show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Recovery fine-tuning peak learning rate (default {workflows.RECOVERY_LR}).",
                                                show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", metavar="N", help=f"Recovery and evaluation batch size (default {_TRAIN.batch_size}).",
                                                      show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=f"Recovery fine-tuning seed (default {_TRAIN.seed}).", show_default=False)] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", metavar="T1,T2,...", help="Prune at each threshold, evaluate on --data, print and plot accuracy vs "
                                                                                      "kernels kept; writes no recipe.", show_default=False)] = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help=f"--sweep's plot (default {workflows.SWEEP_PNG}).", show_default=False)] = None,
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
    spec, target = _prune_rule(threshold, ratio, keep, scope, round_to, importance, speedup, latency_ms, macs, max_drop, sweep, module)
    if finetune_epochs is not None and data is None:
        raise GaborPruneError("--finetune-epochs needs --data to measure accuracy")
    if data is None:  # nothing uses them then, but a bad value is still refused
        TrainConfig(**given(lr=lr, batch_size=batch_size, seed=seed))
    model = _source(source, input_shape=input_shape, trust_factory=trust_factory)
    accuracy = workflows.Accuracy(data, **given(recalibrate=recalibrate, recovery_epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                                                seed=seed, resize=resize)) if data is not None else None
    if sweep is not None:
        return _sweep(model, _thresholds(sweep), spec, output, png, json_path, force, accuracy, device)
    with _Feedback(finetune_epochs) as show:
        run = workflows.prune(model, output, spec, target=target, accuracy=accuracy, dry_run=dry_run, on_pruned=_print_prune, **given(threads=threads),
                              options=workflows.Options(force, [json_path], **given(device=device), on_stage=show.stage, on_step=show.step,
                                                        on_epoch=_epoch_line(finetune_epochs)))
    r = run.report
    if run.data is not None:
        recalibrated = f"  BatchNorm recalibrated {r.accuracy_recalibrated:.2f}%" if r.accuracy_recalibrated is not None else ""
        recovered = f"  after recovery {r.accuracy_after:.2f}%" if run.recovery_epochs else ""
        out.print(f"top-1 accuracy on {run.data} (test split): before {r.accuracy_before:.2f}%  pruned {r.accuracy_pruned:.2f}%{recalibrated}{recovered}"
                  f"  ({r.accuracy_after - r.accuracy_before:+.2f} points)")
    else:
        out.print("accuracy not measured: add --data SPEC to measure top-1 before and after (BatchNorm statistics re-estimated), "
                  "and --finetune-epochs N to recover what the prune cost", soft_wrap=True)
    if run.output is not None:
        out.print(f"-> {run.output}")
    _json(json_path, run, force)


def _sweep(source, thresholds: list[float], spec, output, png, json_path, force: bool, accuracy, device) -> None:
    if output is not None:
        raise GaborPruneError("a sweep writes no recipe; drop -o, pick a threshold from its table, then prune with --threshold")
    png = png or Path(workflows.SWEEP_PNG)
    epochs = accuracy.recovery_epochs if accuracy is not None else None
    with _Feedback(epochs) as show:
        run = workflows.sweep(source, thresholds, spec, accuracy=accuracy, png=png,
                              options=workflows.Options(force, [json_path], **given(device=device), on_stage=show.stage, on_step=show.step,
                                                        on_epoch=_epoch_line(epochs)))
    rows = [[f"{p.threshold:g}", f"{p.kernels_kept}/{p.kernels_total}", f"{p.kernels_kept / p.kernels_total:.1%}" if p.kernels_total else "-",
             _count(p.params), _count(p.macs), f"{p.accuracy:.2f}%"] for p in run.points]
    out.print(_table(f"{source}: accuracy vs kernels kept", ("threshold", "kernels kept", "kept", "parameters", "MACs", "top-1"), (), rows))
    out.print(f"plot -> {png}")
    _json(json_path, run, force)


def _print_prune(run) -> None:
    """The prune as it is decided, before recovery runs (`workflows.prune`'s `on_pruned`)."""
    from itertools import groupby

    if run.target is not None:
        _print_target(run.target, run.source)
    report = run.report
    if report is None:  # the target was not met
        return
    rows = [[c.name, c.type, _change(c.kernels_before, c.kernels_after), f"{c.removed:.0%}", _change(c.channels_before, c.channels_after),
             _change(c.in_channels_before, c.in_channels_after)] for c in report.layers]
    out.print(_table(f"{run.source} -> {'(dry run)' if run.output is None else run.output}: {run.rule}",
                     ("layer", "type", "kernels", "removed", "out channels", "in channels"), ("layer", "type"), rows,
                     ["cyan" if c.type == "gabor" else None for c in report.layers]))

    def change(label: str, a: int, b: int) -> str:
        return f"{label}: {_count(a)} -> {_count(b)} ({(b - a) / a:+.1%})" if a else f"{label}: 0"

    before, after = report.before, report.after
    out.print("   ".join([change("parameters", before.params, after.params), change("MACs", before.macs, after.macs),
                          change("FLOPs", before.flops, after.flops)]) + "   (FLOPs = 2 x MACs)")
    for (layer, side, reason), kept in groupby(report.kept, key=lambda k: (k.layer, k.side, k.reason)):
        what = "dead channels" if side == "out" else "the channels read by dead input columns"
        out.print(f"kept {what} of {layer} ({', '.join(str(k.channel) for k in kept)}), their kernels masked: {reason}")
    if run.output is None:
        for name, sides in report.plan.channels.items():
            cut = "; ".join(f"{side} {', '.join(map(str, idx))}" for side, idx in sides.items() if idx)
            out.print(f"would remove from {name}: {cut}")
    out.print(f"compacted vs masked model, max |output difference|: {report.max_abs_diff:.2g}")
    for w in report.warnings:
        _warn(w)
    if run.recovery_epochs:
        out.print(f"recovering: {run.recovery_epochs} epoch(s) on {run.data}, removed kernels stay removed")


def _change(a: int, b: int) -> str:
    return str(a) if a == b else f"{a} -> {b}"


def _print_target(report, source: str) -> None:
    """The candidates of `prune --speedup/--latency-ms/--macs`, predicted and measured side by side, and the search's notes."""
    def interval(i, fmt: str, unit: str = "") -> str:
        return "-" if i is None else f"{i.median:{fmt}}{unit} [{i.low:{fmt}}-{i.high:{fmt}}]"

    budget = report.target.max_drop is not None
    branches, timed = any(c.branches for c in report.candidates), report.baseline is not None or report.target.timed
    rows = []
    for c in report.candidates:
        channels = ", ".join(f"{name} {o}x{i}" for name, (o, i) in (c.channels or {}).items()) + (f" (x{report.block})" if c.aligned else "")
        times = ["-" if c.predicted_ms is None else f"{c.predicted_ms:.3f}", "-" if c.predicted_speedup is None else f"{c.predicted_speedup:.2f}x",
                 interval(c.measured, ".3f"), interval(c.speedup, ".2f", "x")] if timed else []
        verdict = (("within" if c.within else "over") if c.within is not None else "floor met" if c.meets else "below floor") if budget \
            else "met" if c.meets else "not met"
        rows.append([c.label, channels or "-", *([", ".join(c.branches) or "-"] if branches else []),
                     "-" if c.mac_ratio is None else f"{c.mac_ratio:.3f}", *times,
                     *(["-" if c.accuracy is None else f"{c.accuracy:.2f}%"] if budget else []),
                     verdict + (", chosen" if c.k == report.chosen else "")])
    how = f"ONNX Runtime, batch {report.batch_size}, {report.threads} thread{'s' if report.threads != 1 else ''}" if timed else "MACs counted"
    table = _table(f"{source}: pruning to {report.target.describe()} ({how}; {report.family})",
                   ("candidate", "channels", *(["branches removed"] if branches else []), "MAC ratio",
                    *(("predicted ms", "predicted", "measured ms", "speedup") if timed else ()), *(("val top-1",) if budget else ()), "target"),
                   ("candidate", "channels", "branches removed"), rows, ["cyan" if c.k == report.chosen else None for c in report.candidates])
    caption = []
    if report.baseline is not None:
        b = report.baseline
        caption.append(f"unpruned: {b.median:.3f} ms [{b.low:.3f}-{b.high:.3f}]")
    if report.base_accuracy is not None:
        caption.append(f"unpruned validation top-1 {report.base_accuracy:.2f}%")
    if caption:
        table.caption = "; ".join(caption) + "; channels: out x in of the layers that change; [95% intervals]"
    out.print(table)
    for note in report.notes:
        out.print(_say(note))


# -- export ----------------------------------------------------------------------------------------
@_command
def export(
    source: Annotated[str, typer.Argument(help="A recipe .pt (or any model source) to export.", metavar="RECIPE", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", metavar="FILE", help="ONNX file to write.", show_default=False)],
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="N,C,H,W", help="Static input shape, e.g. 1,3,32,32 (default: "
                                                                                                "batch 1 and the model's C,H,W).", show_default=False)] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Let the batch dimension vary (default: static, for embedded runtimes).")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, 18 to 23 (default: the exporter's).", show_default=False)] = None,
    lowering: Annotated[Optional[str], typer.Option("--lowering", metavar="auto|dense|sparse",
                                                    help="auto (default) times the plain dense export against cut, padded and split forms in ONNX Runtime "
                                                         "and keeps another only when faster beyond the noise; dense: the plain dense export; "
                                                         "sparse: cut and split, unmeasured.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", help="CPU threads of torch and of the ONNX Runtime sessions that measure and "
                                                                                  "check (default: one per core).", show_default=False)] = None,
    atol: Annotated[Optional[float], typer.Option("--atol", help="Largest accepted |onnxruntime - PyTorch| (default 1e-4); beyond it nothing is written.",
                                                  show_default=False)] = None,
    pad_channels: Annotated[Optional[int], typer.Option("--pad-channels", metavar="N",
                                                        help="Grow channel counts pruning left off a multiple of N with zero channels, where exact: "
                                                             "0 (off) or a power of two from 2 to 64 (default: auto also times padding to this CPU's block, "
                                                             "16 with AVX-512, 8 with AVX2, and keeps it only when faster).", show_default=False)] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", metavar="int8", help="Write an int8 model: static (calibrated on "
                                                                                       "--data) or, without --data, dynamic.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Real images for the checks, int8 calibration and ONNX accuracy.",
                                                show_default=False)] = None,
    module: Annotated[Optional[str], typer.Option("--module", metavar="NAME", help="Export only this module (e.g. a detector's backbone), for the "
                                                                                  "input the whole model feeds it (default: the whole model).",
                                                  show_default=False)] = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
) -> None:
    """Write a compact ONNX model for inference: plain ops, BatchNorm folded, checked against PyTorch."""
    _threads(threads)
    from gaborprune.export.api import ExportConfig

    shape = _shape(input_shape, "N,C,H,W", "1,3,32,32")
    config = ExportConfig(**given(batch_size=shape[0] if shape else None, opset=opset, lowering=lowering, atol=atol, threads=threads,
                                  pad_channels=pad_channels, quantize=quantize), dynamic_batch=dynamic_batch)
    with _Feedback() as show:
        model = workflows.Source(source, input_shape=shape[1:] if shape else None, trust_factory=trust_factory)
        run = workflows.export(model, output, config, data=data, module=module, options=workflows.Options(force, [json_path], on_stage=show.stage))
    _print_export(run)
    _json(json_path, run, force)


def _print_export(run) -> None:
    report = run.report
    rows = [[name, f"{kernels}/{dense}", report.lowering[name], *(f"{report.lowering_ms.get(name, {})[f]:.3f}" if f in report.lowering_ms.get(name, {}) else ""
                                                                 for f in ("dense", "split"))]
            for name, (kernels, dense) in report.sparse_kernels.items()]
    if rows:
        out.print(_table(f"{run.source} -> {report.path}: kernel-sparse layers", ("layer", "kernels", "lowering", "dense ms", "split ms"),
                         ("layer", "lowering"), rows))
    for c in report.candidates if len(report.candidates) > 1 else []:
        timing = f"{c['median_ms']:.3f} ms [{c['low_ms']:.3f}-{c['high_ms']:.3f}]" if "median_ms" in c else ""
        ratio = f"  time ratio {c['ratio']['median']:.3f} [{c['ratio']['low']:.3f}-{c['ratio']['high']:.3f}]" if c["ratio"] else "  (baseline)"
        out.print(f"  {'kept' if c['kept'] else '    '}  {c['form']}: {timing}{ratio}  {_count(c['params'])} params")
    out.print(f"lowering: {_say(report.lowering_note)}")
    for line in report.skipped:
        out.print(f"skipped: {_say(line)}")
    if report.channels_cut:
        maps = f"; bias maps added to {', '.join(report.bias_maps)}" if report.bias_maps else ""
        out.print(f"cut at export (constant channels{maps}): " + "; ".join(
            f"{m} {side} {len(idx)}" for m, sides in report.channels_cut.items() for side, idx in sides.items()))
    if report.padded:
        out.print(f"grown with zero channels to a multiple of {report.pad}: {', '.join(report.padded)}")
    out.print(f"parameters: {_count(report.params)}   MACs: {_count(report.macs)} (executed: {_count(report.macs_executed)})   FLOPs: {_count(report.flops)}")
    out.print(f"onnxruntime vs PyTorch: max |diff| {report.max_abs_diff:.2g}, "
              f"cosine {report.cosine:.6f}   opset {report.opset}{' (TorchScript exporter)' if report.exporter == 'torchscript' else ''}"
              f"   input {report.inputs[0]['shape']}")
    if report.module:
        out.print(f"exported module '{report.module}' only, for the input the whole model feeds it (not the whole model)")
    if report.quantization:
        q = report.quantization
        out.print(f"int8 ({q['mode']}): max |diff| vs PyTorch {q['max_abs_diff']:.3g}, cosine {q['cosine']:.5f} on {q['compared_on']}")
    if report.accuracy:
        out.print(f"top-1 on {run.data}: " + "  ".join(f"{k} {v:.2f}%" for k, v in report.accuracy.items()))
    out.print(f"-> {report.path} ({report.file_bytes / 1024:.1f} KiB)")
    if report.note:
        out.print(f"note: {_say(report.note)}")  # `out` prints verbatim (no markup)


# -- bench -----------------------------------------------------------------------------------------
@_command
def bench(
    models: Annotated[list[str], typer.Argument(help="ONNX files (float or int8), or recipes / model sources (exported on the fly).", metavar="MODEL...",
                                                show_default=False)],
    baseline: Annotated[Optional[list[str]], typer.Option("--baseline", metavar="MODEL",
                                                          help="Reference timed in the same runs (speedup, executed-MAC ratio, efficiency); "
                                                               "repeat to give a float and an int8 one: each model is compared with its own precision's.",
                                                          show_default=False)] = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", metavar="B1,B2,...", help="Batch sizes (default 1).", show_default=False)] = None,
    threads: Annotated[Optional[str], typer.Option("--threads", metavar="T1,T2,...", help="Intra-op thread counts, each 1 to the cores available (default 1).",
                                                   show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Untimed runs per model and configuration (default 10).", show_default=False)] = None,
    runs: Annotated[Optional[int], typer.Option("--runs", help="Timed runs per model in one round (default 100); "
                                                               "rounds repeat until --precision or --max-seconds.", show_default=False)] = None,
    precision: Annotated[Optional[float], typer.Option("--precision", metavar="R", help="Stop when every median's 95% interval is narrower than R times "
                                                                                        "the median (default 0.02: +-1%).", show_default=False)] = None,
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", metavar="S", help="Timing budget, all configurations together (default 60).",
                                                         show_default=False)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also time an int8 copy of every float model and baseline (static on --data, "
                                                      "else dynamic), against the int8 baseline.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", metavar="SPEC", help="Images to calibrate --int8 on (static quantisation).",
                                                show_default=False)] = None,
    provider: Annotated[Optional[str], typer.Option("--provider", metavar="cpu|cuda", help="ONNX Runtime execution provider (default cpu).",
                                                    show_default=False)] = None,
    profile: Annotated[bool, typer.Option("--profile", help="Per-layer time from ONNX Runtime's profiler (first configuration), "
                                                            "and the share spent in the converted layers.")] = False,
    torch_eager: Annotated[bool, typer.Option("--torch", help="Also time PyTorch eager (models given as recipes / sources).")] = False,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="FILE", help="Write a Markdown report.", show_default=False)] = None,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="Plot median latency per configuration (bars: "
                                                                              "p25-p75 of the runs), with the speedups.", show_default=False)] = None,
    json_path: JsonOut = None,
    trust_factory: TrustFactory = False,
    force: Force = False,
) -> None:
    """Latency of ONNX models in ONNX Runtime (medians with 95% intervals), side by side with a baseline of the same precision."""
    from gaborprune._io import write_text
    from gaborprune.plot import plot_latency

    with _Feedback() as show:
        settings = workflows.BenchSettings(_ints(batch_size, "--batch-size"), _ints(threads, "--threads"), warmup, runs, precision, max_seconds,
                                           **given(provider=provider))
        report = workflows.bench([workflows.Source(m, trust_factory=trust_factory) for m in models],
                                 baseline=[workflows.Source(b, trust_factory=trust_factory) for b in baseline or ()], settings=settings,
                                 int8=int8, data=data, profile=profile, torch_eager=torch_eager,
                                 options=workflows.Options(force, [json_path, markdown, png], on_stage=show.stage))
    for warning in report.warnings:
        _warn(warning)
    _print_bench(report)
    _json(json_path, report, force)
    if markdown:
        write_text(markdown, _say(report.to_markdown()), force)
    if png:
        plot_latency(report, png, force=force)


def _print_bench(report) -> None:
    from gaborprune.export.environment import load_note
    from gaborprune.export.render import COMPARISON_COLUMNS, RESULT_COLUMNS, top_layers

    env, s = report.environment, report.settings
    out.print(_table(f"latency: {env['cpu']}, {env['cores']} cores{load_note(env)}, onnxruntime {env['onnxruntime']} ({env['provider']}); "
                     f"medians with 95% intervals, rounds of {s['runs_per_round']} runs until +-{s['precision'] / 2:.1%} or {s['max_seconds']:g} s",
                     RESULT_COLUMNS, ("model", "runtime", "precision", "note"), _said(report.result_rows())))
    if report.comparisons:
        out.print(_table("against the baseline of the same precision: speedup = median of t_base/t over interleaved runs; "
                         "efficiency = (1 - t/t_base) / (1 - MACs/MACs_base) on executed MACs",
                         COMPARISON_COLUMNS, ("model", "baseline", "efficiency", "verdict"), _said(report.comparison_rows())))
    first = report.results[0] if report.results else None
    for model, layers in report.profiles.items():
        total = sum(layers.values()) or 1.0
        rows = [[name, f"{ms:.3f}", f"{ms / total:.0%}"] for name, ms in top_layers(layers)]
        out.print(_table(f"where the time goes: {model} (batch {first.batch_size}, {first.threads} thread(s))", ("layer", "ms per run", "share"),
                         ("layer",), rows))
        if model in report.converted:
            out.print(report.share_line(model))


# -- demo and reproduce ----------------------------------------------------------------------------
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

    from gaborprune.demo import DemoConfig, file_figures, run_demo
    from gaborprune.train.distributed import resolve_device

    config, dev, t0 = DemoConfig(), resolve_device(device or workflows.DEVICE), time.perf_counter()
    report = run_demo(out_dir, config, device=dev, on_stage=lambda s: out.print(f"[{time.perf_counter() - t0:5.0f} s] {s}"),
                      on_epoch=_brief_epoch, force=force)
    out.print(_table(f"gaborprune demo: {config.model} on {config.data} ({time.perf_counter() - t0:.0f} s on {dev})", ("stage", "top-1", "parameters", "MACs"),
                     ("stage",), [[st.name, f"{st.accuracy:.2f}%", _count(st.params), _count(st.macs)] for st in report.stages]))
    out.print(f"pruned: {report.pruned}")
    out.print("kernels kept: " + "  ".join(f"{n} {k}/{t}" for n, (k, t) in report.kernels.items()) + f"   ({report.removed:.0%} removed)")
    for name, e in report.onnx.items():
        top1, diff = file_figures(e)
        out.print(f"{name + '.onnx':19s} {e.file_bytes / 1024:7.0f} KiB   {_count(e.params)} parameters   {_count(e.macs_executed)} MACs executed   "
                  f"top-1 {top1:.2f}%   max |diff| vs PyTorch {diff:.1e}")
    for c in report.latency.comparisons:
        eff = f", efficiency {c.efficiency:.2f}" if c.efficiency is not None else ""
        out.print(f"pruned vs unpruned, {c.precision:5s} batch {c.batch_size:>2}: speedup {c.speedup:.3f}x "
                  f"[{c.speedup_low:.3f}, {c.speedup_high:.3f}] {c.verdict}, executed-MAC ratio {c.mac_ratio:.3f}{eff}")
    if report.note:
        out.print(f"note: {_say(report.note)}")
    out.print(f"report: {out_dir / 'report.md'}  (and report.json, banks-*.png, latency.png, summary.png)")


@_command
def reproduce(
    experiment: Annotated[str, typer.Argument(help="vgg16-cifar10, resnet20-altered-cifar10 (Gabor paper) or cada-ablation (CADA paper).", metavar="EXPERIMENT",
                                              show_default=False)],
    data: DataOpt,
    seeds: Annotated[Optional[int], typer.Option("--seeds", metavar="K", help="Seeds 0..K-1; mean and std over them (default 1).", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="N", help="Override the recipe's epochs (toy runs).", show_default=False)] = None,
    settings: Annotated[Optional[str], typer.Option("--settings", metavar="A,B,...", help="cada-ablation: run only these settings (default all).",
                                                    show_default=False)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", metavar="C,H,W", help="cada-ablation: image size (default 3,16,16 for "
                                                                                              "digits and fake, else 3,32,32).", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where recipes and results.md / results.json go.")] = Path("reproduce-out"),
    device: Device = None,
    force: Force = False,
    threads: Threads = None,
) -> None:
    """Run one of the seed papers' experiments: Gabor (plain vs Gabor network, kernels kept) or the CADA ablation."""
    _threads(threads)
    from gaborprune.reproduce import reproduce as run_experiment
    from gaborprune.train.distributed import resolve_device

    names = [s.strip() for s in settings.split(",") if s.strip()] if settings else None
    report = run_experiment(experiment, data, out=out_dir, device=resolve_device(device or workflows.DEVICE), on_stage=out.print, on_epoch=_brief_epoch,
                            force=force, **given(seeds=seeds, epochs=epochs, settings=names, input_shape=_shape(input_shape, "C,H,W", "3,16,16")))
    for line in _say(report.to_markdown()).rstrip("\n").split("\n"):
        out.print(line)
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
