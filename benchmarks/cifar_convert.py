"""How much a trained CIFAR network keeps when its early convolutions become Gabor banks.

For each set of layers (`conv1`; `conv1` plus `layer1`'s six convolutions), three conversions of the
same trained recipe, each scored on the test split with no fine-tuning:

- `weight fit`: least squares to the trained kernels (`convert` without `--data`, as before Step 12);
- `weight fit + BN`: the same, then the BatchNorm statistics re-estimated on the calibration images,
  to tell what recalibration alone gives;
- `output fit + BN`: `convert --data` (each bank fitted to its layer's outputs on the calibration
  images, layer by layer, statistics re-estimated after each).

A reference row re-estimates the unconverted model's statistics on the same images (`trained + BN`),
so what recalibration alone does is told apart from what the conversion costs.

With `--finetune-epochs N`, each `output fit + BN` model is then fine-tuned N epochs with the
defaults `finetune` gives a trained recipe (`workflows.TRAINED_FINETUNE`) and scored again.

Run (from the repository root; the JPEG copy unpacked as in ../shared/data/README.md):

    .venv/bin/python benchmarks/cifar_convert.py benchmarks/checkpoints/resnet20-cifar10.pt \\
        --data cifar10:/work/data/cifar10-jpeg --finetune-epochs 1 --json out/cifar_convert.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a trained recipe (e.g. benchmarks/checkpoints/resnet20-cifar10.pt)")
    parser.add_argument("--data", required=True, help="cifar10:DIR (batches or an image tree)")
    parser.add_argument("--calibration-images", type=int, default=None, help="default: workflows.CALIBRATION_IMAGES")
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gaborprune import workflows
    from gaborprune.convert import ConversionSpec, gaborize_
    from gaborprune.data import calibration_batches, load_data
    from gaborprune.norms import recalibrate_norms_
    from gaborprune.recipe import load_model
    from gaborprune.train import TrainConfig, evaluate, finetune_

    images = args.calibration_images or workflows.CALIBRATION_IMAGES
    model, recipe = load_model(args.recipe)
    train, test = load_data(args.data, recipe.input_shape)
    device = torch.device("cpu")
    calibration = calibration_batches(train, images)
    top1 = lambda m: evaluate(m, test, device).top1  # noqa: E731
    rows = [{"layers": "none", "method": "trained", "top1": top1(model)}]
    reference = copy.deepcopy(model)
    recalibrate_norms_(reference, calibration)  # what re-estimating the statistics alone does to the unconverted model
    rows.append({"layers": "none", "method": "trained + BN", "top1": top1(reference)})
    print(f"trained: {rows[0]['top1']:.2f}%, statistics re-estimated: {rows[1]['top1']:.2f}%", flush=True)
    for layers, targets in (("conv1", ("conv1",)), ("conv1 + layer1", ("conv1", r"re:layer1\.\d\.conv\d"))):
        spec = ConversionSpec(targets=targets)
        for method in ("weight fit", "weight fit + BN", "output fit + BN"):
            m = copy.deepcopy(model)
            start = time.perf_counter()
            report = gaborize_(m, spec, recipe.input_shape, calibration=calibration if method.startswith("output") else None)
            if method == "weight fit + BN":
                recalibrate_norms_(m, calibration)
            row = {"layers": layers, "method": method, "seconds": round(time.perf_counter() - start, 1), "top1": top1(m),
                   "output_error": [layer.output_error for layer in report.layers]}
            rows.append(row)
            print(f"{layers:15s} {method:16s} {row['top1']:.2f}%  ({row['seconds']} s)", flush=True)
            if method.startswith("output") and args.finetune_epochs:
                config = TrainConfig(epochs=args.finetune_epochs, **workflows.TRAINED_FINETUNE)
                start = time.perf_counter()
                finetune_(m, recipe.with_step(report.step), train, test, config, device=device, data_name=args.data)
                tuned = {"layers": layers, "method": f"{method}, {args.finetune_epochs} epoch(s) fine-tuned", "top1": top1(m),
                         "seconds": round(time.perf_counter() - start, 1), "config": config.to_dict()}
                rows.append(tuned)
                print(f"{layers:15s} {tuned['method']}: {tuned['top1']:.2f}%  ({tuned['seconds']} s)", flush=True)
    result = {"recipe": args.recipe, "data": args.data, "calibration_images": images, "rows": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
                          "load_average": os.getloadavg()[0], "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
