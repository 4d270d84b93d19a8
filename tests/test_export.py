"""Export: the deploy lowering is exact, ONNX Runtime matches PyTorch, and bench reports honestly."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune.export import MapBias, SplitConv, lower, output_groups
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.export.macs import onnx_counts
from gaborprune.export.runtime import layer_of, run, session
from gaborprune.recipe import save_recipe
from helpers import FAMILIES, SHAPE, one_line_error, pruned_family, randomize_norms, run as cli

torch.set_grad_enabled(True)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("form", ["dense", "split"])
def test_lowering_computes_what_the_model_does(family, form):
    model, recipe = pruned_family(family)
    deploy, report = lower(model, SHAPE, form)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        assert (deploy(x) - model.eval()(x)).abs().max().item() <= 1e-5
    assert not any(isinstance(m, (gp.GaborConv2d, nn.BatchNorm2d)) for m in deploy.modules()) or family == "densenet-concat"
    if form == "split":
        assert any(isinstance(m, SplitConv) for m in deploy.modules())


def test_constant_channels_into_zero_padded_convs_are_cut_at_export():
    model, recipe = pruned_family("vgg-chain", sparsify=False)  # g1 channels 3, 4 (0, 1 after the recipe's cut) feed 0.5 into conv2
    assert model.g1.out_channels == 5
    deploy, report = lower(model, SHAPE, pad=0)
    assert report.channels_cut["g1"]["out"] == [0, 1] and report.bias_maps == ["conv2"]
    assert deploy.g1.out_channels == 3 and isinstance(deploy.conv2, MapBias) and deploy.conv2.conv.in_channels == 3
    assert report.batchnorms_folded == 2
    padded, report = lower(model, SHAPE, pad=8)  # 3 channels are off ONNX Runtime's blocks of 8: grown with zeros
    assert report.padded == ["g1"] and padded.g1.out_channels == 8 and padded.conv2.conv.in_channels == 8
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert (padded(x) - deploy(x)).abs().max().item() <= 1e-5 and (padded(x) - model.eval()(x)).abs().max().item() <= 1e-5


def test_split_conv_and_output_groups():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    support = torch.rand(10, 6) > 0.6
    support[3] = False  # an output without kernels: its bias
    with torch.no_grad():
        conv.weight.mul_(support[..., None, None])
    groups = output_groups(support, max_groups=3)
    assert len(groups) <= 3 and sorted(o for g in groups for o in g) == [o for o in range(10) if o != 3]
    split = SplitConv(conv, groups)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(split(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A kernel-sparse Residual model, its recipe, and a sparse export with a dynamic batch."""
    d = tmp_path_factory.mktemp("export")
    model, recipe = pruned_family("resnet-residual")
    save_recipe(d / "r.pt", model, recipe)
    report = export_model(model, SHAPE, d / "r.onnx", ExportConfig(lowering="sparse", dynamic_batch=True))
    return d, model, report


def test_onnxruntime_matches_pytorch_and_metadata_is_there(exported):
    d, model, report = exported
    sess = session(str(d / "r.onnx"), threads=1)
    for batch in (1, 5):
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            np.testing.assert_allclose(run(sess, x.numpy()), model.eval()(x).numpy(), atol=1e-4, rtol=0)
    assert report.max_abs_diff <= 1e-4 and report.cosine > 0.999999
    assert report.inputs == [{"name": "input", "shape": ["batch", 3, 16, 16]}]
    proto = onnx.load(d / "r.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["gaborprune.version"] == gp.__version__ and json.loads(meta["gaborprune.kernels_kept"])["g1"][1] == 6 * 3
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Relu", "Add", "Gather", "Concat", "ReduceMean", "Gemm", "Reshape", "Flatten", "Expand", "Shape",
                                                     "GlobalAveragePool", "Slice", "Unsqueeze", "MatMul", "Squeeze", "Identity"}
    assert report.file_bytes == (d / "r.onnx").stat().st_size and report.lowering["g2"].startswith("split")


