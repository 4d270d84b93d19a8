"""Benchmark one training step of a plain network against the same network with Gabor banks.

A step is forward + cross-entropy + backward + SGD step (momentum 0.9, weight decay 5e-4) on a fixed
random batch of Tensor[B, 3, 32, 32] with random labels, on the CPU or (`--device cuda`) on the GPU as
`finetune_` runs there: channels_last, bf16 autocast (`--no-amp`: float32), the batch already on the
device, the clock read after `torch.cuda.synchronize()`. Variants:

- built-in `resnet20`: plain, ConversionSpec(first=1) (the stem) and ConversionSpec(first=3);
- built-in `vgg16`: plain and ConversionSpec(first=2).

With `--sparsity S` each Gabor step also adds S x the sparsity penalty, and each Gabor variant runs
twice: with the penalty computing every bank's kernels again, and reusing the forward pass's kernels
(`GaborSparsity.track_forward`, what `finetune_` does).

The banks start from `init="random"`: step time does not depend on the values, and it skips the
fit (timed by bench_convert.py). After `--warmup` untimed steps per variant, the variants of one model
take turns, one step each, for `--steps` rounds (the order rotating every round), so drift of a shared
machine hits all of them alike. Reported: median and minimum step time, images/s at the median, and
the Gabor/plain ratio of the medians and the median of the per-round ratios. The issue's target is a
Gabor step of at most 1.10x the plain one. The last column isolates the banks' own extra work, which a
plain convolution does not do: the median time to compute all bank kernels from their parameters and
back-propagate into them (`--steps` times per variant, outside the timed steps).

Run (from the repository root). With the defaults it should take about 2 minutes on two idle cores;
on a shared 2-core machine it took 6 to 12 minutes (3.5 with --threads 1; see docs/benchmarks.md),
so lower `--steps` or `--batch-size`, or pick `--models`, for a quick look:

    .venv/bin/python benchmarks/bench_train_step.py
    .venv/bin/python benchmarks/bench_train_step.py --steps 20 --batch-size 64 --json out/bench_train_step.json
    python benchmarks/bench_train_step.py --device cuda --batch-size 256 --steps 50 --warmup 10 --sparsity 0.01
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import gaborprune
from gaborprune._threads import machine_note
from gaborprune.sparsity import GaborSparsity

#: model -> the `first` values to compare with the plain model (0 = plain).
CASES = {"resnet20": (0, 1, 3), "vgg16": (0, 2)}
TARGET_RATIO = 1.10


def make_variant(model_name: str, first: int, device: torch.device) -> torch.nn.Module:
    model, recipe = gaborprune.load_model(model_name)
    if first:
        gaborprune.gaborize_(model, gaborprune.ConversionSpec(first=first, init="random"), recipe.input_shape)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model.train()


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES), help="which models (default all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="CUDA: bf16 autocast (default on)")
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="add the sparsity penalty to the Gabor steps; each Gabor variant then runs twice, its kernels "
                             "computed again for the penalty and reused from the forward pass (finetune's way)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_note(), flush=True)
    device = torch.device(args.device)
    amp = device.type == "cuda" and args.amp
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    rows = []
    for model_name in args.models:
        torch.manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, 32, 32).to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
        y = torch.randint(0, 10, (args.batch_size,)).to(device)
        variants = []
        for first in CASES[model_name]:
            for penalty in ("recomputed", "reused") if first and args.sparsity else (None,):
                torch.manual_seed(args.seed)
                model = make_variant(model_name, first, device)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                sparsity = GaborSparsity(model, (3, 32, 32))
                variants.append({"first": first, "penalty": penalty, "model": model, "opt": opt, "sparsity": sparsity, "times": []})

        def step(v: dict) -> float:
            start = clock(device)
            v["opt"].zero_grad(set_to_none=True)
            with v["sparsity"].track_forward() if v["penalty"] == "reused" else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                    loss = F.cross_entropy(v["model"](x), y)
                if v["penalty"]:
                    loss = loss + args.sparsity * v["sparsity"].penalty()
            loss.backward()
            v["opt"].step()
            return clock(device) - start

        def bank_weights(v: dict) -> float:
            """Seconds to compute every bank's kernels from its parameters and back-propagate into them."""
            banks = [m for m in v["model"].modules() if isinstance(m, gaborprune.GaborConv2d)]
            if not banks:
                return 0.0
            start = clock(device)
            sum(b.weight.sum() for b in banks).backward()
            return clock(device) - start

        for v in variants:
            for _ in range(args.warmup):
                step(v)
            v["bank_times"] = [bank_weights(v) for _ in range(args.steps)]
            v["model"].zero_grad(set_to_none=True)
        for i in range(args.steps):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:  # rotate who goes first
                v["times"].append(step(v))

        plain = variants[0]["times"]
        for v in variants:
            t = v["times"]
            med = statistics.median(t)
            rows.append({
                "model": model_name,
                "variant": "plain" if not v["first"] else f"gabor first={v['first']}" + (f" + penalty ({v['penalty']})" if v["penalty"] else ""),
                "first": v["first"],
                "batch_size": args.batch_size,
                "median_ms": 1e3 * med,
                "min_ms": 1e3 * min(t),
                "images_per_s": args.batch_size / med,
                "ratio_of_medians": med / statistics.median(plain),
                "median_paired_ratio": statistics.median(a / b for a, b in zip(t, plain)),
                "bank_weights_ms": 1e3 * statistics.median(v["bank_times"]),
                "times_ms": [1e3 * s for s in t],
            })
            print(f"{model_name} {rows[-1]['variant']}: median {rows[-1]['median_ms']:.1f} ms, "
                  f"ratio {rows[-1]['ratio_of_medians']:.3f}", flush=True)

    where = (f"{torch.cuda.get_device_name(device)}, {'bf16 autocast' if amp else 'float32'}, channels_last"
             if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    print(f"\ntraining step (forward + backward + SGD), batch {args.batch_size} x 3x32x32, {args.warmup} warm-up + "
          f"{args.steps} timed steps per variant, interleaved, torch {torch.__version__}, {where}\n")
    print("| model | variant | median ms | min ms | images/s | Gabor/plain (medians) | Gabor/plain (paired) | <= 1.10x? "
          "| bank weights fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "" if not r["first"] else ("yes" if r["ratio_of_medians"] <= TARGET_RATIO else "no")
        print(f"| {r['model']} | {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['images_per_s']:.0f} "
              f"| {r['ratio_of_medians']:.3f} | {r['median_paired_ratio']:.3f} | {ok} | {r['bank_weights_ms']:.2f} |")

    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": where, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size, "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"benchmark": "train_step", **meta, "target_ratio": TARGET_RATIO, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
