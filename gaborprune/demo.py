"""`run_demo`: the whole pipeline, offline, on the bundled digits, with a report.

train a plain ResNet-20 -> convert its first convolutions to Gabor banks -> fine-tune with the
sparsity pressure -> prune within an accuracy budget and compact -> recover -> export to ONNX
(checked against PyTorch) -> bench against the unconverted network. Every number in the report is
measured in the run.

The prune is the one a user would ask for: the most channel groups of the banks whose removal keeps
the validation top-1 within `DemoConfig.max_drop` points of the fine-tuned model's (`prune --max-drop`;
`gaborprune.search.prune_within_`), rather than a threshold on kernel strength: the pressure kills
some groups outright, and the budget then decides how many weak live ones may go too. The validation
split (`VALIDATION` of the training images, seeded) is held out from the start: no stage trains on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gaborprune._io import check_outputs, write_json, write_text
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import ConversionSpec, gaborize_
from gaborprune.data import calibration_batches, load_data
from gaborprune.errors import GaborPruneError
from gaborprune.export.api import ExportConfig, ExportReport, export_model
from gaborprune.export.bench import bench
from gaborprune.export.bench_models import load_onnx
from gaborprune.export.results import BenchReport, Comparison
from gaborprune.norms import recalibrate_norms_
from gaborprune.plot import bank_views, plot_banks, plot_latency, plot_summary
from gaborprune.recipe import load_model, save_recipe
from gaborprune.search import TargetReport, TargetSpec, prune_to_target_
from gaborprune.summary import summarize
from gaborprune.train import TrainConfig, evaluate, finetune_
from gaborprune.workflows import CALIBRATION_IMAGES, VALIDATION


@dataclass(frozen=True)
class DemoConfig:
    """The demo's recipe, in one place (defaults: about 2-3 minutes on 2 CPU cores)."""

    # the paper's altered ResNet-20 trained with plain 7x7 and 5x5 stem convolutions: their channels are not tied
    # to the residual stream, so the channels the pressure kills are removed whole (ResNet-20's own first
    # convolutions feed the residual additions, and killed kernels there stay inside kept channels)
    model: str = "resnet20_altered"
    model_args: tuple[tuple[str, object], ...] = (("gabor", False),)
    data: str = "digits"
    layers: int = 2  # convert the first N convolutions
    calibration_images: int = CALIBRATION_IMAGES  # the conversion fits each bank to its layer's outputs on these
    train_epochs: int = 6
    finetune_epochs: int = 6
    sparsity: float = 0.1
    recovery_epochs: int = 2
    batch_size: int = 64
    lr: float = 0.05
    # the prune: the most channel groups of the banks within this many points of the fine-tuned model's top-1 on the
    # validation split, each candidate scored after BatchNorm recalibration (the recovery epochs follow, for the chosen one).
    # Digits' validation split is 143 images, 0.7 points each: at 1 point the search stopped at 6 of 15 groups (1.06x float,
    # int8 not faster), one image short of 8 (1.10x)
    max_drop: float = 2.0
    threshold: float = 0.03  # the figures mark kernels weaker than this x their layer's strongest as weak
    bench_runs: int = 100  # runs per round; rounds repeat until the medians are known to +-1% or bench_seconds pass
    bench_batches: tuple[int, ...] = (1, 32)
    bench_seconds: float = 40.0
    seed: int = 0


#: Everything `run_demo` writes into its folder: {the report's name for it: file name}.
FILES = {"baseline_recipe": "baseline.pt", "finetuned_recipe": "finetuned.pt", "pruned_recipe": "pruned.pt", "baseline_onnx": "baseline.onnx",
         "pruned_onnx": "pruned.onnx", "baseline_int8_onnx": "baseline-int8.onnx", "pruned_int8_onnx": "pruned-int8.onnx",
         "banks_converted": "banks-converted.png", "banks_before": "banks-before-pruning.png", "banks_after": "banks-after-pruning.png",
         "latency_png": "latency.png", "summary_png": "summary.png", "report_md": "report.md", "report_json": "report.json"}


def check_demo_outputs(out: Path, force: bool) -> None:
    """Refuse a folder that already holds a demo's file unless `force` (before any training)."""
    taken = [n for n in FILES.values() if (out / n).exists()]
    if taken and not force:
        raise GaborPruneError(f"'{out}' already holds a demo ({taken[0]}, ...); pass `force` to overwrite it or choose `out`")
    check_outputs([out / name for name in FILES.values()], force)


