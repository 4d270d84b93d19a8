"""gaborprune in your own training loop, on a torchvision detector (SSDlite320-MobileNetV3).

    python examples/own_loop.py --toy --out /tmp/own_loop            # seconds: every step, tiny sizes
    python examples/own_loop.py --images 300 --epochs 20 --out out/own_loop --threads 1

Steps: make a synthetic detection dataset (coloured shapes on noise, exact boxes); train SSDlite
with a plain PyTorch loop plus `gp.Pressure`, the sparsity pressure that drives whole channel
groups of the backbone to zero; prune them exactly (`gp.prune_model_`, recorded in the recipe);
score both models on a held-out split; export both to ONNX (`gp.export_model`) and time them with
ONNX Runtime, interleaved (`gaborprune.workflows.bench`). Everything lands in --out, with a
summary.json. Existing files are refused unless --force.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

import gaborprune as gp
from gaborprune.cpu import cpu_block
from gaborprune.workflows import BenchSettings, bench

SIDE = 320  # SSDlite320 resizes every image to 320x320, so the data is made at that size
SHAPES = ("rectangle", "ellipse", "triangle")  # labels 1..3; 0 is background in torchvision detectors
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.95], [0.95, 0.85, 0.1], [0.8, 0.2, 0.9]])
OUTPUTS = ("trained.pt", "pruned.pt", "unpruned.onnx", "pruned.onnx", "summary.json")


def make_dataset(n: int, seed: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """n images (uint8 Tensor[3, SIDE, SIDE]) with 1-3 shapes each, and their targets: "boxes"
    Tensor[k, 4] (x1, y1, x2, y2, exact) and "labels" Tensor[k] (1 + index into SHAPES)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIDE) + 0.5, torch.arange(SIDE) + 0.5, indexing="ij")  # pixel centres
    data = []
    for _ in range(n):
        img = (0.5 + 0.2 * torch.randn(3, SIDE, SIDE, generator=g)).clamp(0, 1)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            for _try in range(20):  # boxes do not overlap, so every shape is whole and its box exact
                w, h = (torch.rand(2, generator=g) * 0.3 + 0.15) * SIDE
                x0, y0 = torch.rand(1, generator=g) * (SIDE - w), torch.rand(1, generator=g) * (SIDE - h)
                box = torch.cat([x0, y0, x0 + w, y0 + h]).round()  # whole pixels: the mask fills the box to its edges
                if not boxes or box_iou(box[None], torch.stack(boxes)).max() == 0:
                    break
            else:
                continue
            x1, y1, x2, y2 = box.tolist()
            k = int(torch.randint(len(SHAPES), (1,), generator=g))
            u, v = (xs - x1) / (x2 - x1), (ys - y1) / (y2 - y1)  # [SIDE, SIDE] box coordinates in 0..1
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            mask = [inside, (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25, inside & (v >= (2 * u - 1).abs())][k]  # triangle: apex top centre
            img = torch.where(mask, COLOURS[torch.randint(len(COLOURS), (1,), generator=g)].view(3, 1, 1), img)
            boxes.append(box)
            labels.append(k + 1)
        data.append(((img * 255).to(torch.uint8), {"boxes": torch.stack(boxes), "labels": torch.tensor(labels)}))
    return data


def images_of(batch) -> list[torch.Tensor]:
    return [img.float() / 255 for img, _ in batch]  # list of Tensor[3, SIDE, SIDE] in 0..1, as torchvision detectors take


def train(model, pressure, data, epochs: int, steps: int, batch_size: int, lr: float, strength: float, warmup: int, seed: int,
          log: list | None = None) -> None:
    """A plain detector training loop; the only gaborprune line is `+ pressure()`."""
    # No weight decay: the pressure is the regulariser. Adam moves a parameter at most about `lr`
    # per step whatever its gradient's size, so a gain near 1 needs ~1/lr steps to die: once the
    # pressure dominates a gain's gradient, more steps (not more strength) make more groups die.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if pressure is not None:  # no pressure for `warmup` epochs, then a linear ramp to full strength
            pressure.strength = strength * min(1.0, max(0, epoch + 1 - warmup) / max(1, warmup))
        model.train()
        total = penalty = 0.0
        for _ in range(steps):
            batch = [data[i] for i in torch.randint(len(data), (batch_size,), generator=g)]
            losses = model(images_of(batch), [t for _, t in batch])  # {"bbox_regression", "classification"}
            loss = sum(losses.values())
            extra = pressure() if pressure is not None else loss.new_zeros(())  # strength x penalty, differentiable
            opt.zero_grad()
            (loss + extra).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # early SSD steps can spike
            opt.step()
            total, penalty = total + loss.item() / steps, penalty + extra.item() / steps
        alive = pressure.report() if pressure is not None else None  # groups (and Gabor kernels) alive
        if log is not None:
            log.append({"epoch": epoch + 1, "loss": total, "pressure": penalty} | ({"strength": pressure.strength, **alive.to_dict()} if alive else {}))
        print(f"  epoch {epoch + 1}/{epochs}: detection loss {total:.3f}, pressure {penalty:.3f}"
              + (f" (strength {pressure.strength:.2g}), {alive}" if alive else ""), flush=True)


def recalibrate(model, data, images: int = 64) -> None:
    """Re-estimate BatchNorm statistics on training images: SSDlite's BatchNorm momentum (0.03) lags
    behind a short training, and eval-mode features computed with stale statistics collapse (every
    box scores alike, and the exported detector's ties no longer match PyTorch's)."""
    batches = [data[k:k + 8] for k in range(0, min(images, len(data)), 8)]
    gp.recalibrate_norms_(model, batches, forward=lambda b: model(images_of(b), [t for _, t in b]))


@torch.no_grad()
def evaluate(model, data, score: float = 0.3) -> dict[str, float]:
    """Per ground-truth box, its best IoU with a detection of the right label scoring above `score`:
    the mean of that, and recall@0.5 (share of boxes with a best IoU of at least 0.5)."""
    model.eval()
    best = []
    for k in range(0, len(data), 8):
        batch = data[k:k + 8]
        for det, (_, t) in zip(model(images_of(batch)), batch):
            keep = det["scores"] > score
            iou = box_iou(t["boxes"], det["boxes"][keep])  # [ground truth, detections]
            iou = iou * (t["labels"][:, None] == det["labels"][keep][None, :])  # a wrong label finds nothing
            best.append(iou.max(dim=1).values if iou.shape[1] else torch.zeros(len(t["boxes"])))
    best = torch.cat(best)
    return {"recall@0.5": float((best >= 0.5).double().mean()), "mean_best_iou": float(best.double().mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300, help="training images (a quarter as many more are held out)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the training images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--strength", type=float, default=2e-3, help="the pressure's factor (its penalty is ~1660 on SSDlite's backbone)")
    p.add_argument("--warmup", type=int, default=None, help="epochs without pressure, then as many ramping it up (default: epochs/5)")
    p.add_argument("--ratio", type=float, default=0.3, help="remove this share of the removable channels, the ones the pressure weakened most")
    p.add_argument("--threshold", type=float, default=None, help="instead of --ratio: prune channel groups weaker than this x their family's strongest")
    p.add_argument("--round-to", type=int, default=None, help="channel multiple each layer keeps (default: this CPU's ONNX Runtime block)")
    p.add_argument("--recovery-steps", type=int, default=None, help="training steps without pressure after pruning (default: one epoch)")
    p.add_argument("--bench-seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=Path("own_loop_out"))
    p.add_argument("--toy", action="store_true", help="tiny sizes, to see every step run in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    a = p.parse_args(argv)
    if a.toy:
        a.images, a.epochs, a.steps_per_epoch, a.batch_size, a.bench_seconds = 16, 2, 2, 4, 3.0
        a.recovery_steps = 2 if a.recovery_steps is None else a.recovery_steps
        a.strength, a.lr = 1e-2, 3e-3  # strong enough to move something in 4 steps
        a.ratio = 0.2 if a.threshold is None else None
    existing = [f for f in OUTPUTS if (a.out / f).exists()]
    if existing and not a.force:  # refuse before minutes of training, not at the first write
        print(f"error: {a.out / existing[0]} exists; pass --force to overwrite, or choose another --out", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    gp.set_threads(a.threads)
    start = time.perf_counter()
    torch.manual_seed(a.seed)  # SSD's hard-negative sampling and the heads' initialisation

    data = make_dataset(a.images + max(4, a.images // 4), a.seed)
    train_set, held_out = data[:a.images], data[a.images:]
    model, recipe = gp.load_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=len(SHAPES) + 1, seed=a.seed)
    print(f"SSDlite320 with {len(SHAPES)} classes, input {recipe.input_shape}; {len(train_set)} training, {len(held_out)} held-out images")

    # The pressure finds the channel groups once (in the detector's `backbone`: the whole detector
    # does not trace); its penalty sums over layers, so `strength` scales ~1660 at the start.
    pressure = gp.Pressure(model, torch.rand(1, *recipe.input_shape), strength=a.strength)
    steps = a.steps_per_epoch or -(-len(train_set) // a.batch_size)
    a.recovery_steps = steps if a.recovery_steps is None else a.recovery_steps
    warmup = a.warmup if a.warmup is not None else a.epochs // 5
    log: list[dict] = []
    print(f"training {a.epochs} epochs x {steps} steps of {a.batch_size}, pressure {a.strength:g} after {warmup} warm-up epoch(s)")
    train(model, pressure, train_set, a.epochs, steps, a.batch_size, a.lr, a.strength, warmup, a.seed, log)
    recalibrate(model, train_set)
    trained = copy.deepcopy(model).eval()  # the unpruned baseline for evaluation, export and bench
    gp.save_recipe(a.out / "trained.pt", trained, recipe, force=a.force)
    before = evaluate(trained, held_out)

    # Prune: the weakest --ratio of the channels that can go (by the BatchNorm gains the pressure
    # pushed down), or those below --threshold, exactly (the compacted detector computes what the
    # masked one did); the plan goes into the recipe, which replays it on a fresh model. On the
    # 300-image run (docs/benchmarks.md) 20 epochs of pressure killed 5% of the groups: too few
    # steps for Adam to bring gains near 1 to 0, so --threshold removed 0.1% of the MACs; --ratio
    # 0.3 removes the weakest and one epoch of recovery brings the box quality back.
    spec = gp.PruneSpec(scope="all", round_to=a.round_to if a.round_to is not None else (cpu_block() or None),
                        **({"threshold": a.threshold} if a.threshold is not None else {"ratio": a.ratio}))
    report = gp.prune_model_(model.eval(), recipe.input_shape, spec)
    pruned_recipe = recipe.with_step(report.step)
    removed = sum(c.channels_before - c.channels_after for c in report.layers)
    print(f"pruned ({spec.describe()}): MACs {report.before.macs / 1e6:.1f}M -> {report.after.macs / 1e6:.1f}M "
          f"({report.after.macs / report.before.macs:.1%}), {removed} output channels removed in {len(report.layers)} layers")
    pruned = evaluate(model, held_out)
    recovered = None
    if a.recovery_steps:  # a few plain steps (no pressure: the groups were found on the old layers)
        train(model, None, train_set, 1, a.recovery_steps, a.batch_size, a.lr / 10, 0.0, 0, a.seed + 1)
        recalibrate(model, train_set)
        recovered = evaluate(model, held_out)
    gp.save_recipe(a.out / "pruned.pt", model, pruned_recipe, force=a.force)

    # Export both whole detectors (boxes, scores, labels), each checked against PyTorch in onnxruntime.
    config = gp.ExportConfig(lowering="dense", threads=a.threads)
    exports = {name: gp.export_model(m, r.input_shape, a.out / f"{name}.onnx", config, provenance=r.provenance(), force=a.force)
               for name, m, r in (("unpruned", trained, recipe), ("pruned", model, pruned_recipe))}

    # Time both files with ONNX Runtime, interleaved run by run, batch 1, one thread.
    timing = bench([str(a.out / "pruned.onnx")], baseline=[str(a.out / "unpruned.onnx")],
                   settings=BenchSettings(batch_sizes=(1,), threads=(1,), max_seconds=a.bench_seconds, runs=20 if a.toy else None))
    p50 = {r.model: r.latency.p50 for r in timing.results}
    cmp = timing.comparisons[0]
    summary = {
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
        "images": {"train": len(train_set), "held_out": len(held_out)}, "epochs": a.epochs, "steps_per_epoch": steps,
        "strength": a.strength, "training": log,
        "prune": {"spec": spec.to_dict(), "macs_before": report.before.macs, "macs_after": report.after.macs,
                  "params_before": report.before.params, "params_after": report.after.params, "channels_removed": removed,
                  "max_abs_diff": report.max_abs_diff, "warnings": report.warnings},
        "metric": {"before_prune": before, "after_prune": pruned, "after_recovery": recovered},
        "export": {n: {"path": e.path, "max_abs_diff": e.max_abs_diff, "macs": e.macs, "file_bytes": e.file_bytes} for n, e in exports.items()},
        "bench": {"p50_ms": p50, "speedup": cmp.speedup, "speedup_low": cmp.speedup_low, "speedup_high": cmp.speedup_high,
                  "verdict": cmp.verdict, "load": timing.environment.get("load_average"), "warnings": timing.warnings},
        "files": {"trained": str(a.out / "trained.pt"), "pruned": str(a.out / "pruned.pt")},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    tmp = a.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(a.out / "summary.json")  # atomic: a summary is whole or absent

    print(f"\nheld-out recall@0.5 / mean best IoU: trained {before['recall@0.5']:.1%} / {before['mean_best_iou']:.3f}, "
          f"pruned {pruned['recall@0.5']:.1%} / {pruned['mean_best_iou']:.3f}"
          + (f", after {a.recovery_steps} recovery steps {recovered['recall@0.5']:.1%} / {recovered['mean_best_iou']:.3f}" if recovered else ""))
    print(f"MACs {report.before.macs / 1e6:.1f}M -> {report.after.macs / 1e6:.1f}M, {removed} channels removed")
    base, mine = p50[str(a.out / "unpruned.onnx")], p50[str(a.out / "pruned.onnx")]
    print(f"ONNX Runtime, batch 1, 1 thread: unpruned {base:.2f} ms, pruned {mine:.2f} ms (medians); speedup {cmp.speedup:.3f}x "
          f"[{cmp.speedup_low:.3f}, {cmp.speedup_high:.3f}], {cmp.verdict}")
    print(f"wrote {a.out}/ ({', '.join(OUTPUTS)}) in {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
