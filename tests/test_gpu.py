"""The CUDA paths, run on a machine with a GPU (skipped elsewhere, so CI on CPUs skips them).

Oracles: the same computation on the CPU in float64 (gradients of a Gabor network and of every CADA
mode), and the GPU-trained model evaluated again on the CPU in float32 (the whole pipeline: finetune
on CUDA with bf16 autocast and channels_last, then eval, prune and export on the CPU).
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import gaborprune as gp
from gaborprune.cli import app
from gaborprune.convert.cada import CADAConv2d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def grads_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, dict]:
    model = copy.deepcopy(model).to(device)
    loss = F.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    return float(loss.detach()), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(model, x, y):
    loss_cpu, cpu = grads_on(model, x, y, torch.device("cpu"))
    loss_gpu, gpu = grads_on(model, x, y, CUDA)
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-9)
    assert cpu.keys() == gpu.keys() and cpu
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-7, atol=1e-9, msg=name)


def test_gabor_network_gradients_on_cuda_match_cpu():
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20")
    gp.gaborize_(model, gp.ConversionSpec(first=3, init="random"), recipe.input_shape)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    assert_same_grads(model.double().train(), x, y)


@pytest.mark.parametrize("invariance, bases, context, stride", [
    ("strict", 1, 0, 1), ("relaxed", 3, 3, 1), ("relaxed", 3, 3, 2), ("none", 1, 3, 1)])
def test_cada_gradients_on_cuda_match_cpu(invariance, bases, context, stride):
    torch.manual_seed(0)
    layer = CADAConv2d(8, 8, 5, stride=stride, bases=bases, context=context, invariance=invariance,
                       rel_pos=invariance != "strict").double()
    head = torch.nn.Sequential(layer, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4).double())
    x, y = torch.randn(4, 8, 12, 12, dtype=torch.float64), torch.randint(0, 4, (4,))
    assert_same_grads(head, x, y)


def test_finetune_on_cuda_then_eval_prune_export_on_cpu(tmp_path):
    """bf16 autocast + channels_last training on the GPU; the saved recipe is a plain CPU model."""
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    cli("convert", "resnet20_altered", "--layers", "2", "-o", tmp_path / "c.pt")
    cli("finetune", tmp_path / "c.pt", "--data", "digits", "--epochs", "6", "--batch-size", "64", "--sparsity", "0.1",
        "--device", "cuda", "-o", tmp_path / "ft.pt", "--json", tmp_path / "ft.json")
    trained = json.loads((tmp_path / "ft.json").read_text())
    assert trained["device"].startswith("cuda") and trained["final_accuracy"] > 90
    assert trained["kernels_alive"]["conv2"] < trained["kernels_total"]["conv2"]

    cli("eval", tmp_path / "ft.pt", "--data", "digits", "--device", "cpu", "--json", tmp_path / "eval.json")
    on_cpu = json.loads((tmp_path / "eval.json").read_text())
    assert abs(on_cpu["top1"] - trained["final_accuracy"]) <= 1.0  # bf16 vs float32 evaluation: a few of 364 images

    cli("prune", tmp_path / "ft.pt", "-o", tmp_path / "p.pt", "--data", "digits")
    cli("export", tmp_path / "p.pt", "-o", tmp_path / "p.onnx")
    assert (tmp_path / "p.onnx").stat().st_size > 0