@dataclass
class Stage:
    name: str
    accuracy: float  # top-1 percent on the test split
    params: int
    macs: int
    seconds: float


@dataclass
class DemoReport:
    config: DemoConfig
    stages: list[Stage] = field(default_factory=list)
    kernels: dict[str, list[int]] = field(default_factory=dict)  # {layer: [kept, total]}
    onnx: dict[str, ExportReport] = field(default_factory=dict)  # {"baseline", "pruned", "baseline-int8", "pruned-int8": its export}
    latency: BenchReport | None = None  # the pruned files timed against the baseline files
    target: TargetReport | None = None  # the prune's search within the accuracy budget
    files: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why the pruned model is not faster, when it is not

    @property
    def pruned(self) -> str:
        """What the prune's search chose and why, with each candidate it scored, in one sentence."""
        t, budget = self.target, self.config.max_drop
        if t is None or t.chosen_candidate is None:
            return ""
        scored = [c for c in t.candidates if c.accuracy is not None]
        tried = ", ".join(f"{c.k}: {c.accuracy:.2f}%" + (f" {c.speedup.median:.2f}x" if c.speedup is not None else "") for c in scored)
        return (f"the {t.chosen_candidate.label} of {t.size}, the most whose validation top-1 after BatchNorm recalibration stays within "
                f"{_points(budget)} of {t.base_accuracy:.2f}% (groups removed: top-1, speedup at batch 1 as the search timed it: {tried})")

    @property
    def removed(self) -> float:
        kept = sum(k for k, _ in self.kernels.values())
        total = sum(t for _, t in self.kernels.values())
        return 1 - kept / total if total else 0.0

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "stages": [asdict(s) for s in self.stages], "kernels": self.kernels,
                "kernels_removed": self.removed, "onnx": {k: e.to_dict() for k, e in self.onnx.items()},
                "latency": self.latency.to_dict() if self.latency is not None else {}, "files": self.files, "note": self.note,
                "target": self.target.to_dict() if self.target is not None else {}}

    def to_markdown(self) -> str:
        return markdown(self)


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), *, device: torch.device = torch.device("cpu"),
             on_stage: Callable[[str], None] = lambda s: None, on_epoch: Callable[[dict], None] | None = None,
             force: bool = False) -> DemoReport:
    """Run the pipeline, writing recipes, ONNX files, PNGs, report.md and report.json into `out`."""
    import time

    out = Path(out)
    check_demo_outputs(out, force)
    report = DemoReport(config)
    torch.manual_seed(config.seed)
    model, recipe = load_model(config.model, model_args=dict(config.model_args), seed=config.seed)
    train, test = load_data(config.data, recipe.input_shape)
    train, validation = train.split(max(1, round(VALIDATION * len(train))), seed=config.seed)  # held out from every stage
    test_dev = test.to(device)

    def stage(name: str, m, t0: float) -> None:
        s = summarize(m.cpu(), recipe.input_shape)
        acc = evaluate(m.to(device), test_dev, device).top1
        report.stages.append(Stage(name, acc, s.params, s.macs, round(time.perf_counter() - t0, 1)))
        m.cpu()

    def train_for(m, r, epochs: int, sparsity: float = 0.0, lr: float = config.lr, recalibrate: bool | None = None):
        cfg = TrainConfig(epochs=epochs, batch_size=config.batch_size, lr=lr, sparsity=sparsity, seed=config.seed, recalibrate=recalibrate)
        result = finetune_(m, r, train, test, cfg, device=device, data_name=config.data, on_epoch=on_epoch)
        m.cpu()
        return r.with_step(result.step)

    t0 = time.perf_counter()
    on_stage(f"1/6 training {config.model} on {config.data} ({config.train_epochs} epochs)")
    recipe = train_for(model, recipe, config.train_epochs)
    stage(f"{config.model} (unconverted)", model, t0)
    save_recipe(out / "baseline.pt", model, recipe, force=force)

    t0 = time.perf_counter()
    on_stage(f"2/6 converting the first {config.layers} convolutions to Gabor banks (fitted to the layers' outputs on "
             f"{config.calibration_images} training images)")
    gabor = copy.deepcopy(model)
    calibration = calibration_batches(train, config.calibration_images, config.batch_size, seed=config.seed)
    grecipe = recipe.with_step(gaborize_(gabor, ConversionSpec(first=config.layers), recipe.input_shape, calibration=calibration).step)
    stage("converted (fitted to layer outputs, before fine-tuning)", gabor, t0)
    plot_banks([("converted", bank_views(gabor, recipe.input_shape))], out / "banks-converted.png", force=force)

    t0 = time.perf_counter()
    on_stage(f"3/6 fine-tuning with sparsity {config.sparsity} ({config.finetune_epochs} epochs)")
    grecipe = train_for(gabor, grecipe, config.finetune_epochs, config.sparsity)
    stage(f"fine-tuned, sparsity {config.sparsity}", gabor, t0)
    tuned = bank_views(gabor, recipe.input_shape, threshold=config.threshold)  # weak: what the prune will remove
    plot_banks([("fine-tuned", tuned)], out / "banks-before-pruning.png", force=force)
    save_recipe(out / "finetuned.pt", gabor, grecipe, force=force)  # to try other thresholds on: gaborprune prune finetuned.pt --sweep ...

    t0 = time.perf_counter()
    on_stage(f"4/6 pruning the most channel groups within {_points(config.max_drop)} on {len(validation)} validation images, "
             f"and recovering ({config.recovery_epochs} epochs)")
    total = {n: m.mask.numel() for n, m in gabor.named_modules() if isinstance(m, GaborConv2d)}
    val_dev, images = validation.to(device), calibration_batches(train, config.calibration_images, config.batch_size, seed=config.seed)

    def score(candidate) -> float:
        recalibrate_norms_(candidate.to(device), (x.to(device) for x in images))
        return evaluate(candidate, val_dev, device).top1

    report.target = prune_to_target_(gabor, recipe.input_shape, TargetSpec(max_drop=config.max_drop), accuracy=score, threads=1)
    if report.target.step is None:
        raise GaborPruneError(f"the demo's prune found nothing to remove: {report.target.message}")
    grecipe = grecipe.with_step(report.target.step)
    stage("pruned and compacted", gabor, t0)
    t0 = time.perf_counter()
    # recalibrated: the pruned channels change what later BatchNorms see, faster than their running averages follow
    grecipe = train_for(gabor, grecipe, config.recovery_epochs, lr=config.lr / 5, recalibrate=True)
    stage("recovered", gabor, t0)
    report.kernels = {n: [m.kernels_alive, total[n]] for n, m in gabor.named_modules() if isinstance(m, GaborConv2d)}
    plot_banks([("fine-tuned", tuned), ("pruned", bank_views(gabor, recipe.input_shape, [s.plan for s in grecipe.prunes], threshold=config.threshold))],
               out / "banks-after-pruning.png", force=force)
    save_recipe(out / "pruned.pt", gabor, grecipe, force=force)

    on_stage("5/6 exporting both networks to ONNX, float and int8, and checking them against PyTorch")
    exports = {}
    for name, m, r in (("baseline", model, recipe), ("pruned", gabor, grecipe)):
        for suffix, int8 in (("", False), ("-int8", True)):  # int8 files of their own: the pruned one's form is chosen on int8 timings
            cfg = ExportConfig(dynamic_batch=True, threads=1, lowering="dense" if name == "baseline" else "auto", quantize=int8)
            exports[name + suffix] = export_model(m, r.input_shape, out / f"{name}{suffix}.onnx", cfg, provenance=r.provenance(), data=(train, test),
                                                  force=force)
            report.onnx[name + suffix] = exports[name + suffix]

    on_stage(f"6/6 timing both, float and int8, in ONNX Runtime (batch {', '.join(map(str, config.bench_batches))}, 1 thread, interleaved)")
    result = bench([load_onnx(out / f"pruned{s}.onnx", f"pruned{s}") for s in ("", "-int8")],
                   baseline=[load_onnx(out / f"baseline{s}.onnx", f"baseline{s}") for s in ("", "-int8")],
                   batch_sizes=config.bench_batches, runs=config.bench_runs, max_seconds=config.bench_seconds)
    report.latency = result
    report.note = exports["pruned"].note or _not_faster(result)
    plot_latency(result, out / "latency.png", force=force)

    report.files = {k: str(out / f) for k, f in FILES.items()}
    data = report.to_dict()
    write_json(out / "report.json", data, force)
    plot_summary(data, out / "summary.png", force=force)  # drawn from what report.json holds
    text = markdown(report)
    write_text(out / "report.md", text, force)
    return report


