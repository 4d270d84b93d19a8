"""Peer benchmark: one trained network compressed by gaborprune and by Torch-Pruning, side by side.

On digits (or any `--data`), with one seed:

1. Train the network once (default `resnet20_altered --model-arg gabor=false`: the paper's altered
   ResNet-20 with plain convolutions in its stem). Every method starts from this state_dict.
2. Compress it, then give every result the same recovery (`--recovery-epochs` at lr/5):
   - unpruned: nothing removed (it gets the recovery epochs too, so no method wins by training longer);
   - gaborprune: the layers `--targets` converted to Gabor banks (least-squares fit), fine-tuned with the
     channel-structured sparsity pressure (`--sparsity`, `--sparsity-epochs`), pruned at `--threshold`,
     recovered, exported with `--lowering auto`;
   - gaborprune-all (`--scope all`): no conversion; every convolution's channel groups and residual
     branches pressed (`--all-sparsity`, `--all-epochs`), pruned at `--all-threshold` with channel
     counts rounded to the CPU's block, recovered with BatchNorm recalibration;
     gaborprune-all+gabor: the same after converting `--targets` to Gabor banks;
   - Torch-Pruning global: `MetaPruner` with `MagnitudeImportance(p=2)` (tp-global) or
     `BNScaleImportance` (tp-bn), global ranking over every channel group but the classifier's, its
     pruning ratio bisected until the MACs reach `--peer-mac-ratio` of the unpruned model's (`auto`:
     the ratio gaborprune-all reached), once per `--round-to` setting;
   - Torch-Pruning restricted: the same, but only the channel groups of the `--targets` layers (every
     other convolution ignored), at `--restricted-mac-ratio` (default: the MAC ratio gaborprune reached,
     so both spend the same arithmetic in the same layers).
   Torch-Pruning results are exported with `--lowering dense` through the same `export_model` path.
3. Every result, float and static int8 (calibrated on training images): top-1 on the test split in ONNX
   Runtime, MACs, parameters and file size of the ONNX file, and ONNX Runtime latency at batch 1 and 32
   on 1 thread, all files timed in one interleaved `bench` call, float against the unpruned float
   export and int8 against the unpruned int8 one (speedup with its 95% interval and verdict).

Needs the benchmark extra (Torch-Pruning is never a runtime dependency):

    .venv/bin/pip install -e '.[peers]'

Run (from the repository root, on a quiet machine; expect roughly ten minutes on 2 cores, most of it training):

    .venv/bin/python benchmarks/bench_peers.py --out /tmp/bench_peers --json /tmp/bench_peers.json

Smoke test (about a minute): add `--epochs 1 --recovery-epochs 1 --data fake:64:10 --runs 5`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

import gaborprune as gp
from gaborprune._io import write_json
from gaborprune._threads import machine_note
from gaborprune.data import load_data
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.export.bench import bench
from gaborprune.export.bench_models import load_onnx
from gaborprune.models import ModelSource
from gaborprune.prune import PruneSpec, prune_model_
from gaborprune.prune.structured import default_round_to
from gaborprune.recipe import Recipe
from gaborprune.summary import summarize
from gaborprune.train import TrainConfig, evaluate, finetune_

EXTRA = "install the benchmark extra: pip install -e '.[peers]'"
#: The layers gaborprune converts by default: the altered stem's two Gabor layers, or ResNet-20's first two convolutions.
TARGETS = {"resnet20_altered": "conv1,conv2", "resnet20": "conv1,layer1.0.conv1"}
METHODS = ("gaborprune", "gaborprune-all", "gaborprune-all+gabor", "tp-global", "tp-bn", "tp-restricted")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20_altered")
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="builder argument, repeatable (default for resnet20_altered: gabor=false)")
    parser.add_argument("--targets", help="comma-separated layers gaborprune converts and the restricted peer prunes "
                        f"(default: {'; '.join(f'{k}: {v}' for k, v in TARGETS.items())})")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size of a torchvision model (e.g. 10 for fake:N:10)")
    parser.add_argument("--epochs", type=int, default=6, help="training of the shared network")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--sparsity", type=float, default=0.1, help="gaborprune's sparsity strength")
    parser.add_argument("--sparsity-epochs", type=int, default=None, help="gaborprune's fine-tuning with sparsity (default: --epochs)")
    parser.add_argument("--threshold", type=float, default=0.05, help="gaborprune's prune threshold")
    parser.add_argument("--recovery-epochs", type=int, default=2, help="every method's recovery, at lr/5")
    parser.add_argument("--methods", default="gaborprune,tp-global,tp-restricted",
                        help="comma-separated: gaborprune, gaborprune-all, gaborprune-all+gabor, tp-global, tp-bn, tp-restricted")
    parser.add_argument("--all-sparsity", type=float, default=0.3, help="gaborprune --scope all: sparsity strength")
    parser.add_argument("--all-epochs", type=int, default=12, help="gaborprune --scope all: fine-tuning epochs with the pressure")
    parser.add_argument("--all-threshold", type=float, default=0.3, help="gaborprune --scope all: prune threshold")
    parser.add_argument("--all-mac-ratio", type=float, default=None,
                        help="gaborprune --scope all: prune to this MAC ratio instead (prune --macs R: the weakest channels first, by "
                             "BatchNorm gain), e.g. to match a peer; --all-epochs 0 skips the pressure")
    parser.add_argument("--peer-mac-ratio", default="0.8", help="Torch-Pruning global: MACs kept, of the unpruned model's ('auto': gaborprune-all's)")
    parser.add_argument("--restricted-mac-ratio", type=float, default=None,
                        help="Torch-Pruning restricted: MACs kept (default: the ratio gaborprune reached)")
    parser.add_argument("--round-to", default="none,16", help="Torch-Pruning round_to settings, comma-separated ('none' or N)")
    parser.add_argument("--runs", type=int, default=50, help="bench runs per round")
    parser.add_argument("--batch-sizes", default="1,32", help="ONNX Runtime batch sizes timed, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=None, help="bench time budget (default: 4 s per --runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="training device (timing is always ONNX Runtime on the CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for training")
    parser.add_argument("--out", default="/tmp/bench_peers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.model_args = model_args(args.model_arg, args.model)
    args.targets = tuple((args.targets or TARGETS.get(args.model, "")).split(","))
    if args.targets == ("",):
        parser.error(f"give --targets for model '{args.model}' (the layers gaborprune converts)")
    args.round_to = [None if r.strip().lower() == "none" else int(r) for r in args.round_to.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method '{unknown[0]}'; known: {', '.join(METHODS)}")
    args.sparsity_epochs = args.epochs if args.sparsity_epochs is None else args.sparsity_epochs
    args.max_seconds = 4.0 * args.runs if args.max_seconds is None else args.max_seconds
    return args


def model_args(items: list[str] | None, model: str) -> dict:
    """KEY=VALUE builder arguments, read as the CLI's `--model-arg` reads them."""
    if items is None:
        return {"gabor": False} if model == "resnet20_altered" else {}
    args = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = {"true": True, "false": False}.get(value.lower(), value)
    return args


