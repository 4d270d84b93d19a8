"""Benchmark the end of the pipeline: do removed kernels become saved time in ONNX Runtime?

Three cases, each a pruned model against the same network unpruned, both exported by
`gaborprune export` (dynamic batch, `--lowering auto` measured at batch 1 / 1 thread), timed by
`gaborprune bench --baseline` logic at batch 1 and 32, 1 and 2 threads, interleaved run by run:

1. `resnet20_altered` trained on digits with `--sparsity 0.1` (8 epochs), pruned with
   `--ratio conv1=0.83 --ratio conv2=0.94` (the paper's rates); baseline: the same trained model.
2. `vgg16` with its first layer converted to a Gabor bank and trained on digits with `--sparsity 0.1`
   (2 epochs), pruned with `--keep features.0=29` (the paper's average); baseline: the same model
   before pruning.
3. `torchvision:resnet18` at 224x224 (random weights: none can be downloaded), first conv converted
   (fit), pruned with `--ratio conv1=0.8`; baseline: the converted model before pruning.

For each it prints the lowering chosen, the latency table, the comparison (speedup, MAC ratio,
efficiency = (1 - t/t_base) / (1 - MACs/MACs_base)) and the per-layer profile of the pruned model.

Run (from the repository root; about 15 minutes on 2 cores):

    .venv/bin/python benchmarks/bench_export.py --out /tmp/bench_export --json /tmp/bench_export.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import gaborprune as gp
from gaborprune._threads import machine_note
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.export.bench import bench
from gaborprune.export.bench_models import load_onnx

GP = [sys.executable, "-m", "gaborprune"]


def sh(*args) -> None:
    subprocess.run([*GP, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def prepare(out: Path) -> list[tuple[str, Path, Path]]:
    """(case, pruned recipe, baseline recipe) for the three cases."""
    r20a, vgg, r18 = out / "r20a.pt", out / "vgg16.pt", out / "r18.pt"
    if not r20a.exists():
        sh("finetune", "resnet20_altered", "--data", "digits", "--epochs", 8, "--batch-size", 64, "--sparsity", 0.1, "-o", r20a, "--force")
    sh("prune", r20a, "--ratio", "conv1=0.83", "--ratio", "conv2=0.94", "-o", out / "r20a-pruned.pt", "--force")
    if not vgg.exists():
        sh("convert", "vgg16", "--layers", 1, "-o", out / "vgg16-gabor.pt", "--force")
        sh("finetune", out / "vgg16-gabor.pt", "--data", "digits", "--epochs", 2, "--batch-size", 64, "--sparsity", 0.1, "-o", vgg, "--force")
    sh("prune", vgg, "--keep", "features.0=29", "-o", out / "vgg16-pruned.pt", "--force")
    if not r18.exists():
        sh("convert", "torchvision:resnet18", "--layers", 1, "-o", r18, "--force")
    sh("prune", r18, "--ratio", "conv1=0.8", "-o", out / "r18-pruned.pt", "--force")
    return [("resnet20_altered 83%/94%", out / "r20a-pruned.pt", r20a),
            ("vgg16 features.0 29/192", out / "vgg16-pruned.pt", vgg),
            ("resnet18 conv1 80%", out / "r18-pruned.pt", r18)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/bench_export")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(machine_note(), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for case, pruned, base in prepare(out):
        models = []
        for recipe_path in (pruned, base):
            model, recipe = gp.load_model(str(recipe_path))
            report = export_model(model, recipe.input_shape, recipe_path.with_suffix(".onnx"), ExportConfig(dynamic_batch=True, threads=1),
                                  provenance=recipe.provenance(), force=True)
            models.append((load_onnx(recipe_path.with_suffix(".onnx"), name=recipe_path.stem), report))
        (m, m_report), (b, _) = models
        heavy = "resnet18" in case
        result = bench([m], baseline=b, batch_sizes=(1, 32), threads=(1, 2), warmup=3 if heavy else 10,
                       runs=max(5, args.runs // 5) if heavy else args.runs, profile_layers=True)
        rows.append({"case": case, "lowering": {k: v for k, v in m_report.lowering.items() if k in m_report.sparse_kernels},
                     "lowering_ms": m_report.lowering_ms, "sparse_kernels": m_report.sparse_kernels,
                     "channels_cut_at_export": m_report.channels_cut, "macs": m_report.macs, "macs_executed": m_report.macs_executed,
                     "bench": result.to_dict()})
        print(f"\n## {case}\n")
        print("lowering:", json.dumps(rows[-1]["lowering"]), "measured ms:", json.dumps(m_report.lowering_ms))
        print("cut at export:", json.dumps(m_report.channels_cut))
        print("| model | batch | threads | p50 ms | p90 ms | images/s |\n|---|---:|---:|---:|---:|---:|")
        for r in result.results:
            print(f"| {r.model} | {r.batch_size} | {r.threads} | {r.latency.p50:.3f} | {r.latency.p90:.3f} | {r.throughput:.1f} |")
        print("\n| batch | threads | speedup | MAC ratio | efficiency |\n|---:|---:|---:|---:|---:|")
        for c in result.comparisons:
            eff = f"{c.efficiency:.2f}" if c.efficiency is not None else "n/a"
            print(f"| {c.batch_size} | {c.threads} | {c.speedup:.3f} | {c.mac_ratio:.3f} | {eff} |")
        for name, layers in result.profiles.items():
            top = sorted(layers.items(), key=lambda kv: -kv[1])[:6]
            print(f"\nprofile {name} (batch 1, 1 thread, ms): " + ", ".join(f"{k} {v:.3f}" for k, v in top))
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
