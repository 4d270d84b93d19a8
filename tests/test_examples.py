"""The worked examples in examples/ run, end to end, at toy size, and write what they say they write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gaborprune as gp

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # ~35 s on one thread: training, prune, two exports and a short bench of SSDlite320
def test_own_loop_detector_toy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLES / "own_loop.py"), "--toy", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "speedup" in run.stdout and "recall@0.5" in run.stdout

    summary = json.loads((out / "summary.json").read_text())
    prune = summary["prune"]
    assert prune["macs_after"] <= prune["macs_before"]
    assert prune["channels_removed"] > 0  # --toy removes a share of the channels, so the prune path runs
    for stage in ("before_prune", "after_prune"):
        assert 0 <= summary["metric"][stage]["recall@0.5"] <= 1

    # the recipe rebuilds the pruned detector, its MACs those the prune reported
    model, recipe = gp.load_model(summary["files"]["pruned"])
    assert recipe.input_shape == (3, 320, 320)
    assert gp.summarize(model, recipe.input_shape).macs == prune["macs_after"]

    import onnxruntime as ort

    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    for name in ("unpruned", "pruned"):
        path = Path(summary["export"][name]["path"])
        assert path.is_file()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        boxes, *rest = sess.run(None, {sess.get_inputs()[0].name: x})
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and all(len(r) == len(boxes) for r in rest)

    bench = summary["bench"]
    assert bench["speedup"] > 0 and bench["speedup_low"] <= bench["speedup"] <= bench["speedup_high"]
    assert len(bench["p50_ms"]) == 2

    # a second run into the same folder refuses before any work, and names the file
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "--force" in again.stderr and str(out) in again.stderr
