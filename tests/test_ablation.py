"""`reproduce cada-ablation`: the settings build what they say, the toy run's table matches its
recipes and ONNX files, the verdicts follow the numbers, bad input is refused."""

import json

import numpy as np
import pytest
import torch

import gaborprune as gp
from gaborprune.ablation import DOWNS, MIXERS, SETTINGS, AblationReport, Row, Scale, verdict
from gaborprune.convert.cada import CADAConv2d
from gaborprune.convert.spec import select_layers
from gaborprune.data import DataSpec
from gaborprune.export.runtime import run, session
from helpers import one_line_error, run as cli


def test_settings_convert_exactly_the_layers_they_name():
    model, _ = gp.load_model("cada_net", input_shape=(3, 16, 16))
    assert select_layers(model, gp.ConversionSpec(targets=(MIXERS,)), (3, 16, 16)) == [
        "stages.0.blocks.0.mixer", "stages.1.blocks.0.mixer", "stages.2.blocks.0.mixer"]
    assert select_layers(model, gp.ConversionSpec(targets=(DOWNS,)), (3, 16, 16)) == ["stages.1.down.0", "stages.2.down.0"]
    for setting in SETTINGS:
        model, _ = gp.load_model("cada_net", input_shape=(3, 16, 16))
        for spec in setting.specs():
            gp.gaborize_(model, spec, (3, 16, 16))
        blocks = {n: m for n, m in model.named_modules() if isinstance(m, CADAConv2d)}
        want = (3 if setting.mixers else 0) + (2 if setting.down else 0)
        assert len(blocks) == want, setting.name
        mixer = blocks.get("stages.0.blocks.0.mixer")
        if mixer is not None:
            assert mixer.kernel_size == setting.mixers.get("kernel_size", 3)
            assert mixer.invariance == setting.mixers.get("invariance", "relaxed")
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    described = {s.name: s.describe() for s in SETTINGS}
    assert described["dw7"] == "depthwise k=7" and described["cada7-noctx"] == "CADA k=7 B=4 no context"
    assert described["down-dw3"] == "CADA k=7 B=4 r=3; downsampling: depthwise k=3"


def report_with(accuracies: dict[str, list[float]], test_images: int = 1000) -> AblationReport:
    seeds = len(next(iter(accuracies.values())))
    report = AblationReport("digits", Scale.for_data(DataSpec.parse("digits")), seeds, test_images)
    report.rows = [Row(name, "", "", acc, 1, 1) for name, acc in accuracies.items()]
    return report


def test_verdicts_follow_the_numbers():
    acc = {"dw3": [90, 91, 92], "dw7": [90.5, 91, 91.5], "cada3": [93, 93, 93], "cada7": [93, 94, 95],
           "cada7-noctx": [90, 90, 90], "cada7-r1": [93.5, 94, 94.5], "cada7-none": [96, 97, 98], "cada7-relpos": [93, 94, 95]}
    found = {v["claim"]: v for v in report_with(acc).verdicts()}
    # dw7 - dw3 = 0 and cada7 - cada3 = +1, with noise 2*sqrt((1 + 0.25) / 3) = 1.29 and 2*sqrt(1 / 3) = 1.15
    saturates = found["depthwise accuracy saturates with larger k, and CADA follows"]
    assert [round(c["noise"], 2) for c in saturates["comparisons"]] == [1.29, 1.15]
    assert saturates["verdict"] == "consistent"
    assert found["context awareness is the crucial property"]["verdict"] == "supported"  # +4 vs noise 1.15
    assert found["a small context is enough (r=1 vs r=3)"]["verdict"] == "consistent"
    assert found["no spatial invariance trains badly"]["verdict"] == "contradicted"  # -3
    assert found["relaxed invariance beats strict"]["verdict"] == "supported"  # +3 and +2
    assert found["relative position helps"]["verdict"] == "within noise"
    assert found["locality matters more for downsampling"]["verdict"] == "not run"


