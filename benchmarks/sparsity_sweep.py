"""How many Gabor kernels survive at each sparsity strength, and the accuracy at each (digits).

Trains the built-in `resnet20_altered` (its 7x7 and 5x5 stem layers are Gabor banks) on scikit-learn's
handwritten digits with the same recipe at several `--sparsity` strengths and prints a Markdown table
of alive kernels (relative strength >= gaborprune.sparsity.DEFAULT_THRESHOLD) and test accuracy.

    .venv/bin/python benchmarks/sparsity_sweep.py [--epochs 8] [--strengths 0,0.001,0.01,0.03,0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import gaborprune as gp
from gaborprune._threads import machine_note
from gaborprune.data import load_data
from gaborprune.train import TrainConfig, finetune_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_altered")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--strengths", default="0,0.001,0.01,0.03,0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(machine_note(), flush=True)

    rows = []
    for strength in [float(s) for s in args.strengths.split(",")]:
        torch.manual_seed(args.seed)
        model, recipe = gp.load_model(args.model)
        if not any(isinstance(m, gp.GaborConv2d) for m in model.modules()):
            recipe = recipe.with_step(gp.gaborize_(model, gp.ConversionSpec(first=1), recipe.input_shape).step)
        train, test = load_data("digits", recipe.input_shape)
        config = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, sparsity=strength, seed=args.seed)
        t0 = time.perf_counter()
        result = finetune_(model, recipe, train, test, config, device=torch.device("cpu"), data_name="digits")
        rows.append({"sparsity": strength, "kernels_alive": result.kernels_alive, "kernels_total": result.kernels_total,
                     "final_accuracy": result.final_accuracy, "seconds": time.perf_counter() - t0})
        print(f"sparsity {strength:g}: alive {result.kernels_alive} of {result.kernels_total}, "
              f"accuracy {result.final_accuracy:.2f}% ({rows[-1]['seconds']:.0f} s)", flush=True)

    layers = list(rows[0]["kernels_total"])
    header = " | ".join(f"{n} alive / {rows[0]['kernels_total'][n]}" for n in layers)
    print(f"\n| --sparsity | {header} | removed | test accuracy |")
    print("|---:|" + "---:|" * len(layers) + "---:|---:|")
    for r in rows:
        alive, total = sum(r["kernels_alive"].values()), sum(r["kernels_total"].values())
        cells = " | ".join(str(r["kernels_alive"][n]) for n in layers)
        print(f"| {r['sparsity']:g} | {cells} | {100 * (1 - alive / total):.0f}% | {r['final_accuracy']:.2f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "epochs": args.epochs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
