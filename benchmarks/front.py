"""The accuracy-latency front of one trained network: gaborprune `--scope all` against Torch-Pruning.

From one trained recipe (default: the committed CIFAR-10 resnet20, benchmarks/checkpoints/), every
method prunes a copy to each MAC ratio of `--macs`, and every result gets the same treatment after:
BatchNorm statistics re-estimated on `--calibration-images` augmented training images, then
`--recovery-epochs` of fine-tuning (lr `--lr`, no warm-up, as `prune --finetune-epochs` recovers).

Methods (each at every `--round-to`, 'none' or a channel multiple):
- gaborprune-gain: `prune_to_target_(macs=R, scope="all")`, channels ranked by their BatchNorm gain;
- gaborprune-taylor: the same, ranked by `taylor_scores` (first-order loss change of removing each)
  on the calibration images;
- tp-magnitude / tp-bn: Torch-Pruning's `MetaPruner` with global ranking, L2 magnitude or
  BatchNorm-scale importance, its ratio bisected to the MAC ratio (bench_peers.tp_prune).

Every result is exported (float, and int8 calibrated on training images) with `lowering` dense, its
ONNX Runtime top-1 measured on the test split, and all files timed in one interleaved `bench` at
batch 1 and 32 on 1 thread, float against the unpruned float export and int8 against the unpruned
int8 one. Prints a table, which gaborprune point is at least as fast at each Torch-Pruning point's
accuracy, and writes a Pareto figure per batch size (`--png`).

Needs the benchmark extra (pip install -e '.[peers]'). Run on a quiet machine (about 25 minutes on
one core with no recovery epochs; each recovery epoch adds about 6.5 minutes per point):

    .venv/bin/python benchmarks/front.py --data cifar10:/work/data/cifar10-jpeg --out /tmp/front --json /tmp/front.json
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_peers import require_torch_pruning, tp_prune

import gaborprune as gp
from gaborprune._io import write_json
from gaborprune._threads import machine_note
from gaborprune.data import calibration_batches, load_data
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.export.bench import bench
from gaborprune.export.bench_models import load_onnx
from gaborprune.summary import summarize
from gaborprune.train import TrainConfig, finetune_

CHECKPOINT = Path(__file__).parent / "checkpoints" / "resnet20-cifar10.pt"
METHODS = ("gaborprune-gain", "gaborprune-taylor", "tp-magnitude", "tp-bn")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(CHECKPOINT), help="the trained recipe every method starts from")
    parser.add_argument("--data", default=None, help="e.g. cifar10:/work/data/cifar10-jpeg (not needed with --rows)")
    parser.add_argument("--macs", default="0.8,0.65,0.5,0.35", help="MAC ratios (pruned / unpruned), comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--round-to", default="16,none", help="channel multiples, comma-separated ('none': any count); "
                        "gaborprune uses the first, Torch-Pruning each")
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--recovery-epochs", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="recovery learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20, help="bench runs per round")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bench time budget")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--no-int8", action="store_true", help="float only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/front")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-bench", action="store_true", help="prune, recover and export only; bench later with --rows")
    parser.add_argument("--no-unpruned", action="store_true", help="with --no-bench: leave out the unpruned row (another run has it)")
    parser.add_argument("--rows", default=None, help="comma-separated --json files of --no-bench runs: bench their exports together")
    parser.add_argument("--png", default=None, help="Pareto figure, one panel per batch size")
    parser.add_argument("--replot", default=None, metavar="JSON", help="redraw --png from a finished run's --json (no timing)")
    args = parser.parse_args()
    args.macs = [float(m) for m in args.macs.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.round_to = [None if r.strip() == "none" else int(r) for r in args.round_to.split(",")]
    args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    unknown = sorted(set(args.methods) - set(METHODS))
    if args.rows is None and args.data is None and args.replot is None:
        parser.error("give --data (or --rows to bench earlier runs)")
    if unknown:
        parser.error(f"unknown method '{unknown[0]}'; known: {', '.join(METHODS)}")
    return args


def series(args) -> list[tuple[str, str, int | None]]:
    """(name, method, round_to) of every series: gaborprune at the first --round-to, peers at each."""
    out = []
    for method in args.methods:
        for r in args.round_to[:1] if method.startswith("gaborprune") else args.round_to:
            out.append((f"{method}{f'-r{r}' if r else ''}", method, r))
    return out


def prune(tp, method: str, round_to, trained, shape, mac_ratio: float, scores) -> tuple[torch.nn.Module | None, dict]:
    model = copy.deepcopy(trained)
    if method.startswith("gaborprune"):
        t = gp.prune_to_target_(model, shape, macs=mac_ratio, scope="all", round_to=round_to,
                                scores=scores if method == "gaborprune-taylor" else None)
        if t.prune is None:
            return None, {"note": t.message}
        return model, {"candidate": t.chosen_candidate.label, "branches_removed": sorted(t.prune.plan.constants)}
    model, info = tp_prune(tp, trained, shape, mac_ratio, round_to, importance="magnitude" if method == "tp-magnitude" else "bn")
    return (model if info["mac_ratio"] < 1 else None), info


def main() -> None:
    args = parse_args()
    gp.set_threads(1)
    print(machine_note(), flush=True)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    if args.replot:
        return plot(json.loads(Path(args.replot).read_text())["rows"], args.batch_sizes, args.png)
    if args.rows:  # a name, or a series' MAC ratio, seen in an earlier file is left out (a rerun goes first)
        rows, seen = [], set()
        for f in args.rows.split(","):
            for r in json.loads(Path(f).read_text())["rows"]:
                if r["name"] not in seen and (r["series"], round(r["mac_ratio"], 4)) not in seen:
                    seen |= {r["name"], (r["series"], round(r["mac_ratio"], 4))}
                    rows.append(r)
    else:
        rows = build(args)
    if args.no_bench:
        write_json(args.json, {"command": shlex.join([sys.executable, *sys.argv]), "rows": rows}, force=True)
        return
    time_and_report(args, rows)


def build(args) -> list[dict]:
    """Prune, recalibrate, recover and export every point; the rows without timings."""
    tp = require_torch_pruning()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained, recipe = gp.load_model(args.recipe)
    trained.eval()
    shape = recipe.input_shape
    train, test = load_data(args.data, shape)
    calibration = calibration_batches(train, args.calibration_images, args.batch_size, seed=args.seed, labels=True)
    images = [x for x, _ in calibration]
    t0 = time.perf_counter()
    scores = gp.taylor_scores(trained, shape, calibration) if "gaborprune-taylor" in args.methods else None
    print(f"Taylor scores on {args.calibration_images} training images: {time.perf_counter() - t0:.1f} s", flush=True)
    base_macs = summarize(trained, shape).macs
    config = TrainConfig(epochs=max(1, args.recovery_epochs), lr=args.lr, warmup_epochs=0, batch_size=args.batch_size, seed=args.seed, recalibrate=True)

    rows = []

    def finish(name: str, series_name: str, model, info: dict) -> None:
        t = time.perf_counter()
        if series_name != "unpruned":
            gp.recalibrate_norms_(model, images)
        if args.recovery_epochs:
            finetune_(model, recipe, train, test, config, device=torch.device("cpu"), data_name=args.data)
            model.cpu().eval()
        files = {}
        for precision in ("float",) if args.no_int8 else ("float", "int8"):
            path = out / f"{name}-{precision}.onnx"
            report = export_model(model, shape, path, ExportConfig(dynamic_batch=True, threads=1, lowering="dense", quantize=precision == "int8"),
                                  provenance=recipe.provenance(), data=(train, test), force=True)
            files[precision] = {"path": str(path), "top1": report.accuracy["int8" if precision == "int8" else "onnx"], "file_bytes": report.file_bytes}
        s = summarize(model, shape)
        rows.append({"name": name, "series": series_name, "mac_ratio": s.macs / base_macs, "params": s.params, "info": info, "files": files,
                     "recalibrated": series_name != "unpruned", "recovery_epochs": args.recovery_epochs,
                     "channels": {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}})
        print(f"{name}: MAC ratio {s.macs / base_macs:.3f}, top-1 float {files['float']['top1']:.2f}%"
              + (f", int8 {files['int8']['top1']:.2f}%" if "int8" in files else "") + f" ({time.perf_counter() - t:.0f} s)", flush=True)

    if not args.no_unpruned:
        finish("unpruned", "unpruned", copy.deepcopy(trained), {})
    for series_name, method, round_to in series(args):
        for mac_ratio in args.macs:
            model, info = prune(tp, method, round_to, trained, shape, mac_ratio, scores)
            if model is None:
                print(f"{series_name} at MAC ratio {mac_ratio}: nothing pruned ({info.get('note', '')}); skipped", flush=True)
                continue
            finish(f"{series_name}-m{mac_ratio:g}", series_name, model, info)
    return rows


def time_and_report(args, rows: list[dict]) -> None:
    """One interleaved bench of every row's files; the table, the front's verdicts, the figure."""
    precisions = [p for p in ("float", "int8") if p in rows[0]["files"]]
    loaded = {(r["name"], p): load_onnx(r["files"][p]["path"], name=f"{r['name']} ({p})") for r in rows for p in precisions}
    baselines = [loaded["unpruned", p] for p in precisions]
    others = [m for (name, _), m in loaded.items() if name != "unpruned"]
    report = bench(others, baseline=baselines, batch_sizes=args.batch_sizes, threads=(1,), runs=args.runs, max_seconds=args.max_seconds)
    results = {(r.model, r.batch_size): r for r in report.results}
    comparisons = {(c.model, c.batch_size): c for c in report.comparisons}
    for r in rows:
        r["bench"] = {f"b{b}": {p: {"p50_ms": results[loaded[r["name"], p].name, b].latency.p50,
                                    **({"speedup": c.speedup, "low": c.speedup_low, "high": c.speedup_high}
                                       if (c := comparisons.get((loaded[r["name"], p].name, b))) is not None else {})}
                                for p in precisions} for b in args.batch_sizes}

    env = report.environment
    print(f"\n{machine_note()} (after timing); bench: ONNX Runtime {env.get('onnxruntime')}, {env.get('cpu')}, 1 thread, "
          f"1-minute load {env.get('load_average') or float('nan'):.2f} at the start of timing, {args.runs} runs per round")
    print("every result: BatchNorm recalibrated on the training images, then the same recovery epochs (the runs' commands give them)")
    head = "".join(f" speedup b{b} {p} |" for b in args.batch_sizes for p in precisions)
    print(f"| result | MAC ratio | top-1 float |{' top-1 int8 |' if 'int8' in precisions else ''}{head}")
    print("|---|---:|---:|" + ("---:|" if "int8" in precisions else "") + "---:|" * len(args.batch_sizes) * len(precisions))
    for r in rows:
        cells = [f"{r['files'][p]['top1']:.2f}%" for p in precisions]
        for b in args.batch_sizes:
            for p in precisions:
                m = r["bench"][f"b{b}"][p]
                cells.append(f"{m['speedup']:.2f}x [{m['low']:.2f}-{m['high']:.2f}]" if "speedup" in m else f"{m['p50_ms']:.2f} ms")
        print(f"| {r['name']} | {r['mac_ratio']:.3f} | {' | '.join(cells)} |")
    verdicts = front_verdicts(rows, args.batch_sizes, precisions)
    for line in verdicts:
        print(line)
    if args.png:
        plot(rows, args.batch_sizes, args.png)
    if args.json:
        write_json(args.json, {"command": shlex.join([sys.executable, *sys.argv]), "args": {k: v for k, v in vars(args).items()},
                               "rows": rows, "verdicts": verdicts, "bench": report.to_dict()}, force=True)


def front_verdicts(rows: list[dict], batch_sizes, precisions) -> list[str]:
    """For every Torch-Pruning point: the fastest gaborprune point (by its speedup's low bound) whose
    top-1 is at least as high, and whether it is at least as fast (its low bound above the peer's
    median)."""
    lines = []
    for b in batch_sizes:
        for p in precisions:
            ours = [r for r in rows if r["series"].startswith("gaborprune")]
            for peer in (r for r in rows if r["series"].startswith("tp-")):
                m = peer["bench"][f"b{b}"][p]
                better = [r for r in ours if r["files"][p]["top1"] >= peer["files"][p]["top1"]]
                best = max(better, key=lambda r: r["bench"][f"b{b}"][p]["low"], default=None)
                if best is None:
                    lines.append(f"b{b} {p}: {peer['name']} ({peer['files'][p]['top1']:.2f}%, {m['speedup']:.2f}x): no gaborprune point as accurate")
                    continue
                o = best["bench"][f"b{b}"][p]
                verdict = "at least as fast" if o["high"] >= m["low"] else "slower"
                lines.append(f"b{b} {p}: {peer['name']} ({peer['files'][p]['top1']:.2f}%, {m['speedup']:.2f}x): {best['name']} "
                             f"({best['files'][p]['top1']:.2f}%, {o['speedup']:.2f}x [{o['low']:.2f}-{o['high']:.2f}]) {verdict}")
    return lines


def plot(rows: list[dict], batch_sizes, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(5.5 * len(batch_sizes), 4.2), squeeze=False)
    names = sorted({r["series"] for r in rows if r["series"] != "unpruned"})
    base = next(r for r in rows if r["series"] == "unpruned")
    for ax, b in zip(axes[0], batch_sizes):
        for name in names:
            pts = sorted((r["bench"][f"b{b}"]["float"]["speedup"], r["files"]["float"]["top1"],
                          r["bench"][f"b{b}"]["float"]["low"], r["bench"][f"b{b}"]["float"]["high"]) for r in rows if r["series"] == name)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = [[p[0] - p[2] for p in pts], [p[3] - p[0] for p in pts]]
            ax.errorbar(xs, ys, xerr=err, marker="o" if name.startswith("gaborprune") else "s", capsize=2,
                        linestyle="-" if name.startswith("gaborprune") else "--", label=name)
        ax.scatter([1.0], [base["files"]["float"]["top1"]], marker="*", s=120, color="black", label="unpruned", zorder=5)
        ax.set_title(f"ONNX Runtime float, batch {b}, 1 thread", fontsize=10)
        ax.set_xlabel("speedup over the unpruned export (95% interval)")
        ax.set_ylabel("top-1 on the test split (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