def test_macs_counted_from_the_onnx_graph_match_the_model(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Chain()).eval()
    report = export_model(model, SHAPE, tmp_path / "c.onnx", ExportConfig(lowering="dense"))
    assert report.macs == gp.summarize(model, SHAPE).macs == report.macs_executed
    with torch.no_grad():
        model.g1.mask[:, 0] = 0  # 8 of 24 kernels: the model's arithmetic drops, the dense graph's does not
    report = export_model(model, SHAPE, tmp_path / "m.onnx", ExportConfig(lowering="dense"))
    assert report.macs == gp.summarize(model, SHAPE).macs < report.macs_executed
    assert onnx_counts(onnx.load(tmp_path / "m.onnx")).macs == report.macs


def test_auto_lowering_measures_each_sparse_layer(tmp_path, monkeypatch):
    """Injected timings: the profiler finds g1 faster split and g2 faster dense; the whole graph
    with g1 split is then timed 20% faster than every other candidate, beyond the noise."""
    from gaborprune import cpu
    from gaborprune.export import search
    from gaborprune.export.runtime import Latency

    def split_layers(proto):
        return {n.name for n in proto.graph.node if n.op_type == "Gather"}

    def profile(blob, proto, x, layers, threads):
        split = bool(split_layers(proto))
        return {"g1": 0.2 if split else 0.3, "g2": 0.5 if split else 0.4}

    rng = np.random.default_rng(0)

    def time_interleaved(blobs, x, warmup, runs):
        base = rng.uniform(0.8, 1.6, size=runs)
        return [Latency.of(list(base * (0.8 if split_layers(onnx.load_from_string(b)) else 1.0) * (1 + rng.uniform(-0.03, 0.03, runs)) / 1e3))
                for b in blobs]
    monkeypatch.setattr(search, "profile", profile)
    monkeypatch.setattr(search, "session", lambda blob, threads=None: blob)  # time_interleaved gets the graphs
    monkeypatch.setattr(search, "time_interleaved", time_interleaved)
    monkeypatch.setattr(cpu, "cpu_block", lambda cpuinfo=None: 0)
    model, recipe = pruned_family("folds")
    report = export_model(model, SHAPE, tmp_path / "a.onnx", ExportConfig(lowering="auto", threads=1))
    assert set(report.lowering_ms) == set(report.sparse_kernels) == {"g1", "g2"}
    assert report.lowering_ms == {"g1": {"dense": 0.3, "split": 0.2}, "g2": {"dense": 0.4, "split": 0.5}}
    assert report.lowering["g1"].startswith("split") and report.lowering["g2"] == "dense"
    [kept] = [c for c in report.candidates if c["kept"]]
    assert kept["split"] == ["g1"] and kept["ratio"]["high"] < 1 and "split g1" in report.lowering_note


def test_export_refuses_when_onnxruntime_differs(tmp_path):
    model, recipe = pruned_family("vgg-chain")
    with pytest.raises(gp.GaborPruneError, match="more than `atol` 1e-12; nothing was written"):
        export_model(model, SHAPE, tmp_path / "x.onnx", ExportConfig(lowering="dense", atol=1e-12))
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_with_int8_and_data(exported, tmp_path):
    d, _, _ = exported
    result = cli("export", d / "r.pt", "--trust-factory", "-o", tmp_path / "q.onnx", "--quantize", "int8", "--data", "fake:64:4",
                 "--lowering", "dense", "--json", tmp_path / "q.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.json").read_text())
    for key in ("path", "opset", "inputs", "max_abs_diff", "cosine", "file_bytes", "params", "macs", "flops", "lowering"):
        assert key in report
    assert report["quantization"]["mode"] == "static" and report["quantization"]["compared_on"] == "test images"
    assert set(report["accuracy"]) == {"onnx", "int8"}
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in onnx.load(tmp_path / "q.onnx").graph.node)


