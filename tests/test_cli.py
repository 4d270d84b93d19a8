"""The command line: real commands through Typer's runner, their files, JSON reports and errors."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import one_line_error, run


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    result = run("convert", "vgg16", "--layers", "2", "-o", d / "v.pt", "--json", d / "v.json")
    assert result.exit_code == 0, result.output
    return d


def test_convert_writes_recipe_and_report(recipe):
    report = json.loads((recipe / "v.json").read_text())
    assert report["model"] == "vgg16"
    assert [(layer["name"], layer["kernels"], layer["kernel_size"], layer["groups"]) for layer in report["layers"]] == [
        ("features.0", 192, [3, 3], 1), ("features.3", 4096, [3, 3], 1)]
    assert all(0 < layer["fit_rel_error"] < 1 for layer in report["layers"])
    # 9 weights per 3x3 kernel become 6 Gabor parameters
    assert report["params_before"] - report["params_after"] == (192 + 4096) * 3
    saved = torch.load(recipe / "v.pt", weights_only=True)
    assert saved["steps"][0]["layers"] == ["features.0", "features.3"]


def test_inspect_reports_counts_and_draws(recipe):
    result = run("inspect", recipe / "v.pt", "--json", recipe / "i.json", "--png", recipe / "banks.png")
    assert result.exit_code == 0, result.output
    assert "features.0" in result.output and "gabor" in result.output and "FLOPs" in result.output
    report = json.loads((recipe / "i.json").read_text())
    first = report["layers"][0]
    assert (first["name"], first["type"], first["kernel_size"], first["kernels"], first["kernels_alive"]) == ("features.0", "gabor", [3, 3], 192, 192)
    # golden MACs for CIFAR VGG-16 at 32x32: 313.2M in the convolutions + 5k in the classifier
    assert report["macs"] == 313_196_544 + 5_120 and report["flops"] == 2 * report["macs"]
    assert (recipe / "banks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convert_options(tmp_path):
    result = run("convert", "resnet20", "--target", "conv1", "--target", "re:layer1\\.0\\.conv.", "--init", "random",
                 "--kernel-size", "5", "--freeze", "psi", "--num-classes", "100", "-o", tmp_path / "r.pt", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert all(layer["kernel_size"] == [5, 5] and layer["fit_rel_error"] is None for layer in report["layers"])
    result = run("inspect", tmp_path / "r.pt", "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "i.json").read_text())["layers"]}
    assert (layers["conv1"]["type"], layers["conv1"]["kernel_size"]) == ("gabor", [5, 5])
    assert layers["layer1.1.conv1"]["type"] == "conv"


def test_convert_with_data_fits_outputs_and_reports_top1(tmp_path):
    result = run("convert", "resnet20", "--layers", "2", "--num-classes", "4", "--data", "fake:64:4", "--calibration-images", "32",
                 "-o", tmp_path / "r.pt", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    calibration = report["calibration"]
    assert (calibration["data"], calibration["images"]) == ("fake:64:4", 32)
    assert f"{calibration['accuracy_before']:.2f}% before -> {calibration['accuracy_after']:.2f}% converted" in result.stdout
    for layer in report["layers"]:
        assert 0 <= layer["output_error"] <= layer["weight_fit_output_error"]
        assert f"{layer['weight_fit_output_error']:.3f} -> {layer['output_error']:.3f}" in result.stdout
    saved = torch.load(tmp_path / "r.pt", weights_only=True)
    assert saved["metadata"]["calibration"] == calibration
    one_line_error(run("convert", "resnet20", "--layers", "1", "--calibration-images", "8", "-o", tmp_path / "x.pt"),
                   "--calibration-images counts the training images of --data")
    one_line_error(run("convert", "resnet20", "--layers", "1", "--data", "fake:64:4", "--calibration-images", "1", "-o", tmp_path / "x.pt"),
                   "--calibration-images must be an integer of at least 2, not 1")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("args, fragments", [
    (["convert", "resnet2", "--layers", "1"], ["unknown model 'resnet2'", "known: resnet20"]),
    (["convert", "resnet20", "--layers", "1", "--data", "mnist"], ["unknown dataset 'mnist'"]),
    (["convert", "resnet20", "--target", "fc"], ["target 'fc' is a Linear, not a Conv2d"]),
    (["convert", "resnet20", "--target", "layer9"], ["target 'layer9' matches no layer"]),
    (["convert", "resnet20", "--layers", "1", "--kernel-size", "1"], ["kernel size (1, 1) is smaller than the original (3, 3)"]),
    (["convert", "resnet20"], ["either --layers N or --target"]),
    (["convert", "resnet20", "--layers", "1", "--init", "zeros"], ["unknown --init 'zeros'"]),
    (["convert", "resnet20", "--layers", "1", "--weights", "nowhere.pt"], ["weights file 'nowhere.pt' not found"]),
    (["convert", "missing.pt", "--layers", "1"], ["recipe file 'missing.pt' not found"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    result = run(*args, "-o", tmp_path / "out.pt", "--json", tmp_path / "out.json")
    one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_weights_that_do_not_fit(tmp_path):
    from gaborprune import load_model

    torch.save(load_model("resnet32")[0].state_dict(), tmp_path / "w.pt")
    result = run("convert", "resnet20", "--layers", "1", "--weights", tmp_path / "w.pt", "-o", tmp_path / "o.pt")
    one_line_error(result, "does not fit model 'resnet20'", "unexpected")
    assert not (tmp_path / "o.pt").exists()


def test_corrupt_recipe(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    one_line_error(run("inspect", tmp_path / "bad.pt"), "is not a readable recipe")


def test_existing_outputs_are_kept_without_force(recipe, tmp_path):
    target = tmp_path / "keep.pt"
    target.write_bytes(b"precious")
    one_line_error(run("convert", "resnet20", "--layers", "1", "-o", target), "exists; pass --force")
    assert target.read_bytes() == b"precious"
    assert run("convert", "resnet20", "--layers", "1", "-o", target, "--force").exit_code == 0
    assert target.read_bytes() != b"precious"


def test_usage_errors_exit_2(tmp_path):
    result = run("inspect", "resnet20", "--input-shape", "3,32")
    assert result.exit_code == 2 and "not C,H,W" in result.output
    assert run("convert", "resnet20", "--layers", "1").exit_code == 2  # -o is required


def test_module_entry_point_and_clean_failure():
    ok = subprocess.run([sys.executable, "-m", "gaborprune", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "convert" in ok.stdout and "inspect" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "gaborprune", "inspect", "torchvision:resnet1"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown torchvision classification, detection or segmentation model 'resnet1'")
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_an_input_shape_the_model_cannot_take(tmp_path):
    one_line_error(run("inspect", "vgg16", "--input-shape", "3,16,16"), "the model failed on an input of shape [3, 16, 16]", "--input-shape")
    one_line_error(run("convert", "torchvision:vit_b_16", "--layers", "1", "--input-shape", "3,64,64", "-o", tmp_path / "v.pt"),
                   "failed on an input of shape [3, 64, 64]")
    assert not (tmp_path / "v.pt").exists()
