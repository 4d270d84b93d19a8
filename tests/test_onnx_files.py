"""ONNX files in `eval` and `inspect`, the untrained-weights warning of `convert`, `--version`, and a
quiet int8 quantiser."""

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import onnx
import pytest
import torch

import gaborprune as gp
import tiny_models
from gaborprune.data import load_data
from gaborprune.export import quantize
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.recipe import Recipe, save_recipe
from helpers import SHAPE, one_line_error, randomize_norms, run

DATA = "fake:200:4"  # 40 test images: a fixed batch of 7 leaves a short last batch of 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny VGG-like recipe with random BatchNorm statistics (so its predictions differ per image)
    and its exports: a fixed batch of 7, a dynamic batch, and a dynamic int8 one, with the reports."""
    d = tmp_path_factory.mktemp("onnx-files")
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Chain()).eval()
    recipe = Recipe(gp.ModelSource("tiny_models:Chain"), SHAPE)
    save_recipe(d / "m.pt", model, recipe)
    reports = {
        "fixed": export_model(model, SHAPE, d / "fixed.onnx", ExportConfig(batch_size=7, lowering="dense"), provenance=recipe.provenance()),
        "dynamic": export_model(model, SHAPE, d / "dynamic.onnx", ExportConfig(dynamic_batch=True, lowering="dense"), provenance=recipe.provenance()),
        "int8": export_model(model, SHAPE, d / "int8.onnx", ExportConfig(dynamic_batch=True, lowering="dense", quantize=True),
                             provenance=recipe.provenance(), data=load_data(DATA, SHAPE)),
    }
    return d, reports


def _eval_json(path, *args):
    out = Path(path).with_suffix(".eval.json")
    result = run("eval", path, "--data", DATA, "--threads", 1, "--json", out, "--force", *args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


@pytest.mark.parametrize("name, args", [("fixed", []), ("dynamic", ["--batch-size", "9"])])
def test_eval_of_an_onnx_file_equals_eval_of_its_recipe(files, name, args):
    d, _ = files
    want, _ = _eval_json(d / "m.pt", "--trust-factory", *args)
    got, printed = _eval_json(d / f"{name}.onnx", *args)
    # the oracle: PyTorch on the recipe; a padded row kept or a real one dropped would change samples and loss
    assert (got["top1"], got["top5"], got["samples"]) == (want["top1"], want["top5"], want["samples"]) == (want["top1"], want["top5"], 40)
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["runtime"] == "onnxruntime" and want["runtime"] == "pytorch" and got["provider"] == "cpu"
    assert got["batch_size"] == (7 if name == "fixed" else 9) and "onnxruntime cpu" in printed


def test_evaluate_onnx_api_on_an_int8_file(files):
    d, reports = files
    _, test = load_data(DATA, SHAPE)
    result = gp.evaluate_onnx(d / "int8.onnx", test, threads=1, provider="cpu")
    assert result.samples == 40 and result.top1 == pytest.approx(reports["int8"].accuracy["int8"])  # what export measured
    assert 0 <= result.top1 <= result.top5 <= 100 and result.to_dict()["runtime"] == "onnxruntime"


@pytest.mark.parametrize("name", ["fixed", "dynamic"])
def test_inspect_reports_what_export_reported(files, name):
    d, reports = files
    report = reports[name]
    out = d / f"{name}.inspect.json"
    result = run("inspect", d / f"{name}.onnx", "--json", out, "--force", "--threads", 1)
    assert result.exit_code == 0, result.output
    s = json.loads(out.read_text())
    assert (s["params"], s["macs"], s["macs_executed"], s["opset"], s["file_bytes"]) == (
        report.params, report.macs, report.macs_executed, report.opset, report.file_bytes)
    assert s["flops"] == 2 * s["macs"] and s["format"] == "onnx" and s["precision"] == "float"
    assert s["inputs"] == [{"name": "input", "shape": report.inputs[0]["shape"], "dtype": "float32"}] and s["input_shape"] == list(SHAPE)
    assert s["outputs"][0]["shape"] == [7 if name == "fixed" else "batch", 4]
    assert s["ops"]["Conv"] == 2 and s["nodes"] == sum(s["ops"].values()) == len(onnx.load(d / f"{name}.onnx").graph.node)
    meta = s["metadata"]
    assert meta["gaborprune.version"] == gp.__version__ and meta["gaborprune.source"] == "tiny_models:Chain"
    assert meta["gaborprune.kernels_kept"] == {"g1": [24, 24]} and meta["gaborprune.macs"] == report.macs
    assert "metadata gaborprune.kernels_kept: g1 24/24" in result.output and "input: input" in result.output
    assert gp.describe_onnx(d / f"{name}.onnx").macs == report.macs


def test_inspect_an_int8_file(files):
    d, reports = files
    s = gp.describe_onnx(d / "int8.onnx")
    assert s.precision == "int8" and "QuantizeLinear" in s.ops and s.file_bytes == reports["int8"].quantization["file_bytes"]
    assert s.macs_executed == reports["int8"].macs_executed  # quantisation keeps every shape
    assert quantize.PRE_PROCESS_SKIPPED not in s.metadata  # ONNX Runtime's pre-processing ran


@pytest.mark.parametrize("content", [b"not a model\n", b"", "truncated"])
@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_a_corrupt_onnx_file_gives_one_line(files, tmp_path, content, command):
    d, _ = files
    bad = tmp_path / "bad.onnx"
    bad.write_bytes((d / "fixed.onnx").read_bytes()[:300] if content == "truncated" else content)
    args = ["--data", DATA] if command == "eval" else []
    one_line_error(run(command, bad, *args, "--json", tmp_path / "x.json"), "'" + str(bad) + "'", "ONNX model", "export it again")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("command, args, fragments", [
    ("eval", ["--data", DATA, "--input-shape", "3,8,8"], ["takes images of 3x16x16", "gives 3x8x8"]),
    ("eval", ["--data", "fake:200:5"], ["has 4 outputs", "dataset 'fake:200:5' has 5 classes", "--num-classes 5"]),
    ("eval", ["--data", DATA, "--batch-size", "8"], ["fixed batch of 7, not --batch-size 8; drop --batch-size, or export with `dynamic_batch`"]),
    ("eval", ["--data", DATA, "--weights", "w.pt", "--num-classes", "3"], ["is an ONNX model", "drop --num-classes/--weights"]),
    ("eval", ["--data", DATA, "--device", "tpu"], ["unknown device 'tpu'", "known: auto, cpu, cuda"]),
    ("inspect", ["--input-shape", "3,8,8"], ["drop --input-shape"]),
    ("inspect", ["--png", "banks.png"], ["--png draws a recipe's Gabor banks"]),
])
def test_an_onnx_file_that_does_not_fit_gives_one_line(files, tmp_path, command, args, fragments):
    d, _ = files
    one_line_error(run(command, d / "fixed.onnx", *args, "--json", tmp_path / "x.json"), *fragments)
    assert list(tmp_path.iterdir()) == []
    one_line_error(run(command, tmp_path / "missing.onnx", *([] if command == "inspect" else ["--data", DATA])), "ONNX file", "not found")


WARNING = "has no --weights, so its kernels are untrained"


@pytest.mark.parametrize("source, extra, warned", [
    ("torchvision:mobilenet_v3_small", [], True),
    ("torchvision:mobilenet_v3_small", ["--weights"], False),
    ("tiny_models:Chain", [], True),  # a factory
    ("resnet20", [], True),  # built-ins start from seeded random weights too (README, convert)
    ("resnet20", ["--init", "random"], False),  # nothing is fitted
    ("recipe", [], False),  # a recipe carries its weights
])
def test_convert_warns_once_when_the_fit_is_to_untrained_kernels(files, tmp_path, source, extra, warned):
    d, _ = files
    if source == "recipe":
        source = d / "m.pt"
    if extra == ["--weights"]:
        import torchvision

        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "state_dict.pt")
        extra = ["--weights", tmp_path / "state_dict.pt"]
    shape = "3,64,64" if str(source).startswith("torchvision:") else ",".join(map(str, SHAPE))  # mobilenet halves 16x16 to nothing
    result = run("convert", source, "--layers", 1, "--input-shape", shape, "-o", tmp_path / "c.pt", "--threads", 1,
                 *(["--trust-factory"] if str(source).endswith(".pt") else []), *extra)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if warned:
        assert len(lines) == 1 and lines[0].startswith("warning: ") and WARNING in lines[0] and "--weights state_dict.pt" in lines[0], result.stderr
    else:
        assert WARNING not in result.stderr, result.stderr


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"gaborprune {version('gaborprune')}\n"


# -- the int8 quantiser stays quiet ---------------------------------------------------------------
@pytest.fixture
def float_model(files):
    d, _ = files
    return (d / "dynamic.onnx").read_bytes()


def test_export_int8_prints_no_quantiser_logging(files, tmp_path):
    d, _ = files
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "gaborprune", "export", str(d / "m.pt"), "--trust-factory", "-o", str(tmp_path / "q.onnx"),
                           "--quantize", "int8", "--data", DATA, "--lowering", "dense", "--threads", "1"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "int8 (static)" in done.stdout
    for stream in (done.stdout, done.stderr):
        assert "WARNING" not in stream and "pre-processing" not in stream, stream


@pytest.mark.parametrize("calibrate", [True, False])
@pytest.mark.parametrize("pre_process", ["runs", "fails"])
def test_quantiser_logs_nothing_and_leaves_logging_as_it_was(float_model, monkeypatch, capfd, calibrate, pre_process):
    if pre_process == "fails":  # the fallback: quantise as is; the quantiser then gives its advice, which is dropped
        monkeypatch.setattr(quantize, "_pre_process", lambda src, dst: "symbolic shape inference failed")
    root = logging.getLogger()
    saved = root.handlers[:]
    records = []

    class Catch(logging.Handler):
        def emit(self, record):
            records.append(record)

    root.handlers[:] = []  # as in a plain process: the quantiser's logging.warning() would install a stderr handler here
    catch = Catch()
    try:
        calibration = [torch.randn(1, *SHAPE).numpy() for _ in range(4)] if calibrate else None
        blob, mode = quantize.quantize_int8(float_model, calibration)
        left = root.handlers[:]
        root.addHandler(catch)
        logging.warning("a later warning")  # must not find a handler the quantiser left behind
    finally:
        root.handlers[:] = saved
    assert left == [] and [r.getMessage() for r in records] == ["a later warning"]
    assert capfd.readouterr() == ("", "")  # nor through logging's last-resort handler, nor printed
    assert mode == ("static" if calibrate else "dynamic")
    meta = {p.key: p.value for p in onnx.load_from_string(blob).metadata_props}
    assert meta.get(quantize.PRE_PROCESS_SKIPPED) == ("symbolic shape inference failed" if pre_process == "fails" else None)
    assert meta["gaborprune.source"] == "tiny_models:Chain"  # the exporter's metadata survives both paths


def test_quantiser_advice_is_dropped_not_every_warning(float_model, monkeypatch, caplog):
    monkeypatch.setattr(quantize, "_pre_process", lambda src, dst: "skipped for the test")
    with caplog.at_level(logging.WARNING):
        quantize.quantize_int8(float_model)
        with quantize._quiet_quantizer():
            logging.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
