"""The demo and the paper's experiments, end to end at toy size on real (digits) and synthetic data."""

import json

import pytest

from gaborprune.demo import DemoConfig, run_demo
from gaborprune.reproduce import EXPERIMENTS, reproduce
from test_cli import one_line_error, run as cli


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_writes_its_report(tmp_path):
    stages = []
    report = run_demo(tmp_path, DemoConfig(train_epochs=1, finetune_epochs=1, recovery_epochs=1, bench_runs=5), on_stage=stages.append)
    assert len(stages) == 6 and stages[0].startswith("1/6")
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"].split(" ")[0] for s in data["stages"]] == ["resnet20", "converted", "fine-tuned,", "pruned", "recovered"]
    assert set(data["kernels"]) == {"conv1", "layer1.0.conv1"} and data["kernels"]["conv1"][1] == 48
    for name in ("baseline", "pruned"):
        assert data["onnx"][name]["max_abs_diff"] <= 1e-4 and 0 <= data["onnx"][name]["accuracy"]["onnx"] <= 100
    comparison = data["latency"]["comparisons"][0]
    assert comparison["model"] == "pruned" and comparison["baseline"] == "baseline" and comparison["mac_ratio"] < 1
    for name in ("banks-converted.png", "banks-before-pruning.png", "banks-after-pruning.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    assert "| stage | top-1 |" in text and "Kernels removed over the converted layers" in text
    assert report.removed == data["kernels_removed"]
    one_line_error(cli("demo", "--out", tmp_path), "already holds a demo", "--force")


@pytest.mark.parametrize("name,data,layers", [
    ("resnet20-altered-cifar10", "fake:64:4", {"conv1": 48, "conv2": 256}),
    ("vgg16-cifar10", "fake:40:4", {"features.0": 192}),
])
def test_reproduce_at_toy_size(tmp_path, name, data, layers):
    report = reproduce(name, data, seeds=2, epochs=1, out=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1] and result["epochs"] == 1
    assert {n: t for n, (_, t) in result["seeds"][0]["kernels"].items()} == layers
    summary = result["summary"]
    kept = [s["kernels"][next(iter(layers))][0] for s in result["seeds"]]
    assert summary["kernels_kept"][next(iter(layers))]["mean"] == pytest.approx(sum(kept) / 2)
    assert result["experiment"]["train"]["epochs"] == EXPERIMENTS[name].train.epochs  # the recipe is recorded as written
    assert "mean ± std" in (tmp_path / "results.md").read_text() and report.markdown() == (tmp_path / "results.md").read_text()
    assert (tmp_path / f"{name}-gabor-seed1.pt").exists() and (tmp_path / f"{name}-plain-seed0.pt").exists()


def test_reproduce_bad_input(tmp_path):
    one_line_error(cli("reproduce", "resnet56-imagenet", "--data", "digits", "--out", tmp_path), "unknown experiment 'resnet56-imagenet'", "vgg16-cifar10")
    one_line_error(cli("reproduce", "vgg16-cifar10", "--data", "cifar10:/nonexistent", "--epochs", "1", "--out", tmp_path), "/nonexistent")
