"""Benchmark CADAConv2d (relaxed: B depthwise convolutions mixed per position; none: k^2 shifted
products) against one depthwise convolution of the same kernel size: forward time and the extra peak
memory of one forward pass.

Both layers get the same input Tensor[N, C, H, W]; both include their 1x1 value projection (the
depthwise baseline is 1x1 conv + depthwise k x k, the strict-invariance block). Time: median of
`--repeats` forward passes after 3 warm-up passes, 2 threads, no autograd. Memory: each variant runs
in a fresh process at twice the batch and twice the size (so the allocations are fresh pages); the
figure is the growth of the peak resident set during one forward pass (`ru_maxrss`), which is
dominated by the largest intermediate tensors. With `--device cuda` both run on the GPU: the clock is
read after `torch.cuda.synchronize()`, and memory is the CUDA allocator's peak during one forward pass
above what was allocated before it, at the timing sizes.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_cada.py
    python benchmarks/bench_cada.py --device cuda --batch 128 --channels 128 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = """
import resource, json, sys, torch
from gaborprune.convert.cada import CADAConv2d
torch.set_num_threads(2)
n, c, hw, k, b, inv = json.loads(sys.argv[1])
layer = CADAConv2d(c, c, k, bases=b, context=0 if inv == "strict" else 3, invariance=inv).eval()
x = torch.randn(n, c, hw, hw)
with torch.no_grad():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layer(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from gaborprune._threads import machine_note
    from gaborprune.convert.cada import CADAConv2d

    torch.set_num_threads(2)
    print(machine_note(), flush=True)
    device = torch.device(args.device)
    n, c, hw = args.batch, args.channels, args.size
    x = torch.randn(n, c, hw, hw, device=device)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def peak_mb(layer, inv, b) -> float:
        if device.type == "cpu":  # a fresh process, so the allocations are fresh pages
            return float(subprocess.run([sys.executable, "-c", CHILD, json.dumps([2 * n, c, 2 * hw, k, b, inv])],
                                        capture_output=True, text=True, check=True).stdout)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            layer(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20

    rows = []
    for k in (3, 7):
        variants = [("depthwise (strict)", "strict", 1), ("CADA relaxed B=2", "relaxed", 2), ("CADA relaxed B=4", "relaxed", 4),
                    ("no invariance", "none", 1)]
        layers = [CADAConv2d(c, c, k, bases=b, context=0 if inv == "strict" else 3, invariance=inv).to(device).eval()
                  for _, inv, b in variants]
        times = [[] for _ in layers]
        with torch.no_grad():
            for layer in layers:
                for _ in range(3):
                    layer(x)
            for _ in range(args.repeats):  # interleaved, so drift hits all variants alike
                for i, layer in enumerate(layers):
                    t0 = clock()
                    layer(x)
                    times[i].append(clock() - t0)
        memory = [peak_mb(layer, inv, b) for layer, (_, inv, b) in zip(layers, variants)]
        base_t, base_m = statistics.median(times[0]), memory[0]
        for (name, _, b), t, m in zip(variants, times, memory):
            rows.append({"k": k, "variant": name, "median_ms": statistics.median(t) * 1e3, "time_ratio": statistics.median(t) / base_t,
                         "peak_mb": m, "device": args.device, "memory_ratio": m / base_m if base_m else float("nan")})
    if device.type == "cuda":
        print(f"time and memory: input [{n}, {c}, {hw}, {hw}] on {torch.cuda.get_device_name(device)}, float32\n")
    else:
        print(f"time: input [{n}, {c}, {hw}, {hw}]; memory: input [{2 * n}, {c}, {2 * hw}, {2 * hw}]; 2 threads\n")
    print("| k | variant | median ms | time vs depthwise | extra peak MB | memory vs depthwise |\n|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['k']} | {r['variant']} | {r['median_ms']:.2f} | {r['time_ratio']:.2f}x | {r['peak_mb']:.0f} | {r['memory_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
