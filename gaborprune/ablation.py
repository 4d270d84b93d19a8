"""`reproduce cada-ablation`: the second seed paper's ablation axes on one small network.

Every setting trains the same network (`cada_net`: a stem, stride-2 downsampling layers and residual
blocks around one spatial "mixer" each) with the same recipe; only the mixers, and for the
downsampling axis the downsampling layers, differ. They are converted with `convert --to cada`
machinery (`ConversionSpec(to="cada")`), so every setting is a replayable recipe. Reported per
setting: final top-1 on the test split (mean and std over seeds, no selection on the test split),
parameters, MACs per image, and the ONNX Runtime latency of the exported model, all settings timed
side by side. The paper's qualitative findings are then checked against the numbers, each with a
verdict that accounts for the seed-to-seed noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gaborprune._io import check_outputs, write_json, write_text
from gaborprune.convert.spec import ConversionSpec, gaborize_
from gaborprune.data import DataSpec, load_data
from gaborprune.errors import GaborPruneError
from gaborprune.recipe import load_model, save_recipe
from gaborprune.summary import summarize
from gaborprune.train import TrainConfig, evaluate, finetune_

MIXERS = r"re:stages\.\d+\.blocks\.\d+\.mixer"
DOWNS = r"re:stages\.\d+\.down\.0"


@dataclass(frozen=True)
class Setting:
    """One row of the ablation.

    Attributes:
        mixers, down: CADA knobs (ConversionSpec fields: kernel_size, invariance, bases, context,
            rel_pos, ...) for the blocks' 3x3 mixers and for the stride-2 downsampling layers; None
            keeps those layers plain 3x3 convolutions.
    """

    name: str
    axis: str
    mixers: dict | None
    down: dict | None = None

    def specs(self) -> list[ConversionSpec]:
        return [ConversionSpec(targets=(target,), to="cada", **knobs)
                for target, knobs in ((MIXERS, self.mixers), (DOWNS, self.down)) if knobs is not None]

    def describe(self) -> str:
        def one(knobs: dict | None) -> str:
            if knobs is None:
                return "3x3 conv"
            spec = ConversionSpec(targets=("x",), to="cada", **knobs)
            k, c = spec.kernel_size or 3, spec.cada_knobs()
            if spec.invariance == "strict":
                return f"depthwise k={k}"
            text = {"relaxed": f"CADA k={k} B={c['bases']}", "none": f"no invariance k={k}"}[spec.invariance]
            text += f" r={c['context']}" if c["context"] else " no context"
            return text + (" +rel.pos." if spec.rel_pos else "")

        return one(self.mixers) + ("" if self.down is None else f"; downsampling: {one(self.down)}")


_CADA7 = dict(kernel_size=7)
SETTINGS = (
    Setting("conv3", "reference", None),
    Setting("dw3", "locality", dict(invariance="strict", kernel_size=3)),
    Setting("dw7", "locality", dict(invariance="strict", kernel_size=7)),
    Setting("cada3", "locality", dict(kernel_size=3)),
    Setting("cada7", "CADA", _CADA7),
    Setting("cada7-noctx", "context awareness", dict(_CADA7, context=0)),
    Setting("cada7-r1", "context size", dict(_CADA7, context=1)),
    Setting("cada7-none", "spatial invariance", dict(_CADA7, invariance="none")),
    Setting("cada7-relpos", "relative position", dict(_CADA7, rel_pos=True)),
    Setting("down-dw3", "downsampling", _CADA7, down=dict(invariance="strict", kernel_size=3)),
    Setting("down-dw7", "downsampling", _CADA7, down=dict(invariance="strict", kernel_size=7)),
    Setting("down-cada7", "downsampling", _CADA7, down=_CADA7),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)


@dataclass(frozen=True)
class Finding:
    """A qualitative finding of the paper, as comparisons of mean accuracies.

    kind: "better" (each pair's first beats its second), "not worse" (the first is not worse), or
    "saturates" (each pair's gain, larger k minus smaller k, is within the noise).
    """

    claim: str
    kind: str
    pairs: tuple[tuple[str, str], ...]


FINDINGS = (
    Finding("depthwise accuracy saturates with larger k, and CADA follows", "saturates", (("dw7", "dw3"), ("cada7", "cada3"))),
    Finding("context awareness is the crucial property", "better", (("cada7", "cada7-noctx"),)),
    Finding("a small context is enough (r=1 vs r=3)", "not worse", (("cada7-r1", "cada7"),)),
    Finding("no spatial invariance trains badly", "better", (("cada7", "cada7-none"),)),
    Finding("relaxed invariance beats strict", "better", (("cada7", "dw7"), ("cada3", "dw3"))),
    Finding("relative position helps", "better", (("cada7-relpos", "cada7"),)),
    Finding("locality matters more for downsampling", "better", (("down-dw3", "down-dw7"),)),
    Finding("relaxed invariance can stand in for locality in downsampling", "not worse", (("down-cada7", "down-dw3"),)),
)


@dataclass(frozen=True)
class Scale:
    """Network width, input size and training recipe; `for_data` picks one for a dataset."""

    widths: tuple[int, ...]
    input_shape: tuple[int, int, int]
    train: TrainConfig

    @classmethod
    def for_data(cls, spec: DataSpec) -> Scale:
        if spec.kind in ("digits", "fake"):  # 8x8 images: 16x16 loses nothing and costs a quarter of 32x32
            return cls((16, 32, 64), (3, 16, 16), TrainConfig(epochs=15, batch_size=64, lr=0.05))
        return cls((32, 64, 128), (3, 32, 32), TrainConfig(epochs=100, batch_size=128, lr=0.1, warmup_epochs=2))


@dataclass
class Row:
    setting: str
    axis: str
    description: str
    accuracies: list[float]
    params: int
    macs: int
    latency_ms: float | None = None  # ONNX Runtime p50, batch 1

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


@dataclass
class AblationReport:
    data: str
    scale: Scale
    seeds: int
    test_images: int
    rows: list[Row] = field(default_factory=list)
    latency_threads: int = 1

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.setting == name), None)

    def noise(self, a: Row, b: Row) -> float:
        """Two standard errors of a difference of means, at least one test image (in points)."""
        se = math.sqrt((a.std**2 + b.std**2) / self.seeds)
        return max(2 * se, 100 / self.test_images)

    def verdicts(self) -> list[dict]:
        out = []
        for f in FINDINGS:
            rows = [(self.row(a), self.row(b)) for a, b in f.pairs]
            if any(a is None or b is None for a, b in rows):
                out.append({"claim": f.claim, "verdict": "not run", "comparisons": []})
                continue
            comparisons = [{"a": a.setting, "b": b.setting, "diff": a.mean - b.mean, "noise": self.noise(a, b)} for a, b in rows]
            out.append({"claim": f.claim, "verdict": verdict(f.kind, comparisons), "comparisons": comparisons})
        return out

    def to_dict(self) -> dict:
        scale = {"widths": list(self.scale.widths), "input_shape": list(self.scale.input_shape), "train": self.scale.train.to_dict()}
        return {"data": self.data, "scale": scale, "seeds": self.seeds, "test_images": self.test_images,
                "latency_threads": self.latency_threads,
                "rows": [asdict(r) | {"mean": r.mean, "std": r.std} for r in self.rows], "findings": self.verdicts()}

    def to_markdown(self) -> str:
        t = self.scale.train
        shape = "x".join(map(str, self.scale.input_shape))
        ref = self.row("dw3") or self.rows[0]
        lines = [
            "# CADA ablation", "",
            f"`cada_net` (widths {', '.join(map(str, self.scale.widths))}) on `{self.data}` at {shape}: {t.epochs} epochs, "
            f"batch {t.batch_size}, {t.optimizer} lr {t.lr}; {self.seeds} seed(s); final top-1 on {self.test_images} test images. "
            f"MACs per image; latency: ONNX Runtime p50 at batch 1, {self.latency_threads} thread(s), all settings timed side by side.",
            "",
            f"| setting | axis | layers | top-1 % | params | MACs | latency ms | latency vs {ref.setting} |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            acc = f"{r.mean:.2f} ± {r.std:.2f}" if self.seeds > 1 else f"{r.mean:.2f}"
            lat = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
            ratio = f"{r.latency_ms / ref.latency_ms:.2f}x" if r.latency_ms and ref.latency_ms else "-"
            lines.append(f"| {r.setting} | {r.axis} | {r.description} | {acc} | {r.params:,} | {r.macs:,} | {lat} | {ratio} |")
        lines += ["", "## The paper's findings at this scale", "",
                  "A difference counts when it exceeds the noise: two standard errors of the difference of the means "
                  "over seeds, and at least one test image. `consistent`: a finding that predicts no difference (a small "
                  "context is enough, saturation, a stand-in) found none, which near an accuracy ceiling says little."
                  + (" With one seed the spread over seeds is unknown and only the one-image floor applies: run `seeds` 3 or more."
                     if self.seeds == 1 else ""), "",
                  "| finding | comparison (difference of mean top-1, points) | verdict |", "|---|---|---|"]
        for v in self.verdicts():
            comp = "; ".join(f"{c['a']} - {c['b']}: {c['diff']:+.2f} (noise {c['noise']:.2f})" for c in v["comparisons"]) or "-"
            lines.append(f"| {v['claim']} | {comp} | {v['verdict']} |")
        return "\n".join(lines) + "\n"

    markdown = to_markdown  # the name before every report's was `to_markdown`


def verdict(kind: str, comparisons: list[dict]) -> str:
    """From differences and their noise (see `Finding`): "better" findings are supported,
    contradicted or within noise; findings that predict no difference are consistent (none beyond
    the noise, which near an accuracy ceiling says little) or contradicted / not supported."""
    signs = [0 if abs(c["diff"]) <= c["noise"] * (1 + 1e-9) else (1 if c["diff"] > 0 else -1) for c in comparisons]  # rounding: one image is noise
    if kind == "better":
        if all(s > 0 for s in signs):
            return "supported"
        return "contradicted" if any(s < 0 for s in signs) else "within noise"
    if kind == "not worse":  # predicts no loss: finding none is consistent, not proof
        return "contradicted" if any(s < 0 for s in signs) else "consistent"
    if kind == "saturates":
        if all(s == 0 for s in signs):
            return "consistent"
        return "same trend, not saturated" if len(set(signs)) == 1 else "not supported"
    raise ValueError(f"unknown finding kind '{kind}'")


def run_ablation(data: str, *, seeds: int = 1, settings: list[str] | None = None, epochs: int | None = None,
                 input_shape: tuple[int, int, int] | None = None, out: str | Path | None = None,
                 device: torch.device = torch.device("cpu"), latency_threads: int = 1, latency_runs: int = 300,
                 on_stage: Callable[[str], None] = lambda s: None, on_epoch: Callable[[dict], None] | None = None,
                 force: bool = False) -> AblationReport:
    """Train every chosen setting for `seeds` seeds on `data`; export the seed-0 models to `out`
    (SETTING.onnx, with the recipes SETTING-seedK.pt and results.md / results.json) and time them.
    `epochs` and `input_shape` override the scale's (toy runs, other image sizes)."""
    if seeds < 1:
        raise GaborPruneError(f"`seeds` must be at least 1, not {seeds}")
    unknown = [s for s in settings or [] if s not in SETTING_NAMES]
    if unknown:
        raise GaborPruneError(f"unknown ablation setting '{unknown[0]}'; known: {', '.join(SETTING_NAMES)}")
    chosen = [s for s in SETTINGS if settings is None or s.name in settings]
    spec = DataSpec.parse(data)
    scale = Scale.for_data(spec)
    scale = replace(scale, input_shape=input_shape or scale.input_shape,
                    train=replace(scale.train, epochs=epochs) if epochs is not None else scale.train)
    out = Path(out) if out is not None else None
    if out is not None:
        names = ["results.md", "results.json"] + [f"{s.name}{end}" for s in chosen
                                                   for end in [".onnx"] + [f"-seed{k}.pt" for k in range(seeds)]]
        check_outputs([out / name for name in names], force)  # before any training

    train, test = load_data(spec, scale.input_shape)
    # toy data smaller than the scale's batch: one batch of all of it (finetune refuses a larger batch)
    scale = replace(scale, train=replace(scale.train, batch_size=min(scale.train.batch_size, len(train))))
    report = AblationReport(str(spec), scale, seeds, len(test), latency_threads=latency_threads)
    models = {}
    for setting in chosen:
        accuracies = []
        for seed in range(seeds):
            on_stage(f"{setting.name} ({setting.describe()}), seed {seed}: training {scale.train.epochs} epochs")
            torch.manual_seed(seed)
            model, recipe = load_model("cada_net", num_classes=train.num_classes, model_args={"widths": list(scale.widths)},
                                       input_shape=scale.input_shape)
            for conversion in setting.specs():
                recipe = recipe.with_step(gaborize_(model, replace(conversion, seed=seed), recipe.input_shape).step)
            result = finetune_(model, recipe, train, test, replace(scale.train, seed=seed), device=device, data_name=str(spec), on_epoch=on_epoch)
            recipe = recipe.with_step(result.step)
            accuracies.append(evaluate(model, test.to(device), device).top1)
            model.cpu()
            if out is not None:
                save_recipe(out / f"{setting.name}-seed{seed}.pt", model, recipe, force=force)
            if seed == 0:
                models[setting.name] = (model, recipe)
        counts = summarize(models[setting.name][0], scale.input_shape)
        report.rows.append(Row(setting.name, setting.axis, setting.describe(), accuracies, counts.params, counts.macs))

    if out is not None:
        _time_exports(report, models, out, latency_runs, on_stage, force)
        write_json(out / "results.json", report.to_dict(), force)
        text = report.to_markdown()
        write_text(out / "results.md", text, force)
    return report


def _time_exports(report: AblationReport, models: dict, out: Path, runs: int, on_stage, force: bool) -> None:
    """Export each seed-0 model (checked against PyTorch) and time them all, interleaved."""
    from gaborprune.export.api import ExportConfig, export_model
    from gaborprune.export.runtime import session, time_interleaved

    config = ExportConfig(threads=report.latency_threads)
    for name, (model, recipe) in models.items():
        on_stage(f"{name}: exporting to ONNX")
        export_model(model, recipe.input_shape, out / f"{name}.onnx", config, provenance=recipe.provenance(), force=force)
    on_stage(f"timing {len(models)} ONNX models side by side ({runs} runs each)")
    sessions = [session(out / f"{name}.onnx", threads=report.latency_threads) for name in models]
    x = np.random.default_rng(0).standard_normal((1, *report.scale.input_shape), dtype=np.float32)
    for row, latency in zip(report.rows, time_interleaved(sessions, x, warmup=20, runs=runs)):
        row.latency_ms = latency.p50
