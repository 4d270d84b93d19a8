"""`reproduce`: the seed papers' experiments by name, each recipe written down in one place.

`NAMES` is the registry: the Gabor paper's two experiments (`EXPERIMENTS`) and the CADA paper's
ablation (`ABLATION`, run by `gaborprune.ablation`). Each Gabor experiment trains, per seed, the
plain network and the Gabor network with the same recipe (data, epochs, optimiser, schedule); the
Gabor network also gets the sparsity pressure, then is pruned at the threshold. It reports
accuracies, kernels kept per Gabor layer and the share removed, per seed and as mean and standard
deviation.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gaborprune._io import check_outputs, write_json, write_text
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import ConversionSpec, gaborize_
from gaborprune.data import DataSpec, load_data
from gaborprune.errors import GaborPruneError
from gaborprune.models import ModelSource
from gaborprune.prune import PruneSpec, prune_model_
from gaborprune.recipe import load_model, save_recipe
from gaborprune.train import TrainConfig, evaluate, finetune_


@dataclass(frozen=True)
class Experiment:
    """One experiment of the seed paper.

    Attributes:
        model, model_args: the Gabor network's source; `plain_args` builds the plain one from the same
            source (None: the same network before `convert`).
        convert: layers made Gabor banks (random init: trained from scratch), None if the source has them.
        train: the recipe shared by both networks; `sparsity` applies to the Gabor network only.
        paper: what the paper reports, for the table.
    """

    name: str
    model: str
    model_args: dict = field(default_factory=dict)
    plain_args: dict | None = None
    convert: ConversionSpec | None = None
    train: TrainConfig = TrainConfig(structure="kernel")
    sparsity: float = 0.03
    threshold: float = PruneSpec().threshold
    paper: str = ""


# the kernel pressure: the paper counts kernels, and a channel pressure would change those counts
_CIFAR = TrainConfig(epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_epochs=2,
                     structure="kernel")

EXPERIMENTS = {
    "vgg16-cifar10": Experiment(
        "vgg16-cifar10", "vgg16", convert=ConversionSpec(first=1, init="random"), train=_CIFAR, sparsity=0.03,
        paper="first layer: 29.4 of 192 kernels needed on average",
    ),
    "resnet20-altered-cifar10": Experiment(
        "resnet20-altered-cifar10", "resnet20_altered", plain_args={"gabor": False}, train=_CIFAR, sparsity=0.03,
        paper="83% and 94% of the kernels of the two Gabor layers removed",
    ),
}


#: The CADA paper's ablation (`gaborprune.ablation.run_ablation`), run by `reproduce` under this name.
ABLATION = "cada-ablation"
#: Every experiment `reproduce` runs, by name.
NAMES = (*EXPERIMENTS, ABLATION)


@dataclass
class SeedResult:
    seed: int
    plain_accuracy: float
    gabor_accuracy: float
    pruned_accuracy: float
    kernels: dict[str, list[int]]  # {layer: [kept, total]}


@dataclass
class ReproduceReport:
    experiment: Experiment
    data: str
    epochs: int  # what ran (the experiment records the recipe as written)
    warmup_epochs: float
    seeds: list[SeedResult] = field(default_factory=list)

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

        layers = list(self.seeds[0].kernels) if self.seeds else []
        return {
            "plain_accuracy": stats([s.plain_accuracy for s in self.seeds]),
            "gabor_accuracy": stats([s.gabor_accuracy for s in self.seeds]),
            "pruned_accuracy": stats([s.pruned_accuracy for s in self.seeds]),
            "kernels_kept": {n: stats([s.kernels[n][0] for s in self.seeds]) for n in layers},
            "removed": {n: stats([1 - s.kernels[n][0] / s.kernels[n][1] for s in self.seeds]) for n in layers},
        }

    def to_dict(self) -> dict:
        e = self.experiment
        recipe = asdict(e) | {"train": e.train.to_dict(), "convert": e.convert.to_dict() if e.convert else None}
        return {"experiment": recipe, "data": self.data, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs, "seeds": [asdict(s) for s in self.seeds],
                "summary": self.summary()}

    def to_markdown(self) -> str:
        e, s = self.experiment, self.summary()

        def ms(d: dict, fmt: str = ".2f") -> str:
            return f"{d['mean']:{fmt}} ± {d['std']:{fmt}}"

        lines = [f"# {e.name}", "", f"Data `{self.data}`, {self.epochs} epochs ({self.warmup_epochs:g} of warm-up), {len(self.seeds)} seed(s); "
                 f"sparsity {e.sparsity}, threshold {e.threshold}. Paper: {e.paper}.", "",
                 "| seed | plain top-1 | Gabor top-1 | pruned top-1 | " + " | ".join(f"{n} kept" for n in s["kernels_kept"]) + " |",
                 "|---:|---:|---:|---:|" + "---:|" * len(s["kernels_kept"])]
        for r in self.seeds:
            kept = " | ".join(f"{k}/{t} ({1 - k / t:.0%} removed)" for k, t in r.kernels.values())
            lines.append(f"| {r.seed} | {r.plain_accuracy:.2f}% | {r.gabor_accuracy:.2f}% | {r.pruned_accuracy:.2f}% | {kept} |")
        kept = " | ".join(f"{ms(v, '.1f')} ({s['removed'][n]['mean']:.0%} removed)" for n, v in s["kernels_kept"].items())
        lines.append(f"| mean ± std | {ms(s['plain_accuracy'])}% | {ms(s['gabor_accuracy'])}% | {ms(s['pruned_accuracy'])}% | {kept} |")
        return "\n".join(lines) + "\n"

    markdown = to_markdown  # the name before every report's was `to_markdown`


def reproduce(name: str, data: str, *, seeds: int = 1, epochs: int | None = None, settings: list[str] | None = None,
              input_shape: tuple[int, int, int] | None = None, out: str | Path | None = None,
              device: torch.device = torch.device("cpu"), on_stage: Callable[[str], None] = lambda s: None,
              on_epoch: Callable[[dict], None] | None = None, force: bool = False):
    """Run experiment `name` (one of `NAMES`) on `data` for `seeds` seeds (0, 1, ...); `epochs`
    overrides the recipe's (toy runs); recipes and results (results.md, results.json) go to `out`
    when given. `settings` and `input_shape` choose the ablation's rows and image size.

    Returns:
        a `ReproduceReport`, or for the ablation an `AblationReport`; both have `to_dict` and `to_markdown`.
    """
    if name not in NAMES:
        raise GaborPruneError(f"unknown experiment '{name}'; known: {', '.join(NAMES)}")
    if name == ABLATION:
        from gaborprune.ablation import run_ablation

        return run_ablation(data, seeds=seeds, settings=settings, epochs=epochs, input_shape=input_shape, out=out, device=device,
                            on_stage=on_stage, on_epoch=on_epoch, force=force)
    if settings or input_shape:
        raise GaborPruneError(f"{'`settings`' if settings else '`input_shape`'} applies to {ABLATION} only, not to '{name}'")
    return _gabor(name, data, seeds=seeds, epochs=epochs, out=out, device=device, on_stage=on_stage, on_epoch=on_epoch, force=force)


def _gabor(name: str, data: str, *, seeds: int, epochs: int | None, out, device: torch.device, on_stage, on_epoch, force: bool) -> ReproduceReport:
    """One of the Gabor paper's `EXPERIMENTS`, as `reproduce` describes."""
    if seeds < 1:
        raise GaborPruneError(f"`seeds` must be at least 1, not {seeds}")
    e = EXPERIMENTS[name]
    spec = DataSpec.parse(data)
    # a shorter run keeps the recipe's share of warm-up (2 of 160 epochs), at most a quarter of it
    train_config = replace(e.train, epochs=epochs, warmup_epochs=min(e.train.warmup_epochs, epochs // 4)) if epochs is not None else e.train
    report = ReproduceReport(e, str(spec), train_config.epochs, train_config.warmup_epochs)
    out = Path(out) if out is not None else None
    if out is not None:  # before any training
        check_outputs([out / n for n in ("results.md", "results.json")]
                      + [out / f"{name}-{kind}-seed{seed}.pt" for seed in range(seeds) for kind in ("plain", "gabor")], force)

    train, test = load_data(spec, ModelSource(e.model).input_shape())
    # toy data smaller than the recipe's batch: one batch of all of it (finetune refuses a larger batch)
    train_config = replace(train_config, batch_size=min(train_config.batch_size, len(train)))
    for seed in range(seeds):
        config = replace(train_config, seed=seed)
        accuracies = {}
        for kind in ("plain", "gabor"):
            on_stage(f"seed {seed}: training the {kind} network ({config.epochs} epochs)")
            torch.manual_seed(seed)
            args = e.plain_args if kind == "plain" and e.plain_args is not None else e.model_args
            model, recipe = load_model(e.model, model_args=args, num_classes=train.num_classes)
            if kind == "gabor" and e.convert is not None:
                recipe = recipe.with_step(gaborize_(model, replace(e.convert, seed=seed), recipe.input_shape).step)
            cfg = replace(config, sparsity=e.sparsity if kind == "gabor" else 0.0)
            recipe = recipe.with_step(finetune_(model, recipe, train, test, cfg, device=device, data_name=str(spec), on_epoch=on_epoch).step)
            accuracies[kind] = evaluate(model, test.to(device), device).top1
            if kind == "gabor":
                total = {n: m.mask.numel() for n, m in model.named_modules() if isinstance(m, GaborConv2d)}
                recipe = recipe.with_step(prune_model_(model.cpu(), recipe.input_shape, PruneSpec(threshold=e.threshold)).step)
                accuracies["pruned"] = evaluate(model.to(device), test.to(device), device).top1
                kernels = {n: [m.kernels_alive, total[n]] for n, m in model.named_modules() if isinstance(m, GaborConv2d)}
            if out is not None:
                save_recipe(out / f"{name}-{kind}-seed{seed}.pt", model.cpu(), recipe, force=force)
        report.seeds.append(SeedResult(seed, accuracies["plain"], accuracies["gabor"], accuracies["pruned"], kernels))
    if out is not None:
        write_json(out / "results.json", report.to_dict(), force)
        text = report.to_markdown()
        write_text(out / "results.md", text, force)
    return report
