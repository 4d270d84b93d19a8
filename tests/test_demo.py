"""The demo and the paper's experiments, end to end at toy size on real (digits) and synthetic data."""

import json

import pytest

import gaborprune as gp
from gaborprune.demo import DemoConfig, run_demo
from gaborprune.reproduce import EXPERIMENTS, reproduce
from helpers import one_line_error, run as cli


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_writes_its_report(tmp_path):
    stages = []
    # at toy length accuracy is low and noisy: a budget of 5 points lets the search remove something
    config = DemoConfig(train_epochs=1, finetune_epochs=2, sparsity=0.3, max_drop=5.0, recovery_epochs=1, bench_runs=5, bench_seconds=5)
    report = run_demo(tmp_path, config, on_stage=stages.append)
    assert len(stages) == 6 and stages[0].startswith("1/6")
    data = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"].split(" ")[0] for s in data["stages"]] == ["resnet20_altered", "converted", "fine-tuned,", "pruned", "recovered"]
    assert set(data["kernels"]) == {"conv1", "conv2"} and data["kernels"]["conv1"][1] == 48 and data["kernels"]["conv2"][1] == 256
    # ONNX Runtime scores the exported files as PyTorch scored the models they came from (364 test images: 0.28% each)
    torch_top1 = {"baseline": data["stages"][0]["accuracy"], "pruned": data["stages"][-1]["accuracy"]}
    for name in ("baseline", "pruned"):
        assert data["onnx"][name]["max_abs_diff"] <= 1e-4
        assert abs(data["onnx"][name]["accuracy"]["onnx"] - torch_top1[name]) <= 0.6, (name, data["onnx"][name]["accuracy"], torch_top1)
    for name in ("baseline-int8", "pruned-int8"):  # calibrated int8 files, scored by ONNX Runtime
        assert (data["onnx"][name]["quantization"]["mode"] == "static"
                and (tmp_path / f"{name}.onnx").stat().st_size < data["onnx"][name.removesuffix("-int8")]["file_bytes"])
    assert data["stages"][-1]["macs"] < data["stages"][0]["macs"]  # the pruned network computes less
    # which form the file takes is export's timed, never-slower choice (a measured decision, not asserted here)
    assert data["onnx"]["pruned"]["macs_executed"] <= data["onnx"]["baseline"]["macs_executed"]
    finetuned, _ = gp.load_model(str(tmp_path / "finetuned.pt"))  # kept for other thresholds: the banks before pruning
    assert finetuned.conv1.out_channels == 16 and finetuned.conv2.in_channels == 16
    pairs = {(c["model"], c["baseline"], c["batch_size"]) for c in data["latency"]["comparisons"]}
    assert pairs == {(m, b, n) for m, b in (("pruned", "baseline"), ("pruned-int8", "baseline-int8")) for n in (1, 32)}  # int8 with int8
    for c in data["latency"]["comparisons"]:  # bench counts the files' MACs as export did
        assert c["mac_ratio"] == pytest.approx(data["onnx"][c["model"]]["macs_executed"] / data["onnx"][c["baseline"]]["macs_executed"])
        assert c["speedup_low"] <= c["speedup"] <= c["speedup_high"]
    for name in ("banks-converted.png", "banks-before-pruning.png", "banks-after-pruning.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "report.md").read_text()
    assert "| stage | top-1 |" in text and "Kernels removed over the converted layers" in text
    assert report.removed == data["kernels_removed"]
    # the prune: the most groups within the budget on the validation split (143 of digits' 1433 training images), never the test split
    target = data["target"]
    scored = {c["k"]: c for c in target["candidates"] if c["accuracy"] is not None}
    assert target["target"]["max_drop"] == 5.0 and scored[target["chosen"]]["within"]
    assert all(c["within"] == (c["accuracy"] >= target["base_accuracy"] - 5.0) for c in scored.values())
    assert all(k <= target["chosen"] for k, c in scored.items() if c["within"])
    assert "The prune: the " in text and "weakest channel groups of " in text
    one_line_error(cli("demo", "--out", tmp_path), "already holds a demo", "--force")


@pytest.mark.parametrize("name,data,layers", [
    ("resnet20-altered-cifar10", "fake:64:4", {"conv1": 48, "conv2": 256}),
    ("vgg16-cifar10", "fake:40:4", {"features.0": 192}),
])
def test_reproduce_at_toy_size(tmp_path, name, data, layers):
    report = reproduce(name, data, seeds=2, epochs=1, out=tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1] and (result["epochs"], result["warmup_epochs"]) == (1, 0)  # a quarter at most
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
