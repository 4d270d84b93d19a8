"""Benchmark `prune`: how long pruning a real network takes, which dead channels it can cut out
exactly, and how far the compacted model is from the masked one.

For each model, the first convolution becomes a (randomly initialised) Gabor bank, every BatchNorm
gets random statistics, and a quarter of the bank's output channels are made dead (BN gain 0),
half of them emitting 0 after the activation (BN shift -1) and half a non-zero constant (shift +0.5).
Then `gaborprune.prune_model_(model, input_shape, PruneSpec(threshold=1e-6))` removes exactly those
channels' kernels. What is timed is the whole call (kernel selection, the torch.fx channel analysis,
folding, surgery, the before/after summaries and the exactness check) on a fresh copy each
repetition; the median and minimum of `--repeats` are reported.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_prune.py
    .venv/bin/python benchmarks/bench_prune.py --repeats 3 --json out/bench_prune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import gaborprune as gp
from gaborprune._threads import machine_note

CASES = (
    ("resnet20_altered", None),  # its two stem layers are Gabor banks already
    ("vgg16", None),
    ("torchvision:resnet18", (3, 224, 224)),
    ("torchvision:vgg11_bn", (3, 224, 224)),
    ("torchvision:densenet121", (3, 224, 224)),
    ("torchvision:mobilenet_v2", (3, 224, 224)),
)


def prepare(spec: str, shape):
    torch.manual_seed(0)
    model, recipe = gp.load_model(spec, input_shape=shape)
    if not any(isinstance(m, gp.GaborConv2d) for m in model.modules()):
        recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(first=1, init="random"), recipe.input_shape).step)
    g = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        stem = norms[0]
        dead = stem.num_features // 4
        stem.weight[:dead] = 0
        stem.bias[: dead // 2] = -1.0
        stem.bias[dead // 2: dead] = 0.5
    return model.eval(), recipe, dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_note(), flush=True)

    rows = []
    for spec, shape in CASES:
        model, recipe, dead = prepare(spec, shape)
        times = []
        for _ in range(args.repeats):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = gp.prune_model_(m, recipe.input_shape, gp.PruneSpec(threshold=1e-6))
            times.append(time.perf_counter() - t0)
        stem = report.gabor_layers[0]
        reasons = sorted({k.reason.split(",")[0].split(" (")[0] for k in report.kept})
        rows.append({
            "model": spec, "input": list(recipe.input_shape), "stem": stem.name, "channels": stem.channels_before, "dead": dead,
            "removed": stem.channels_before - stem.channels_after, "kept": len(report.kept), "kept_because": reasons,
            "modules_cut": len(report.plan.channels), "macs_before": report.before.macs, "macs_after": report.after.macs,
            "max_abs_diff": report.max_abs_diff, "median_s": statistics.median(times), "min_s": min(times),
        })

    print("| model | input | stem channels | dead | removed | kept | modules cut | MACs before -> after | max abs diff | median s | min s |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['channels']} | {r['dead']} | {r['removed']} | {r['kept']} | "
              f"{r['modules_cut']} | {r['macs_before'] / 1e6:.1f}M -> {r['macs_after'] / 1e6:.1f}M | {r['max_abs_diff']:.1e} | "
              f"{r['median_s']:.2f} | {r['min_s']:.2f} |")
    for r in rows:
        if r["kept_because"]:
            print(f"- {r['model']}: kept because {'; '.join(r['kept_because'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