def _points(n: float) -> str:
    return f"{n:g} point{'' if n == 1 else 's'}"


def _not_faster(result) -> str:
    """One plain line for each precision whose pruned model is not measured faster than the unpruned one."""
    notes = []
    for precision in ("float", "int8"):
        comps = [c for c in result.comparisons if c.precision == precision]
        if comps and not any(c.verdict == "faster" for c in comps):
            verdicts = ", ".join(f"{c.verdict} at batch {c.batch_size}" for c in comps)
            notes.append(f"the pruned {precision} model is not faster than the unpruned one here ({verdicts})"
                         + ("" if precision == "int8" else ": too few whole channels could go; fine-tune longer or with a higher "
                            "`sparsity`, or allow a larger `max_drop`"))
    return "; ".join(notes)


def file_figures(export: ExportReport) -> tuple[float, float]:
    """(ONNX Runtime top-1, max |diff| vs PyTorch) of the file an export report describes: an int8
    export's own figures, not those of the float graph it was quantised from."""
    q = export.quantization
    top1 = export.accuracy.get("int8" if q else "onnx", float("nan"))
    return top1, q["max_abs_diff"] if q else export.max_abs_diff


def _speedup(c: Comparison) -> str:
    if c.speedup is None:
        return c.verdict
    return f"{c.speedup:.3f}x [{c.speedup_low:.3f}, {c.speedup_high:.3f}] {c.verdict}"


