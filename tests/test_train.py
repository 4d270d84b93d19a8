"""Fine-tuning: it learns, checkpoints resume exactly, bad runs stop cleanly, the CLI reports."""

import json

import pytest
import torch
from typer.testing import CliRunner

import gaborprune as gp
from gaborprune.cli import app
from gaborprune.data import load_data
from gaborprune.errors import GaborPruneError
from gaborprune.train import Checkpoints, TrainConfig, TrainingError, finetune_
from gaborprune.train.loop import make_optimizer

CPU = torch.device("cpu")
SHAPE = (3, 16, 16)


def setup(data="fake:320:4"):
    torch.manual_seed(0)  # the same initial weights in every run
    model, recipe = gp.load_model("tiny_models:gabor_net", input_shape=SHAPE)
    train, test = load_data(data, SHAPE)
    return model, recipe, train, test


def run(config, tmp_path, resume=None, on_epoch=None, name="out"):
    model, recipe, train, test = setup()
    result = finetune_(model, recipe, train, test, config, device=CPU, data_name="fake:320:4",
                       checkpoints=Checkpoints(tmp_path / f"{name}.pt"), resume=resume, on_epoch=on_epoch)
    return model, recipe, result


def test_finetune_learns_and_checkpoints(tmp_path):
    config = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    model, recipe, result = run(config, tmp_path)
    assert result.final_accuracy > 60 and result.best_accuracy >= result.final_accuracy  # chance is 25%
    assert result.kernels_total == {"0": 24} and result.epochs == 4
    lines = (tmp_path / "out.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    best, best_recipe = gp.load_model(str(tmp_path / "out.best.pt"), trust_factory=True)
    [step] = best_recipe.steps  # the recipe given had none; the best checkpoint records this run so far
    assert step.kind == "finetune" and step.best_accuracy == result.best_accuracy and step.config == config
    assert step.epochs_done == [r["test_top1"] for r in result.history].index(result.best_accuracy) + 1
    assert result.step.epochs_done == 4 and list(result.step.history) == result.history and recipe.steps == ()
    assert torch.load(tmp_path / "out.last.pt", weights_only=True)["train_state"]["epoch"] == 4


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(epochs=3, batch_size=32, lr=0.05, sparsity=0.05)
    straight, _, _ = run(config, tmp_path, name="straight")

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path, on_epoch=stop_after_first, name="cut")
    resumed, _, result = run(config, tmp_path, resume=tmp_path / "cut.last.pt", name="cut")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "cut.metrics.jsonl").read_text().splitlines()) == 3


def test_resume_from_another_run_is_refused(tmp_path):
    run(TrainConfig(epochs=1, batch_size=32), tmp_path)
    with pytest.raises(GaborPruneError, match=r"is from a different run: its `lr` is 0.05, this run's is 0.1"):
        run(TrainConfig(epochs=1, batch_size=32, lr=0.1), tmp_path, resume=tmp_path / "out.last.pt", name="other")
    with pytest.raises(GaborPruneError, match="recipe without training state"):
        run(TrainConfig(epochs=1, batch_size=32), tmp_path, resume=tmp_path / "out.best.pt", name="other")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite in epoch 1; the last good checkpoint is '.*out.last.pt'"):
        run(TrainConfig(epochs=2, batch_size=32, lr=1e30, warmup_epochs=0), tmp_path)
    model, _ = gp.load_model(str(tmp_path / "out.last.pt"), trust_factory=True)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_wrong_number_of_classes():
    model, recipe, _, _ = setup()
    train, test = load_data("fake:100:7", SHAPE)
    with pytest.raises(TrainingError, match="has 4 outputs but dataset 'fake:100:7' has 7 classes; build the model with `num_classes` 7"):
        finetune_(model, recipe, train, test, TrainConfig(epochs=1), device=CPU, data_name="fake:100:7")


def test_weight_decay_spares_gabor_shape_and_schedule_warms_then_decays():
    model, _, _, _ = setup()
    optimizer, scheduler = make_optimizer(model, TrainConfig(epochs=2, lr=1.0, warmup_epochs=1, weight_decay=0.1), steps_per_epoch=4)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    gabor = model[0]
    assert id(gabor.amplitude) in decayed and id(model[3].weight) in decayed
    for name in ("theta", "log_sigma", "log_wavelength", "psi", "log_gamma"):
        assert id(getattr(gabor, name)) not in decayed
    assert id(model[1].weight) not in decayed and id(model[8].bias) not in decayed
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and lrs[4] == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] > 0