def require_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        sys.exit(EXTRA)
    return torch_pruning


class Run:
    """The shared data, settings and training helper of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.model, self.recipe = gp.load_model(args.model, model_args=args.model_args, num_classes=args.num_classes)
        self.shape = self.recipe.input_shape
        self.train, self.test = load_data(args.data, self.shape)
        self.batch_size = min(args.batch_size, len(self.train))  # a toy split smaller than a batch still trains

    def finetune(self, model: nn.Module, recipe: Recipe, epochs: int, lr: float, **extra) -> dict:
        config = TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=lr, seed=self.args.seed, **extra)
        t0 = time.perf_counter()
        result = finetune_(model, recipe, self.train, self.test, config, device=self.device, data_name=self.args.data)
        model.cpu()
        return {"epochs": epochs, "lr": lr, **extra, "final_accuracy": result.final_accuracy,
                "seconds": round(time.perf_counter() - t0, 1), "groups_total": result.groups_total, "groups_alive": result.groups_alive}

    def recover(self, model: nn.Module, recipe: Recipe, **extra) -> dict:
        return self.finetune(model, recipe, self.args.recovery_epochs, self.args.lr / 5, **extra)

    def macs(self, model: nn.Module) -> int:
        return summarize(model, self.shape).macs


def gaborprune_method(run: Run, trained: nn.Module) -> tuple[nn.Module, Recipe, dict]:
    """Convert the targets to Gabor banks, fine-tune with channel-structured sparsity, prune, recover."""
    args = run.args
    model, recipe = copy.deepcopy(trained), run.recipe
    recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(targets=args.targets), recipe.input_shape).step)
    extra = {"sparsity": args.sparsity}
    if "structure" in TrainConfig.__dataclass_fields__:
        extra["structure"] = "channel"
    else:
        print("note: this TrainConfig has no `structure`; gaborprune fine-tunes with its default (kernel) pressure", flush=True)
    info = {"sparse_finetune": run.finetune(model, recipe, args.sparsity_epochs, args.lr, **extra)}
    report = prune_model_(model, recipe.input_shape, PruneSpec(threshold=args.threshold))
    recipe = recipe.with_step(report.step)
    info["kernels_kept"] = {n: [m.kernels_alive, m.mask.numel()] for n, m in model.named_modules() if isinstance(m, gp.GaborConv2d)}
    info["prune"] = report.to_dict()
    info["recovery"] = run.recover(model, recipe)
    return model, recipe, info


def gaborprune_all(run: Run, trained: nn.Module, gabor: bool) -> tuple[nn.Module, Recipe, dict]:
    """`--scope all`: every convolution's channel groups and branches pressed, pruned, recovered
    (with BatchNorm recalibration, as `prune --scope all --finetune-epochs` does)."""
    args = run.args
    model, recipe = copy.deepcopy(trained), run.recipe
    if gabor:
        recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(targets=args.targets), recipe.input_shape).step)
    info = {"sparse_finetune": run.finetune(model, recipe, args.all_epochs, args.lr, sparsity=args.all_sparsity, scope="all")} if args.all_epochs else {}
    if args.all_mac_ratio is not None:
        target = gp.prune_to_target_(model.cpu(), recipe.input_shape, macs=args.all_mac_ratio, scope="all", round_to=default_round_to())
        if target.prune is None:
            sys.exit(f"gaborprune-all: {target.message}")
        report = target.prune
    else:
        report = prune_model_(model, recipe.input_shape, PruneSpec(threshold=args.all_threshold, scope="all", round_to=default_round_to()))
    recipe = recipe.with_step(report.step)
    info["prune"] = report.to_dict()
    info["branches_removed"] = sorted(report.plan.constants)
    info["recovery"] = run.recover(model, recipe, recalibrate=True)
    return model, recipe, info


def tp_prune(tp, trained: nn.Module, shape: tuple[int, int, int], target: float, round_to: int | None, restricted: tuple[str, ...] = (),
             importance: str = "magnitude") -> tuple[nn.Module, dict]:
    """Torch-Pruning global pruning (L2 magnitude, or BatchNorm scale), its ratio bisected so the MACs
    come closest to `target` (a fraction of the unpruned model's) from below; with `restricted` (layer
    names), only those layers' groups are pruned."""
    def macs(model: nn.Module) -> int:
        return summarize(model, shape).macs

    base = macs(trained)
    example = torch.randn(1, *shape)

    def pruned_at(ratio: float) -> tuple[nn.Module, float] | None:
        model = copy.deepcopy(trained).eval()  # the graph is traced with a forward pass: BatchNorm statistics must not move
        if restricted:
            ignored = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in restricted]
        else:
            ignored = [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]
        try:
            score = tp.importance.MagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.BNScaleImportance()
            pruner = tp.pruner.MetaPruner(model, example, importance=score, global_pruning=True,
                                          pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
            pruner.step()
            if any(isinstance(m, nn.Conv2d) and min(m.in_channels, m.out_channels) == 0 for m in model.modules()):
                return None
            with torch.no_grad():
                model(example)
        except Exception:  # a ratio Torch-Pruning cannot apply at this round_to: treat as overshoot
            return None
        return model, macs(model) / base

    tried: dict[float, float] = {}  # pruning ratio -> MAC ratio (valid models only)
    lo, hi = 0.0, 0.95
    for _ in range(14):
        mid = (lo + hi) / 2
        result = pruned_at(mid)
        if result is not None:
            tried[mid] = result[1]
        if result is None or result[1] <= target:
            hi = mid
        else:
            lo = mid
    below = {r: m for r, m in tried.items() if m <= target}
    if below:
        ratio = max(below, key=lambda r: (below[r], -r))
        note = ""
    else:
        ratio = min(tried, key=lambda r: (tried[r], r)) if tried else 0.0
        note = f"MAC ratio {target:.3f} not reachable at round_to {round_to}; the deepest valid pruning kept {tried.get(ratio, 1.0):.3f}"
    model, mac_ratio = pruned_at(ratio) if ratio > 0 else (copy.deepcopy(trained), 1.0)
    channels = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return model, {"pruning_ratio": ratio, "mac_ratio": mac_ratio, "target": target, "round_to": round_to,
                   "restricted": bool(restricted), "importance": importance, "note": note, "out_channels": channels}


def export_both(run: Run, name: str, model: nn.Module, recipe: Recipe, lowering: str) -> dict:
    """Float and int8 ONNX files of `model`, checked against PyTorch, with their ONNX Runtime top-1."""
    out = Path(run.args.out)
    files = {}
    for precision, quantize in (("float", False), ("int8", True)):
        path = out / f"{name}-{precision}.onnx"
        config = ExportConfig(dynamic_batch=True, threads=1, lowering=lowering, quantize=quantize)
        report = export_model(model, recipe.input_shape, path, config, provenance=recipe.provenance(), data=(run.train, run.test), force=True)
        files[precision] = {"path": str(path), "file_bytes": report.file_bytes, "params": report.params, "macs_onnx": report.macs,
                            "macs_executed": report.macs_executed, "accuracy": report.accuracy["int8" if quantize else "onnx"],
                            "lowering": report.lowering, "lowering_note": report.lowering_note, "note": report.note}
    return files


def speedup_cell(c) -> str:
    if c is None:
        return "baseline"
    if c.speedup is None:
        return c.verdict
    return f"{c.speedup:.2f}x [{c.speedup_low:.2f}, {c.speedup_high:.2f}] {c.verdict}"


def main() -> None:
    args = parse_args()
    tp = require_torch_pruning()
    if args.threads is not None:
        gp.set_threads(args.threads)
    print(machine_note(), flush=True)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(args)

    t0 = time.perf_counter()
    base_train = run.finetune(run.model, run.recipe, args.epochs, args.lr)
    trained = run.model.cpu().eval()
    gp.save_recipe(out / "trained.pt", trained, run.recipe, force=True)
    print(f"trained {args.model} on {args.data}: {base_train['final_accuracy']:.2f}% after {args.epochs} epochs "
          f"({time.perf_counter() - t0:.0f} s); saved {out / 'trained.pt'}", flush=True)
    base_macs = run.macs(trained)

    methods = []  # (name, model, recipe, lowering, info)
    unpruned, urecipe = copy.deepcopy(trained), copy.deepcopy(run.recipe)
    methods.append(("unpruned", unpruned, urecipe, "dense", {"recovery": run.recover(unpruned, urecipe)}))

    g_ratio, all_ratio = None, None
    if "gaborprune" in args.methods:
        t0 = time.perf_counter()
        g_model, g_recipe, g_info = gaborprune_method(run, trained)
        g_ratio = run.macs(g_model) / base_macs
        methods.append(("gaborprune", g_model, g_recipe, "auto", g_info))
        print(f"gaborprune: kernels kept {g_info['kernels_kept']}, MAC ratio {g_ratio:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, gabor in (("gaborprune-all", False), ("gaborprune-all+gabor", True)):
        if name in args.methods:
            t0 = time.perf_counter()
            model, recipe, info = gaborprune_all(run, trained, gabor)
            ratio = run.macs(model) / base_macs
            all_ratio = ratio if all_ratio is None else all_ratio
            methods.append((name, model, recipe, "auto", info))
            print(f"{name}: MAC ratio {ratio:.3f}, branches removed {info['branches_removed']} ({time.perf_counter() - t0:.0f} s)", flush=True)

    peer_target = all_ratio if args.peer_mac_ratio == "auto" else float(args.peer_mac_ratio)
    if peer_target is None:
        sys.exit("--peer-mac-ratio auto needs gaborprune-all or gaborprune-all+gabor among --methods")
    restricted_target = g_ratio if args.restricted_mac_ratio is None else args.restricted_mac_ratio
    peers = [(m, False, peer_target, "magnitude" if m == "tp-global" else "bn") for m in ("tp-global", "tp-bn") if m in args.methods]
    if "tp-restricted" in args.methods and restricted_target is not None:
        peers.append(("tp-restricted", True, restricted_target, "magnitude"))
    for base_name, restricted, target, importance in peers:
        for round_to in args.round_to:
            name = base_name + (f"-r{round_to}" if round_to else "")
            model, info = tp_prune(tp, trained, run.shape, target, round_to, run.args.targets if restricted else (), importance)
            if info["mac_ratio"] >= 1:
                print(f"{name}: nothing pruned (target MAC ratio {target:.3f}{'; ' + info['note'] if info['note'] else ''}); skipped", flush=True)
                continue
            carrier = Recipe(ModelSource(args.model, None, dict(args.model_args)), run.shape)  # carries the input shape only
            info["recovery"] = run.recover(model, carrier)
            methods.append((name, model, carrier, "dense", info))
            print(f"{name}: pruning ratio {info['pruning_ratio']:.4f}, MAC ratio {info['mac_ratio']:.3f}"
                  + (f" ({info['note']})" if info["note"] else ""), flush=True)

    rows = []
    for name, model, recipe, lowering, info in methods:
        s = summarize(model, run.shape)
        row = {"method": name, "lowering": lowering, "top1_pytorch": evaluate(model, run.test, torch.device("cpu")).top1,
               "macs": s.macs, "mac_ratio": s.macs / base_macs, "params_pytorch": s.params, "info": info,
               "epochs_after_training": info.get("sparse_finetune", {}).get("epochs", 0) + info["recovery"]["epochs"]}
        row["files"] = export_both(run, name, model, recipe, lowering)
        rows.append(row)
        print(f"exported {name}: float {row['files']['float']['file_bytes'] / 1024:.0f} KiB, int8 {row['files']['int8']['file_bytes'] / 1024:.0f} KiB",
              flush=True)

    loaded = {(r["method"], p): load_onnx(r["files"][p]["path"], name=r["method"] + ("" if p == "float" else " (int8)"))
              for r in rows for p in ("float", "int8")}
    baselines = [loaded["unpruned", "float"], loaded["unpruned", "int8"]]
    others = [m for (method, _), m in loaded.items() if method != "unpruned"]
    report = bench(others, baseline=baselines, batch_sizes=args.batch_sizes, threads=(1,), runs=args.runs, max_seconds=args.max_seconds)
    results = {(r.model, r.batch_size): r for r in report.results}
    comparisons = {(c.model, c.batch_size): c for c in report.comparisons}

    print(f"\n{machine_note()} (after timing)")
    print(f"bench: ONNX Runtime {report.environment.get('onnxruntime')}, {report.environment.get('cpu')}, 1 thread, "
          f"1-minute load {report.environment.get('load_average') or float('nan'):.2f} at the start of timing, {args.runs} runs per round, "
          f"max {args.max_seconds:g} s; float compared with unpruned float, int8 with unpruned int8")
    print(f"trained {args.model} {args.model_args} {args.epochs} epochs on {args.data}; every method then {args.recovery_epochs} "
          f"recovery epochs at lr {args.lr / 5:g}; gaborprune also {args.sparsity_epochs} epochs at sparsity {args.sparsity} first, "
          f"gaborprune-all {args.all_epochs} epochs at sparsity {args.all_sparsity} (--scope all), "
          + (f"MAC ratio {args.all_mac_ratio}\n" if args.all_mac_ratio is not None else f"threshold {args.all_threshold}\n"))
    timed = "".join(f" p50 ms b{b} | speedup b{b} |" for b in args.batch_sizes)
    print(f"| method | precision | top-1 (ORT) | MACs | MAC ratio | executed MAC ratio | params (ONNX) | KiB |{timed} notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|" + "---:|---|" * len(args.batch_sizes) + "---|")
    for row in rows:
        for precision in ("float", "int8"):
            f = row["files"][precision]
            bench_name = loaded[row["method"], precision].name
            cells, notes = [], []
            for b in args.batch_sizes:
                r, c = results.get((bench_name, b)), comparisons.get((bench_name, b))
                cells += [f"{r.latency.p50:.3f}" if r else "n/a", speedup_cell(c)]
                notes += [f"b{b}: {n}" for n in (r.note if r else "", c.note if c else "") if n]
                if c is not None and c.efficiency is not None:
                    notes.append(f"b{b} efficiency {c.efficiency:.2f}")
            base_exec = rows[0]["files"][precision]["macs_executed"]
            notes += [n for n in (row["info"].get("note"),) if n]
            print(f"| {row['method']} | {precision} | {f['accuracy']:.2f}% | {row['macs']:,} | {row['mac_ratio']:.3f} | "
                  f"{f['macs_executed'] / base_exec:.3f} | {f['params']:,} | {f['file_bytes'] / 1024:.0f} | {' | '.join(cells)} | {'; '.join(notes)} |")
        row["bench"] = {f"b{b}": {p: {"result": (r.to_dict() if (r := results.get((loaded[row['method'], p].name, b))) else None),
                                      "comparison": (c.to_dict() if (c := comparisons.get((loaded[row['method'], p].name, b))) else None)}
                                  for p in ("float", "int8")} for b in args.batch_sizes}
    for w in report.warnings:
        print(f"\nwarning: {w}")
    for row in rows:
        for precision in ("float", "int8"):
            if row["files"][precision]["note"]:
                print(f"\n{row['method']} ({precision}): {row['files'][precision]['note']}")
    if args.json:
        info_args = {k: v for k, v in vars(args).items() if k != "model_arg"}
        write_json(args.json, {"args": info_args, "command": shlex.join([sys.executable, *sys.argv]),
                               "base_training": base_train, "base_macs": base_macs, "rows": rows, "bench": report.to_dict()}, force=True)


if __name__ == "__main__":
    main()
