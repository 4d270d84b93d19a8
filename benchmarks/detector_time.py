"""Where an exported detector's time goes: the network (backbone, heads) against the box selection.

A pruned backbone can only speed up what the backbone costs. This exports SSDlite320-MobileNetV3
three ways, with the exporter `gaborprune export` uses (`gaborprune.export.onnx.to_onnx`: the whole
detector goes through TorchScript's), and times the files with `gaborprune bench` (batch 1, one
thread, interleaved):

- `whole`: the detector as `export` writes it (transform, backbone, heads, box decoding, per-class
  top-k and non-maximum suppression);
- `network`: backbone and heads, every anchor's scores and box regressions (what `--module` cannot
  name: the heads take a list of feature maps, so this wraps them);
- `backbone`: what `export --module backbone` writes, the part the channel analysis prunes.

For each number of classes in `--classes` (torchvision's 91 COCO classes, and few, as the example's 4).
With random weights every box scores about alike, so box selection is at its most expensive: a
trained detector's scores fall below `score_thresh` for most anchors. The files are timed only
(random weights tie boxes, so no parity check); `examples/own_loop.py` times a trained one.

    .venv/bin/python benchmarks/detector_time.py --out /tmp/detector_time
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import gaborprune as gp
from gaborprune.export.onnx import to_onnx
from gaborprune.workflows import BenchSettings, bench


class Network(nn.Module):
    """A detector's backbone and heads: every anchor's class scores and box regressions."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(list(self.backbone(x).values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="91,4", help="numbers of classes (background included), comma-separated")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    gp.set_threads(1)
    out = a.out or Path(tempfile.mkdtemp(prefix="detector_time-"))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for classes in (int(c) for c in a.classes.split(",")):
        model, recipe = gp.load_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=classes)
        model.eval()
        shape = (1, *recipe.input_shape)
        for name, module in (("whole", model), ("network", Network(model)), ("backbone", model.backbone)):
            path = out / f"ssdlite-{classes}-{name}.onnx"
            path.write_bytes(to_onnx(module, shape).SerializeToString())
            files.append(str(path))
    report = bench(files, settings=BenchSettings(batch_sizes=(1,), threads=(1,), max_seconds=a.max_seconds))
    print(report.to_markdown())
    for r in report.results:
        print(f"{Path(r.model).name}: median {r.latency.p50:.2f} ms (p90 {r.latency.p90:.2f})")


if __name__ == "__main__":
    main()