def test_config_validation():
    with pytest.raises(GaborPruneError, match="`sparsity` must be >= 0"):
        TrainConfig(sparsity=-1)
    with pytest.raises(GaborPruneError, match="unknown `optimizer` 'adam'"):
        TrainConfig(optimizer="adam")


def test_cli_finetune_and_eval(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ft.pt"
    args = ["finetune", "tiny_models:gabor_net", "--input-shape", "3,16,16", "--data", "fake:200:4", "-o", str(out),
            "--epochs", "2", "--batch-size", "32", "--sparsity", "0.01", "--optimizer", "adamw", "--lr", "0.01",
            "--device", "cpu", "--json", str(tmp_path / "ft.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "on fake:200:4 (160 train / 40 test images) on cpu" in result.output  # printed verbatim, no emoji codes
    report = json.loads((tmp_path / "ft.json").read_text())
    assert {"epochs", "best_accuracy", "final_accuracy", "kernels_alive", "kernels_total", "images_per_second", "device"} <= set(report)
    assert report["kernels_total"] == {"0": 24} and report["device"] == "cpu" and "alive: 0 " in result.output
    # the same output again is refused, and nothing is touched
    before = out.read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "exists; pass --force" in again.stderr and out.read_bytes() == before

    # inspect counts alive kernels as finetune does: present and not driven to zero
    result = runner.invoke(app, ["inspect", str(out), "--trust-factory", "--json", str(tmp_path / "in.json")])
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "in.json").read_text())["layers"]}
    assert layers["0"]["kernels_alive"] == report["kernels_alive"]["0"]

    result = runner.invoke(app, ["eval", str(out), "--trust-factory", "--data", "fake:200:4", "--json", str(tmp_path / "ev.json")])
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["samples"] == 40 and ev["top1"] == pytest.approx(report["final_accuracy"]) and ev["top5"] == 100.0

    # fine-tuning it again: a trained recipe gets the low rate without warm-up, unless the flags say otherwise
    again = ["finetune", str(out), "--trust-factory", "--data", "fake:200:4", "--epochs", "1", "--device", "cpu"]
    result = runner.invoke(app, again + ["-o", str(tmp_path / "ft2.pt"), "--warmup-epochs", "0.5", "--json", str(tmp_path / "ft2.json")])
    assert result.exit_code == 0, result.output
    assert "is trained: fine-tuning with --lr 0.01 (training from scratch" in result.output
    config = torch.load(tmp_path / "ft2.pt", weights_only=True)["steps"][-1]["config"]
    assert (config["lr"], config["warmup_epochs"]) == (0.01, 0.5)
    from gaborprune import workflows

    assert workflows.finetune_defaults(str(out)) == {"lr": 0.01, "warmup_epochs": 0.0}
    assert workflows.finetune_defaults("resnet20") == {} and workflows.finetune_defaults("resnet20", "w.pt")["lr"] == 0.01
    assert workflows.finetune_defaults(str(out), sparsity=0.1) == {}  # the pressure keeps the larger steps

    for bad, message in ((["--data", "mnist"], "unknown dataset 'mnist'"),
                         (["--data", f"cifar10:{tmp_path}"], "lacks data_batch_1"),
                         (["--data", "fake:100:7"], "has 7 classes; build the model with --num-classes 7")):
        result = runner.invoke(app, ["eval", str(out), "--trust-factory", *bad])
        assert result.exit_code == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sparsity_drives_gabor_kernels_to_zero_on_digits():
    """The paper's mechanism on real data: strong pressure removes most kernels, accuracy stays."""
    results = {}
    for strength in (0.0, 0.1):
        model, recipe = gp.load_model("resnet20_altered")
        train, test = load_data("digits", recipe.input_shape)
        results[strength] = finetune_(model, recipe, train, test, TrainConfig(epochs=5, batch_size=64, sparsity=strength),
                                      device=CPU, data_name="digits")
    plain, sparse = results[0.0], results[0.1]
    assert sparse.final_accuracy > 93
    assert sparse.kernels_alive["conv2"] < 0.5 * plain.kernels_alive["conv2"]
    assert sparse.kernels_alive["conv1"] < plain.kernels_alive["conv1"]