def markdown(report: DemoReport) -> str:
    c = report.config
    lines = [
        "# gaborprune demo", "",
        f"`{c.model}` on `{c.data}`: trained {c.train_epochs} epochs; first {c.layers} convolutions converted to Gabor banks "
        f"(fitted to the layers' outputs on {c.calibration_images} training images); "
        f"fine-tuned {c.finetune_epochs} epochs at sparsity {c.sparsity}; pruned within {_points(c.max_drop)} of top-1 on a validation split "
        f"held out from training; recovered "
        f"{c.recovery_epochs} epochs; exported to ONNX; timed against the unconverted network.", "",
        "| stage | top-1 | parameters | MACs | seconds |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {s.name} | {s.accuracy:.2f}% | {s.params:,} | {s.macs:,} | {s.seconds} |" for s in report.stages]
    if report.pruned:
        lines += ["", f"The prune: {report.pruned}."]
    lines += ["", "| Gabor layer | kernels kept | of | removed |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {k} | {t} | {1 - k / t:.0%} |" for n, (k, t) in report.kernels.items()]
    lines += ["", f"Kernels removed over the converted layers: {report.removed:.0%}.", "",
              "| ONNX file | size | parameters | MACs executed | top-1 (ONNX Runtime) | max abs diff vs PyTorch |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("baseline", "pruned", "baseline-int8", "pruned-int8"):
        e = report.onnx[name]
        top1, diff = file_figures(e)
        lines.append(f"| {name}.onnx | {e.file_bytes / 1024:.0f} KiB | {e.params:,} | {e.macs_executed:,} | "
                     f"{top1:.2f}% | {diff:.1e} |")
    lines += ["", "Latency (ONNX Runtime, 1 thread, interleaved; median per batch with its 95% interval):", "",
              "| model | precision | batch | median ms | 95% interval |", "|---|---|---:|---:|---|"]
    for r in report.latency.results:
        lines.append(f"| {r.model} | {r.precision} | {r.batch_size} | {r.latency.p50:.3f} | [{r.interval.low:.3f}, {r.interval.high:.3f}] |")
    lines += ["", "| pruned against unpruned | batch | speedup [95% interval] | executed-MAC ratio | efficiency |", "|---|---:|---|---:|---:|"]
    for comp in report.latency.comparisons:
        eff = comp.efficiency
        lines.append(f"| {comp.precision} | {comp.batch_size} | {_speedup(comp)} | {comp.mac_ratio:.3f} | "
                     f"{'n/a' if eff is None else f'{eff:.2f}'} |")
    if report.note:
        lines += ["", f"**Note:** {report.note}."]
    env = report.latency.environment
    lines += ["", f"Machine: {env.get('cpu')}, {env.get('cores')} cores, 1-minute load {env.get('load_average') or 0:.2f} when timing began; "
                  f"onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}; {env.get('date')}. Timings depend on the machine.",
              "", "Pictures: `banks-converted.png`, `banks-before-pruning.png`, `banks-after-pruning.png` (before and after, side by side), `latency.png`, "
                  "`summary.png` (baseline against pruned).", ""]
    return "\n".join(lines)
