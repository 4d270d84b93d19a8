"""Real multi-process training: torchrun with two CPU processes (gloo), against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ARGS = ["tiny_models:gabor_net", "--input-shape", "3,16,16", "--data", "fake:320:4", "--epochs", "6",
        "--batch-size", "32", "--device", "cpu", "--sparsity", "0.01"]


def finetune(tmp_path, name, launcher):
    env = os.environ | {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "gaborprune", "finetune", *ARGS, "-o", str(tmp_path / f"{name}.pt"), "--json", str(tmp_path / f"{name}.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one(tmp_path):
    two, report2 = finetune(tmp_path, "ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    one, report1 = finetune(tmp_path, "single", [sys.executable])
    assert "x 2 processes" in two.stdout and two.stdout.count("fine-tuning") == 1  # only rank 0 prints
    assert two.stdout.count("epoch   6/6") == 1
    assert sorted(p.name for p in tmp_path.glob("ddp*")) == ["ddp.best.pt", "ddp.json", "ddp.last.pt", "ddp.metrics.jsonl", "ddp.pt"]
    assert len((tmp_path / "ddp.metrics.jsonl").read_text().splitlines()) == 6
    # the same initial weights, global batch and schedule: both learn the task (chance is 25%) alike;
    # they differ only through BatchNorm statistics over 16 instead of 32 images
    assert report2["final_accuracy"] > 85 and report1["final_accuracy"] > 85
    assert abs(report2["final_accuracy"] - report1["final_accuracy"]) <= 10
    for a, b in zip(report2["history"], report1["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.1)
