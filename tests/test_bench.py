"""`bench` is honest: rounds repeat until the medians are tight, speedups are per-run ratios with an
interval and a verdict, efficiency counts executed MACs, int8 meets only int8, and the profile says
what the converted layers can buy at most. Every timing here is injected: nothing depends on speed."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.export import bench as bench_mod, runtime
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.export.bench import bench
from gaborprune.export.bench_models import BenchModel, load_onnx, precision_of, quantized
from gaborprune.export.onnx import ExportError
from gaborprune.export.results import converted_share
from gaborprune.export.runtime import Latency
from helpers import one_line_error, run as cli

SHAPE = (3, 16, 16)
# executed MACs per image of `net(width)`: the 5x5 bank, the strided 3x3 conv, the linear head
WIDE, NARROW = (19200 * w + 9216 * w + 64 for w in (8, 4))


def net(width: int) -> nn.Module:
    """A Gabor bank (the converted layer, "0") + BN, a plain conv + BN, pooling, a linear head."""
    return nn.Sequential(gp.GaborConv2d(3, width, 5, padding=2, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """base.onnx (width 8) and small.onnx (width 4, half of its plain conv's kernels zero, scattered so
    that no channel dies: the zeros are executed), and small-int8.onnx (dynamic int8 of small)."""
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    small = net(4).eval()
    with torch.no_grad():
        o, i = torch.meshgrid(torch.arange(16), torch.arange(4), indexing="ij")
        small[3].weight[(o + i) % 2 == 0] = 0
    for name, model in (("base", net(8).eval()), ("small", small)):
        export_model(model, SHAPE, d / f"{name}.onnx", ExportConfig(lowering="dense", dynamic_batch=True))
    q, mode = quantized(load_onnx(d / "small.onnx"))
    assert mode == "dynamic"
    (d / "small-int8.onnx").write_bytes(q.onnx)
    return d


def inject(monkeypatch, plan, seconds_per_round: float = 1.0) -> list[int]:
    """Replace the timing bench calls: round r of session k (sessions in bench's order: the models, their
    int8 copies, the baselines, theirs) gets the milliseconds plan(k, r, runs); each round advances
    bench's clock by `seconds_per_round`. Returns the rounds' session counts, one per call."""
    clock, calls = [0.0], []

    def time_interleaved(sessions, x, warmup, runs):
        r = len(calls)
        calls.append(len(sessions))
        clock[0] += seconds_per_round
        return [Latency.of_ms(plan(k, r, runs)) for k in range(len(sessions))]

    monkeypatch.setattr(runtime, "time_interleaved", time_interleaved)
    monkeypatch.setattr(bench_mod, "_now", lambda: clock[0])
    return calls


def constant(*ms):
    """Session k always takes ms[k] milliseconds."""
    return lambda k, r, runs: [ms[k]] * runs


def models(files, *names):
    return [load_onnx(files / f"{n}.onnx", n) for n in names]


# -- rounds ----------------------------------------------------------------------------------------
def test_rounds_repeat_until_every_median_is_tight_then_stop(files, monkeypatch):
    # three rounds spread over +-50% (a median known to no better than that), then steady timings
    spread = np.linspace(0.5, 1.5, 20)
    calls = inject(monkeypatch, lambda k, r, runs: list(spread * (k + 1)) if r < 3 else [1.0 * (k + 1)] * runs)
    small, base = models(files, "small", "base")
    report = bench([small], baseline=base, runs=20, max_seconds=1000)
    assert 3 < len(calls) < 20  # repeated past the noisy rounds, and stopped once tight, far before the budget
    for r in report.results:
        assert r.rounds == len(calls) and r.latency.runs == 20 * len(calls) and r.converged
        assert r.interval.relative_width <= 0.02 and r.interval.low <= r.latency.p50 <= r.interval.high
    assert not report.warnings or "busy" in report.warnings[0]


def test_rounds_stop_at_max_seconds_and_say_so(files, monkeypatch):
    rng = np.random.default_rng(0)
    calls = inject(monkeypatch, lambda k, r, runs: list(rng.uniform(0.5, 1.5, runs)))  # never tight at 2 runs a round
    small, base = models(files, "small", "base")
    report = bench([small], baseline=base, batch_sizes=(1, 2), runs=2, max_seconds=6)
    assert len(calls) == 6  # 3 rounds a configuration: the budget is shared
    assert [r.rounds for r in report.results] == [3, 3, 3, 3] and not any(r.converged for r in report.results)
    assert "did not reach +-1.0% within `max_seconds` 6" in report.warnings[-1]
    assert "when `max_seconds` ran out" in report.results[0].note


def test_one_round_is_enough_when_it_is_tight_and_large_enough(files, monkeypatch):
    calls = inject(monkeypatch, constant(1.0, 2.0))
    report = bench(models(files, "small"), baseline=models(files, "base")[0], runs=20)
    assert len(calls) == 1 and [r.latency.runs for r in report.results] == [20, 20]
    calls.clear()
    report = bench(models(files, "small"), runs=3)  # 3 equal runs are not a 95% interval: rounds go on to 20 samples
    assert len(calls) == 7 and report.results[0].latency.runs == 21 and report.results[0].converged


def test_interleaving_rotates_who_goes_first():
    class Session:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def get_inputs(self):
            return [type("I", (), {"name": "input", "shape": [1]})()]

        def run(self, _, feeds):
            self.log.append(self.name)
            return [np.zeros(1)]

    log = []
    lat = runtime.time_interleaved([Session("a", log), Session("b", log), Session("c", log)], np.zeros(1), 0, 6)
    firsts = log[::3]
    assert firsts == ["a", "b", "c", "a", "b", "c"] and [x.runs for x in lat] == [6, 6, 6]


# -- verdicts --------------------------------------------------------------------------------------
def test_a_clear_speedup_has_its_interval_and_efficiency_on_executed_macs(files, monkeypatch):
    inject(monkeypatch, constant(1.0, 2.0))
    small, base = models(files, "small", "base")
    assert (small.macs_executed, base.macs_executed) == (NARROW, WIDE)
    assert small.macs < NARROW  # the zero kernels: skipped by the arithmetic count, executed all the same
    (c,) = bench([small], baseline=base, runs=9).comparisons
    assert (c.speedup, c.speedup_low, c.speedup_high) == (2.0, 2.0, 2.0) and c.verdict == "faster" and c.stable
    assert c.mac_ratio == NARROW / WIDE and (c.macs_executed, c.baseline_macs_executed) == (NARROW, WIDE)
    assert c.efficiency == pytest.approx((1 - 1 / 2) / (1 - NARROW / WIDE))


def test_the_speedup_pairs_the_runs(files, monkeypatch):
    # the machine drifts (1 to 5 ms) and the model takes half of every run but the first (a hiccup):
    # per-run ratios 0.4, 2, 2, 2, 2 have the median 2; the medians' ratio (3 / 2) would say 1.5
    drift, model = [1.0, 2.0, 3.0, 4.0, 5.0], [2.5, 1.0, 1.5, 2.0, 2.5]
    inject(monkeypatch, lambda k, r, runs: model if k == 0 else drift)
    small, base = models(files, "small", "base")
    report = bench([small], baseline=base, runs=5, max_seconds=1)
    assert report.results[1].latency.p50 / report.results[0].latency.p50 == 1.5
    assert report.comparisons[0].speedup == 2.0


def test_a_speedup_within_noise_is_flagged_and_has_no_efficiency(files, monkeypatch):
    rng = np.random.default_rng(1)
    inject(monkeypatch, lambda k, r, runs: list(rng.uniform(0.9, 1.1, runs)))  # the same distribution for both
    small, base = models(files, "small", "base")
    (c,) = bench([small], baseline=base, runs=50, max_seconds=1).comparisons
    assert c.speedup_low <= 1 <= c.speedup_high
    assert c.verdict == "within noise" and not c.stable and c.efficiency is None


def test_a_gain_finer_than_the_precision_is_within_noise(files, monkeypatch):
    inject(monkeypatch, constant(1.0, 1.004))  # 0.4% faster, beyond doubt but below the +-1% timed to
    (c,) = bench(models(files, "small"), baseline=models(files, "base")[0], runs=5).comparisons
    assert c.speedup == pytest.approx(1.004) and c.verdict == "within noise" and "below the +-1.0%" in c.note
    assert c.efficiency is None


def test_an_interval_wider_than_the_gain_is_uncertain(files, monkeypatch):
    # per-run ratios: sorted, the 95% interval of 20 is [x5, x14] = [1.002, 1.2] around a median of 1.045
    ratios = [1.002] * 6 + [1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.2] + [1.3] * 5
    inject(monkeypatch, lambda k, r, runs: [1 / q for q in ratios] if k == 0 else [1.0] * 20)
    (c,) = bench(models(files, "small"), baseline=models(files, "base")[0], runs=20, max_seconds=1).comparisons
    assert (c.speedup_low, c.speedup, c.speedup_high) == pytest.approx((1.002, 1.045, 1.2))
    assert c.verdict == "uncertain" and c.efficiency is None and not c.stable


def test_a_long_tail_makes_a_result_unstable(files, monkeypatch):
    tail = [1.0] * 7 + [3.0] * 3  # p90/p50 = 3
    inject(monkeypatch, lambda k, r, runs: tail * (runs // 10) if k == 0 else [2.0] * runs)
    report = bench(models(files, "small"), baseline=models(files, "base")[0], runs=10, max_seconds=1)
    model, base = report.results
    assert not model.stable and base.stable and "p90/p50 3.0 above 2" in model.note
    (c,) = report.comparisons
    assert c.verdict == "unstable" and c.efficiency is None and c.speedup is not None


# -- precisions ------------------------------------------------------------------------------------
def test_precision_is_read_from_the_graph_and_int8_counts_executed_macs(files, tmp_path):
    small, base, small8 = models(files, "small", "base", "small-int8")
    assert (small.precision, base.precision, small8.precision) == ("float", "float", "int8")
    assert "ConvInteger" in {n.op_type for n in small8.proto.graph.node}
    assert small8.macs_executed == NARROW  # counted on the int8 graph itself
    static, mode = quantized(base, [np.random.default_rng(0).standard_normal((4, *SHAPE), dtype=np.float32)])
    assert mode == "static" and precision_of(static.proto) == "int8"
    (tmp_path / "static.onnx").write_bytes(static.onnx)
    assert load_onnx(tmp_path / "static.onnx").macs_executed == WIDE  # QDQ: the weights come through DequantizeLinear
    assert BenchModel("m", static.onnx, static.proto, 0).executed == WIDE  # counted when first needed
    assert precision_of(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))) == "float"


def test_int8_is_never_compared_with_float(files, monkeypatch):
    inject(monkeypatch, constant(1.0, 0.5, 2.0))
    small, small8, base = models(files, "small", "small-int8", "base")
    report = bench([small, small8], baseline=base, runs=5)
    by = {c.model: c for c in report.comparisons}
    assert by["small"].verdict == "faster" and by["small"].speedup == 2.0
    mixed = by["small-int8"]
    assert mixed.verdict == "precisions differ" and mixed.speedup is None and mixed.efficiency is None and not mixed.stable
    assert (mixed.precision, mixed.baseline_precision) == ("int8", "float")


def test_int8_copies_meet_the_int8_baseline(files, monkeypatch):
    # sessions: small, small (int8), base, base (int8)
    inject(monkeypatch, constant(1.0, 0.4, 2.0, 0.5))
    small, base = models(files, "small", "base")
    report = bench([small], baseline=base, runs=5, int8=True)
    assert [r.model for r in report.results] == ["small", "small (int8)", "base", "base (int8)"]
    assert [r.precision for r in report.results] == ["float", "int8", "float", "int8"]
    by = {c.model: c for c in report.comparisons}
    assert by["small"].baseline == "base" and by["small"].speedup == 2.0
    assert by["small (int8)"].baseline == "base (int8)" and by["small (int8)"].speedup == pytest.approx(1.25)
    assert all(c.precision == c.baseline_precision for c in report.comparisons) and report.settings["int8"] == "dynamic"
    assert by["small (int8)"].mac_ratio == NARROW / WIDE


def test_a_baseline_per_precision(files, monkeypatch):
    inject(monkeypatch, constant(1.0, 0.5, 2.0, 0.6))
    small, small8, base = models(files, "small", "small-int8", "base")
    base8, _ = quantized(base)
    report = bench([small, small8], baseline=[base, base8], runs=5)
    by = {c.model: c for c in report.comparisons}
    assert (by["small"].baseline, by["small-int8"].baseline) == ("base", "base (int8)")
    assert by["small-int8"].speedup == pytest.approx(1.2)
    with pytest.raises(ExportError, match="two float baselines"):
        bench([small], baseline=[base, small], runs=5)


# -- profile ---------------------------------------------------------------------------------------
def test_converted_share_sums_the_layers_and_what_is_inside_them():
    layers = {"layer1.0.conv1": 0.2, "layer1.0.conv1.convs.0": 0.1, "layer1.0.conv10": 0.4, "fc": 0.3}
    share = converted_share(layers, ["layer1.0.conv1"])
    assert share["layers"] == ["layer1.0.conv1", "layer1.0.conv1.convs.0"]  # not layer1.0.conv10
    assert share["share"] == pytest.approx(0.3) and share["bound"] == pytest.approx(1 / 0.7)
    assert converted_share(layers, ["conv9"])["share"] is None
    assert converted_share({"g": 1.0}, ["g"])["bound"] is None  # all the time: no finite bound


def test_profile_reports_the_converted_layers_share_and_bound(files, monkeypatch, tmp_path):
    inject(monkeypatch, constant(1.0, 2.0))
    profiles = {"small": {"0": 0.1, "3": 0.3, "8": 0.1}, "base": {"0": 0.3, "3": 0.5, "8": 0.2}}
    by_bytes = {(files / f"{n}.onnx").read_bytes(): v for n, v in profiles.items()}
    monkeypatch.setattr(runtime, "profile", lambda onnx_bytes, *args, **kwargs: by_bytes[onnx_bytes])
    result = cli("bench", files / "small.onnx", "--baseline", files / "base.onnx", "--runs", "5", "--profile", "--json", tmp_path / "b.json",
                 "--markdown", tmp_path / "b.md")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    base = report["converted"][str(files / "base.onnx")]
    assert base["layers"] == ["0"] and base["share"] == pytest.approx(0.3) and base["bound"] == pytest.approx(1 / 0.7)
    assert report["converted"][str(files / "small.onnx")]["share"] == pytest.approx(0.2)
    line = f"baseline {files / 'base.onnx'}: 30% of the time in the converted layers (0: 0.300 of 1.000 ms); removing them entirely would give at most 1.43x"
    assert line in result.output.replace("\n", " ") or line in " ".join(result.output.split())
    assert line in (tmp_path / "b.md").read_text()


# -- the command -----------------------------------------------------------------------------------
def test_cli_json_markdown_and_table_carry_intervals_and_verdicts(files, monkeypatch, tmp_path):
    inject(monkeypatch, constant(1.0, 0.5, 2.0, 1.0))  # small, small (int8), base, base (int8)
    result = cli("bench", files / "small.onnx", "--baseline", files / "base.onnx", "--int8", "--runs", "20", "--max-seconds", "3",
                 "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.md", "--png", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["settings"] == {"precision": 0.02, "max_seconds": 3.0, "runs_per_round": 20, "warmup": 10, "int8": "dynamic"}
    r = report["results"][0]
    assert {"precision", "p50_ms", "p50_low_ms", "p50_high_ms", "p90_over_p50", "rounds", "converged", "stable", "note"} <= set(r)
    assert (r["p50_low_ms"], r["p50_ms"], r["p50_high_ms"], r["rounds"], r["stable"]) == (1.0, 1.0, 1.0, 1, True)
    float_c, int8_c = report["comparisons"]
    assert {"speedup", "speedup_low", "speedup_high", "verdict", "stable", "mac_ratio", "macs_executed", "baseline_macs_executed",
            "efficiency", "precision", "baseline_precision"} <= set(float_c)
    assert (float_c["speedup"], float_c["verdict"], float_c["mac_ratio"]) == (2.0, "faster", NARROW / WIDE)
    assert (int8_c["model"], int8_c["baseline"], int8_c["speedup"], int8_c["precision"]) == (
        f"{files / 'small.onnx'} (int8)", f"{files / 'base.onnx'} (int8)", 2.0, "int8")
    md = (tmp_path / "b.md").read_text()
    assert "| median ms | 95% CI ms |" in md and "| 2.000x | 2.000-2.000 | 0.500 |" in md and "| faster |" in md
    assert "2.000x" in result.output and "faster" in result.output and (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_within_noise_and_precisions_differ_without_a_figure(files, monkeypatch, tmp_path):
    rng = np.random.default_rng(2)
    inject(monkeypatch, lambda k, r, runs: list(rng.uniform(0.9, 1.1, runs)))
    result = cli("bench", files / "small.onnx", files / "small-int8.onnx", "--baseline", files / "base.onnx", "--runs", "40",
                 "--max-seconds", "1", "--markdown", tmp_path / "b.md")
    assert result.exit_code == 0, result.output
    md = (tmp_path / "b.md").read_text()
    assert "n/a (within noise) | within noise (interval includes 1) |" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {files / 'small-int8.onnx'} | {files / 'base.onnx'} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4:6] == ["-", "-"] and cells[7] == "n/a (precisions differ)"  # no speedup, no efficiency across precisions
    assert cells[8].startswith("precisions differ (int8 model, float baseline")


def test_cli_warns_when_the_machine_is_busy(files, monkeypatch):
    import gaborprune._threads as threads

    inject(monkeypatch, constant(1.0))
    monkeypatch.setattr(threads, "load_average", lambda: 99.0)
    result = cli("bench", files / "small.onnx", "--runs", "3")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1-minute load 99.0" in warnings[0] and "noisy" in warnings[0]
    assert "load 99.00" in result.output  # and in the table's title


@pytest.mark.parametrize("args, fragments", [
    (["--precision", "0"], ["--precision must be above 0 and below 1", "not 0.0"]),
    (["--precision", "nan"], ["--precision must be a finite number"]),
    (["--max-seconds", "-1"], ["--max-seconds must be above 0", "not -1.0"]),
    (["--data", "fake:32:4"], ["--data fake:32:4 calibrates --int8"]),
])
def test_cli_refuses_bad_timing_options(files, tmp_path, args, fragments):
    one_line_error(cli("bench", files / "small.onnx", *args, "--json", tmp_path / "b.json"), *fragments)
    assert not (tmp_path / "b.json").exists()


def test_int8_calibrates_on_data(files, monkeypatch, tmp_path):
    inject(monkeypatch, constant(1.0, 0.5))
    result = cli("bench", files / "small.onnx", "--int8", "--data", "fake:64:4", "--runs", "3", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["settings"]["int8"] == "static" and [r["precision"] for r in report["results"]] == ["float", "int8"]