@pytest.mark.parametrize("args,fragments", [
    (["--input-shape", "1,3,16"], None),
    (["--lowering", "fast"], ["unknown --lowering 'fast'"]),
    (["--quantize", "int4"], ["unknown --quantize 'int4'"]),
    (["--opset", "9"], ["--opset 9 is not supported"]),
    (["--input-shape", "1,4,16,16"], ["the model failed on an input of shape [4, 16, 16]", "--input-shape"]),
])
def test_cli_export_bad_input(exported, tmp_path, args, fragments):
    d, _, _ = exported
    result = cli("export", d / "r.pt", "--trust-factory", "-o", tmp_path / "x.onnx", *args)
    if fragments is None:
        assert result.exit_code == 2 and "is not N,C,H,W" in result.output
    else:
        one_line_error(result, *fragments)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_bench_reports_latency_comparison_profile_and_files(exported, tmp_path):
    d, model, _ = exported
    base = copy.deepcopy(model)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, gp.GaborConv2d):
                m.mask.fill_(1)
    export_model(base, SHAPE, tmp_path / "base.onnx", ExportConfig(lowering="dense", dynamic_batch=True))
    result = cli("bench", d / "r.onnx", "--baseline", tmp_path / "base.onnx", "--batch-size", "1,2", "--threads", "1", "--runs", "5",
                 "--warmup", "1", "--max-seconds", "10", "--profile", "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.md",
                 "--png", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert {"cpu", "cores", "onnxruntime", "torch", "threads"} <= set(report["environment"])
    assert [(r["batch_size"], r["threads"]) for r in report["results"]] == [(1, 1), (1, 1), (2, 1), (2, 1)]
    for r in report["results"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] == pytest.approx(r["batch_size"] / r["p50_ms"] * 1e3)
        assert r["p50_low_ms"] <= r["p50_ms"] <= r["p50_high_ms"] and r["runs"] >= 5 * r["rounds"]
    executed = [onnx_counts(onnx.load(f)).macs_executed for f in (d / "r.onnx", tmp_path / "base.onnx")]
    for c in report["comparisons"]:  # the speedup is the median of per-run ratios (tests/test_bench.py checks it on fixed timings)
        assert c["speedup_low"] <= c["speedup"] <= c["speedup_high"]
        assert c["mac_ratio"] == pytest.approx(executed[0] / executed[1]) and c["mac_ratio"] < 1
        if c["verdict"] in ("faster", "slower"):
            assert c["efficiency"] == pytest.approx((1 - 1 / c["speedup"]) / (1 - c["mac_ratio"]))
        else:
            assert c["efficiency"] is None and not c["stable"]
    assert set(report["profiles"]) == {str(d / "r.onnx"), str(tmp_path / "base.onnx")}
    assert any(layer.startswith("g1") for layer in report["profiles"][str(d / "r.onnx")])
    assert "| model | runtime |" in (tmp_path / "b.md").read_text() and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_bad_input(exported, tmp_path):
    d, _, _ = exported
    static = tmp_path / "static.onnx"
    model, recipe = pruned_family("resnet-residual")
    export_model(model, SHAPE, static, ExportConfig(lowering="dense"))
    one_line_error(cli("bench", static, "--batch-size", "2"), "fixed batch of 1", "export it with `dynamic_batch` or bench with --batch-size 1")
    (tmp_path / "junk.onnx").write_text("not a model")
    one_line_error(cli("bench", tmp_path / "junk.onnx"), "is not an ONNX model")
    one_line_error(cli("bench", d / "r.onnx", "--provider", "cuda"), "CUDAExecutionProvider is not installed")
    one_line_error(cli("bench", tmp_path / "missing.onnx"), "not found")


def test_layer_of_reads_the_exporters_namespace():
    ns = ": M/layer1.0: Block/layer1.0.conv1: gaborprune.export.lower.SplitConv/layer1.0.conv1.convs.0: Conv2d/conv2d_3: aten.conv2d.default"
    assert layer_of(ns, ["layer1.0", "layer1.0.conv1", "layer1.0.conv2"]) == "layer1.0.conv1"
    assert layer_of(": M/fc: Linear/linear: aten.linear.default", ["layer1.0.conv1"]) is None
