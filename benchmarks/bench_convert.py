"""Benchmark `convert --init fit`: how long turning conv layers into fitted Gabor banks takes, and how
well the fit matches the kernels.

Cases:

- `torchvision:resnet50`, ConversionSpec(first=1): the 7x7 stem, 64 x 3 = 192 kernels;
- `vgg16` (built-in CIFAR VGG-16), ConversionSpec(first=2): 192 + 4096 kernels of 3x3.

Each case is fitted to two kinds of target weights:

- `random-init`: the model's own (Kaiming) random initialisation. No pretrained weights are available
  offline, and random kernels are not Gabor-like, so their fit error is an upper bound, not a figure
  of merit;
- `gabor+noise`: the converted layers' weights are replaced by Gabor kernels drawn with
  `gaborprune.convert.fit.random_gabor` plus Gaussian noise of 10% of each kernel's norm (`--noise`),
  a stand-in for trained first layers, which are Gabor-like. Here a good fit recovers the Gabor and
  its error is close to the noise level.

What is timed is the whole `gaborprune.gaborize_(model, spec, input_shape)` call (layer selection by a
forward pass in execution order, building the banks, the least-squares fit, the recipe record) on a
fresh copy of the model each repetition; building the model is not timed. Timings are repeated
`--repeats` times, the two targets alternating, and the median and minimum are reported. The fit
error is the per-kernel relative error ||w - g|| / ||w|| (median over every converted kernel) and the
report's layer-level error ||W - G||_F / ||W||_F.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_convert.py                 # 5 repeats, 2 threads
    .venv/bin/python benchmarks/bench_convert.py --repeats 3 --json out/bench_convert.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time

import torch

import gaborprune
from gaborprune._threads import machine_note
from gaborprune.convert.fit import random_gabor
from gaborprune.convert.spec import select_layers

CASES = (("torchvision:resnet50", 1), ("vgg16", 2))
TARGETS = ("random-init", "gabor+noise")
DEFAULT_FIT_STEPS = gaborprune.ConversionSpec(first=1).fit_steps  # what `convert` uses unless told


def gaborlike_(model: torch.nn.Module, names: list[str], noise: float, seed: int) -> float:
    """Overwrite the weights of the convolutions `names` with random Gabor kernels plus Gaussian noise
    of `noise` times each kernel's norm. Returns the median per-kernel ||noise|| / ||weight||."""
    g = torch.Generator().manual_seed(seed)
    ratios = []
    for name in names:
        conv = model.get_submodule(name)
        c_out, c_in, kh, kw = conv.weight.shape
        clean = random_gabor((c_out, c_in), (kh, kw), fan_in=c_in * kh * kw, generator=g).kernel((kh, kw))
        scale = clean.flatten(2).norm(dim=-1)[..., None, None] / math.sqrt(kh * kw)
        n = torch.randn(clean.shape, generator=g, dtype=clean.dtype) * noise * scale
        weight = clean + n
        with torch.no_grad():
            conv.weight.copy_(weight)
        ratios.append((n.flatten(2).norm(dim=-1) / weight.flatten(2).norm(dim=-1)).flatten())
    return float(torch.cat(ratios).median())


def per_kernel_errors(original: torch.nn.Module, converted: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """||w - g|| / ||w|| for every kernel of the converted layers, flattened."""
    errors = []
    with torch.no_grad():
        for name in names:
            w = original.get_submodule(name).weight.double().flatten(2)
            g = converted.get_submodule(name).weight.double().flatten(2)
            errors.append(((w - g).norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30)).flatten())
    return torch.cat(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed conversions per case and target (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--noise", type=float, default=0.1, help="noise / kernel norm of the gabor+noise target (default 0.1)")
    parser.add_argument("--fit-steps", type=int, default=DEFAULT_FIT_STEPS, help="refinement steps of the fit (default: the spec's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_note(), flush=True)
    torch.manual_seed(args.seed)

    rows = []
    for spec_name, first in CASES:
        spec = gaborprune.ConversionSpec(first=first, fit_steps=args.fit_steps)
        base, recipe = gaborprune.load_model(spec_name)
        names = select_layers(base, spec, recipe.input_shape)
        models = {"random-init": base, "gabor+noise": copy.deepcopy(base)}
        noise_level = gaborlike_(models["gabor+noise"], names, args.noise, args.seed)
        times: dict[str, list[float]] = {t: [] for t in TARGETS}
        last: dict[str, tuple] = {}
        for _ in range(args.repeats):
            for target in TARGETS:  # alternate, so drift of a shared machine hits both
                model = copy.deepcopy(models[target])
                start = time.perf_counter()
                report = gaborprune.gaborize_(model, spec, recipe.input_shape)
                times[target].append(time.perf_counter() - start)
                last[target] = (model, report)
        for target in TARGETS:
            model, report = last[target]
            errors = per_kernel_errors(models[target], model, names)
            rows.append({
                "model": spec_name,
                "first": first,
                "layers": [layer.name for layer in report.layers],
                "kernels": sum(layer.kernels for layer in report.layers),
                "kernel_size": list(report.layers[0].kernel_size),
                "target": target,
                "noise_level": noise_level if target == "gabor+noise" else None,
                "median_s": statistics.median(times[target]),
                "min_s": min(times[target]),
                "times_s": times[target],
                "median_kernel_rel_error": float(errors.median()),
                "layer_rel_error": {layer.name: layer.fit_rel_error for layer in report.layers},
            })
            print(f"{spec_name} first={first} {target}: median {rows[-1]['median_s']:.2f} s, "
                  f"median kernel error {rows[-1]['median_kernel_rel_error']:.3f}", flush=True)

    print(f"\nconvert --init fit, fit_steps={args.fit_steps}, {args.repeats} repeats, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | layers | kernels | target | median s | min s | median kernel rel. error | layer rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kh, kw = r["kernel_size"]
        layer_err = ", ".join(f"{e:.3f}" for e in r["layer_rel_error"].values())
        target = r["target"] + (f" (noise {r['noise_level']:.3f})" if r["noise_level"] is not None else "")
        print(f"| {r['model']} | first={r['first']} ({', '.join(r['layers'])}) | {r['kernels']} ({kh}x{kw}) | {target} "
              f"| {r['median_s']:.2f} | {r['min_s']:.2f} | {r['median_kernel_rel_error']:.3f} | {layer_err} |")

    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
                "fit_steps": args.fit_steps, "noise": args.noise, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"benchmark": "convert", **meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