def test_verdict_kinds_and_the_one_image_floor():
    one = report_with({"a": [90.0], "b": [89.95]}, test_images=200)
    assert one.noise(*one.rows) == pytest.approx(0.5)  # one seed: no spread; one test image = 0.5 points
    assert verdict("better", [{"diff": 0.4, "noise": 0.5}]) == "within noise"
    one_image = (99.72527472527473 - 99.45054945054945, 100 / 364)  # 363 vs 362 of 364 right: not a finding
    assert one_image[0] > one_image[1] and verdict("better", [{"diff": one_image[0], "noise": one_image[1]}]) == "within noise"
    assert verdict("better", [{"diff": 0.6, "noise": 0.5}, {"diff": 0.1, "noise": 0.5}]) == "within noise"
    assert verdict("better", [{"diff": 0.6, "noise": 0.5}, {"diff": -0.6, "noise": 0.5}]) == "contradicted"
    assert verdict("not worse", [{"diff": -0.4, "noise": 0.5}]) == "consistent"
    assert verdict("not worse", [{"diff": -0.6, "noise": 0.5}]) == "contradicted"
    assert verdict("saturates", [{"diff": 2, "noise": 0.5}, {"diff": 3, "noise": 0.5}]) == "same trend, not saturated"
    assert verdict("saturates", [{"diff": 0, "noise": 0.5}, {"diff": 3, "noise": 0.5}]) == "not supported"


@pytest.mark.slow
def test_toy_ablation_table_matches_its_recipes_and_onnx_files(tmp_path):
    names = ["dw3", "cada7", "cada7-none", "down-cada7"]
    out = tmp_path / "abl"
    result = cli("reproduce", "cada-ablation", "--data", "fake:160:4", "--epochs", "1", "--seeds", "2", "--settings", ",".join(names),
                 "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in results["rows"]] == names and results["test_images"] == 32
    assert results["scale"]["input_shape"] == [3, 16, 16]
    x = torch.randn(2, 3, 16, 16)
    for row in results["rows"]:
        assert len(row["accuracies"]) == 2 and row["latency_ms"] > 0
        model, recipe = gp.load_model(str(out / f"{row['setting']}-seed0.pt"))  # replays the CADA conversions
        counts = gp.summarize(model, recipe.input_shape)
        assert (row["params"], row["macs"]) == (counts.params, counts.macs)
        assert any(isinstance(m, CADAConv2d) for m in model.modules())
        with torch.no_grad():
            want = model.eval()(x[:1]).numpy()
        got = run(session(out / f"{row['setting']}.onnx"), x[:1].numpy())
        np.testing.assert_allclose(got, want, atol=1e-4)
    verdicts = {v["claim"]: v["verdict"] for v in results["findings"]}
    assert verdicts["relaxed invariance beats strict"] == "not run"  # needs dw7 and cada3
    assert verdicts["no spatial invariance trains badly"] != "not run"
    assert "| cada7-none | spatial invariance | no invariance k=7 r=3 |" in (out / "results.md").read_text()


def test_ablation_bad_input(tmp_path):
    one_line_error(cli("reproduce", "cada-ablation", "--data", "digits", "--settings", "dw3,dw5", "--out", tmp_path),
                   "unknown ablation setting 'dw5'; known: conv3, dw3")
    one_line_error(cli("reproduce", "vgg16-cifar10", "--data", "digits", "--settings", "dw3", "--out", tmp_path),
                   "--settings applies to cada-ablation only")
    one_line_error(cli("reproduce", "cada-abl", "--data", "digits", "--out", tmp_path), "known: vgg16-cifar10, resnet20-altered-cifar10, cada-ablation")
    result = cli("reproduce", "cada-ablation", "--data", "digits", "--input-shape", "16,16", "--out", tmp_path)
    assert result.exit_code == 2 and "is not C,H,W" in result.output
    assert not any(tmp_path.iterdir())
    (tmp_path / "cada7-seed1.pt").write_text("a run of yesterday")
    one_line_error(cli("reproduce", "cada-ablation", "--data", "digits", "--seeds", "2", "--out", tmp_path), "cada7-seed1.pt", "--force")
    assert (tmp_path / "cada7-seed1.pt").read_text() == "a run of yesterday"
