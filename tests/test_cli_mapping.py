"""The CLI as a thin layer: each command maps its options onto one library call (patched here, its
arguments asserted, as fastapi-cli's tests do), options left out are not passed on (every default is
the library's, and the help texts quote it), and the workflows behind the commands do what the
commands did, called from Python."""

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import typer.main

import gaborprune as gp
from gaborprune import workflows
from gaborprune.cli import app
from gaborprune.convert.spec import ConversionReport, ConversionSpec
from gaborprune.export.api import ExportConfig
from gaborprune.export.results import BenchReport
from gaborprune.prune import PruneSpec
from gaborprune.search import TargetSpec
from gaborprune.train import TrainConfig
from gaborprune.train.loop import EvalResult, TrainResult
from helpers import one_line_error, run

ENV = {"cpu": "test CPU", "cores": 2, "onnxruntime": "1.0", "torch": "2", "provider": "cpu", "load_average": None, "date": "today"}


class Recorder:
    """Stands in for a library call: records its arguments, returns `result`."""

    def __init__(self, result=None):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    @property
    def args(self):
        assert len(self.calls) == 1, self.calls
        return self.calls[0][0]

    @property
    def kwargs(self):
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]


def patch(monkeypatch, name: str, result=None, module=workflows) -> Recorder:
    recorder = Recorder(result)
    monkeypatch.setattr(module, name, recorder)
    return recorder


# -- each command: its options, as the library call's arguments -----------------------------------------
def test_convert_builds_the_spec_and_passes_only_the_source_options_given(monkeypatch, tmp_path):
    spec = ConversionSpec(first=2, init="random", seed=3)
    call = patch(monkeypatch, "convert", workflows.ConvertRun("resnet20", tmp_path / "x.pt", ConversionReport(spec, ()), 100, 90))
    result = run("convert", "resnet20", "--layers", "2", "--init", "random", "--seed", "3", "-o", tmp_path / "x.pt",
                 "--num-classes", "10", "--model-arg", "k1=9", "--input-shape", "3,16,16", "--json", tmp_path / "x.json", "--force")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("resnet20", num_classes=10, model_args={"k1": 9}, input_shape=(3, 16, 16)), spec, tmp_path / "x.pt")
    options = call.kwargs["options"]
    assert options.force and options.extra_outputs == [tmp_path / "x.json"] and options.device == workflows.DEVICE
    assert set(call.kwargs) == {"data", "options"}  # calibration_images and resize left to the library
    assert json.loads((tmp_path / "x.json").read_text()) == call.result.to_dict()
    assert "parameters: 100 -> 90" in result.stdout and "warning" not in result.stderr


def test_convert_warns_when_the_run_says_the_kernels_were_untrained(monkeypatch, tmp_path):
    spec = ConversionSpec(first=1)
    patch(monkeypatch, "convert", workflows.ConvertRun("resnet20", tmp_path / "x.pt", ConversionReport(spec, ()), 1, 1, untrained=True))
    result = run("convert", "resnet20", "--layers", "1", "-o", tmp_path / "x.pt")
    assert result.exit_code == 0 and result.stderr.startswith("warning: resnet20 has no --weights")


def test_inspect_passes_the_png_and_renders_the_summary(monkeypatch, tmp_path):
    model, recipe = gp.load_model("resnet20", input_shape=(3, 16, 16))
    call = patch(monkeypatch, "inspect", workflows.InspectRun("resnet20", gp.summarize(model, recipe.input_shape), ["conv1"]))
    result = run("inspect", "resnet20", "--png", tmp_path / "b.png", "--trust-factory")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("resnet20", trust_factory=True),) and call.kwargs["png"] == tmp_path / "b.png"
    assert call.kwargs["options"] == workflows.Options(False, [None])
    assert "layer1.0.conv1" in result.stdout and f"drew conv1 -> {tmp_path / 'b.png'}" in result.stdout


def test_finetune_builds_the_config_from_the_options_given(monkeypatch, tmp_path):
    result_ = TrainResult(1, 50.0, 40.0, {}, {}, 10.0, "cpu")
    run_ = workflows.FinetuneRun("resnet20", "digits", tmp_path / "o.pt", TrainConfig(epochs=2), workflows_checkpoints(tmp_path), result_)
    call = patch(monkeypatch, "finetune", run_)
    result = run("finetune", "resnet20", "--data", "digits", "-o", tmp_path / "o.pt", "--epochs", "2", "--lr", "0.1", "--no-amp",
                 "--sparsity", "0.01", "--resume", tmp_path / "o.last.pt", "--device", "cpu", "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("resnet20"), "digits", tmp_path / "o.pt", TrainConfig(epochs=2, lr=0.1, amp=False, sparsity=0.01))
    kw = call.kwargs
    assert kw["resume"] == tmp_path / "o.last.pt" and kw["options"].device == "cpu" and "resize" not in kw
    assert f"best 50.00%  final 40.00%  -> {tmp_path / 'o.pt'}" in result.stdout
    assert json.loads((tmp_path / "o.json").read_text())["best_accuracy"] == 50.0


def workflows_checkpoints(tmp_path):
    from gaborprune.train import Checkpoints

    return Checkpoints(tmp_path / "o.pt")


def test_finetune_on_another_rank_prints_and_writes_nothing(monkeypatch, tmp_path):
    result_ = TrainResult(1, 50.0, 40.0, {}, {}, 10.0, "cpu")
    patch(monkeypatch, "finetune", workflows.FinetuneRun("r", "digits", tmp_path / "o.pt", TrainConfig(), workflows_checkpoints(tmp_path), result_, main=False))
    result = run("finetune", "resnet20", "--data", "digits", "-o", tmp_path / "o.pt", "--json", tmp_path / "o.json")
    assert result.exit_code == 0 and result.stdout == "" and not (tmp_path / "o.json").exists()


def test_eval_leaves_the_batch_size_to_the_evaluators(monkeypatch, tmp_path):
    call = patch(monkeypatch, "evaluate", workflows.EvalRun("resnet20", "digits", "pytorch", "cpu", EvalResult(90.0, 99.0, 0.3, 360)))
    result = run("eval", "resnet20", "--data", "digits", "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("resnet20"), "digits") and "batch_size" not in call.kwargs
    assert call.kwargs["options"].device == workflows.DEVICE
    assert "resnet20 on digits: top-1 90.00%  top-5 99.00%  loss 0.3000  (360 test images, cpu)" in result.stdout
    assert json.loads((tmp_path / "e.json").read_text()) == {"top1": 90.0, "top5": 99.0, "loss": 0.3, "samples": 360, "runtime": "pytorch"}
    run("eval", "resnet20", "--data", "digits", "--batch-size", "8", "--threads", "1")
    assert call.calls[-1][1]["batch_size"] == 8 and call.calls[-1][1]["threads"] == 1


@pytest.mark.parametrize("args, spec, target", [
    (["--threshold", "0.1"], PruneSpec(threshold=0.1), None),
    (["--ratio", "conv1=0.5", "--keep", "3"], PruneSpec(keep=3, layer_ratio={"conv1": 0.5}), None),
    (["--scope", "all"], PruneSpec(scope="all"), None),  # round_to left to the library (this CPU's block)
    (["--speedup", "1.2"], None, TargetSpec(speedup=1.2)),
    (["--speedup", "1.2", "--scope", "all"], PruneSpec(scope="all"), TargetSpec(speedup=1.2)),  # the least share of channels that meets it
    (["--macs", "0.5", "--scope", "all", "--round-to", "4"], PruneSpec(scope="all", round_to=4), TargetSpec(macs=0.5)),
    (["--ratio", "0.3", "--scope", "all"], PruneSpec(scope="all", ratio=0.3), None),  # a share of the channels
    (["--latency-ms", "2", "--scope", "banks"], None, TargetSpec(latency_ms=2.0)),
])
def test_prune_maps_the_rule_and_leaves_recovery_defaults_to_the_library(monkeypatch, tmp_path, args, spec, target):
    assert workflows.Accuracy("digits").lr == workflows.RECOVERY_LR == 0.01
    call = patch(monkeypatch, "prune", workflows.PruneRun("r.pt", tmp_path / "p.pt", spec))
    result = run("prune", "r.pt", "-o", tmp_path / "p.pt", *args, "--data", "digits", "--finetune-epochs", "2")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("r.pt"), tmp_path / "p.pt", spec) and call.kwargs["target"] == target
    kw = call.kwargs
    assert (kw["accuracy"], kw["dry_run"]) == (workflows.Accuracy("digits", recovery_epochs=2), False)  # the library's lr, batch, seed
    assert "threads" not in kw and kw["options"].device == workflows.DEVICE


def test_prune_passes_the_recovery_settings_given(monkeypatch, tmp_path):
    call = patch(monkeypatch, "prune", workflows.PruneRun("r.pt", None, PruneSpec()))
    result = run("prune", "r.pt", "--dry-run", "--lr", "0.02", "--batch-size", "16", "--seed", "4", "--threads", "1", "--input-shape", "3,16,16")
    assert result.exit_code == 0, result.output
    kw = call.kwargs
    assert (kw["accuracy"], kw["threads"], kw["dry_run"]) == (None, 1, True)  # without --data the recovery settings have nothing to act on
    assert call.args[0] == workflows.Source("r.pt", input_shape=(3, 16, 16))
    run("prune", "r.pt", "--dry-run", "--data", "digits", "--lr", "0.02", "--batch-size", "16", "--seed", "4", "--no-recalibrate")
    assert call.calls[-1][1]["accuracy"] == workflows.Accuracy("digits", recalibrate=False, lr=0.02, batch_size=16, seed=4)


def test_prune_sweep_calls_the_sweep_with_its_default_plot(monkeypatch, tmp_path):
    call = patch(monkeypatch, "sweep", workflows.SweepRun("r.pt", [], 90.0, 1000))
    result = run("prune", "r.pt", "--sweep", "0.1,0.2", "--data", "digits", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert call.args == (workflows.Source("r.pt"), [0.1, 0.2], PruneSpec()) and call.kwargs["png"] == Path(workflows.SWEEP_PNG)
    assert call.kwargs["accuracy"] == workflows.Accuracy("digits")
    assert json.loads((tmp_path / "s.json").read_text()) == {"model": "r.pt", "points": []}
    one_line_error(run("prune", "r.pt", "--sweep", "0.1", "--data", "digits", "-o", tmp_path / "x.pt"), "a sweep writes no recipe")
    assert len(call.calls) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--speedup", "1.2", "--threshold", "0.1"], "--speedup chooses the kernels itself; drop --threshold"),
    (["--speedup", "1.2", "--latency-ms", "3"], "drop --latency-ms"),
])
def test_prune_options_that_do_not_combine_never_reach_the_library(monkeypatch, tmp_path, args, fragment):
    call = patch(monkeypatch, "prune")
    one_line_error(run("prune", "r.pt", "-o", tmp_path / "p.pt", *args), fragment)
    assert call.calls == []


def test_export_parses_the_shape_once_into_the_config_and_the_input_shape(monkeypatch, tmp_path):
    from gaborprune.export.api import ExportReport

    report = ExportReport(path=str(tmp_path / "m.onnx"), opset=18, inputs=[{"name": "x", "shape": [2, 3, 16, 16]}], max_abs_diff=0.0, cosine=1.0,
                          file_bytes=2048, params=10, macs=20, macs_executed=20, lowering={})
    call = patch(monkeypatch, "export", workflows.ExportRun("r.pt", report))
    result = run("export", "r.pt", "-o", tmp_path / "m.onnx", "--input-shape", "2,3,16,16", "--lowering", "dense", "--dynamic-batch")
    assert result.exit_code == 0, result.output
    config, = call.args[2:]
    assert call.args[:2] == (workflows.Source("r.pt", input_shape=(3, 16, 16)), tmp_path / "m.onnx")
    assert config == ExportConfig(batch_size=2, lowering="dense", dynamic_batch=True) and call.kwargs["data"] is None
    assert f"-> {tmp_path / 'm.onnx'} (2.0 KiB)" in result.stdout


def test_bench_passes_only_the_timing_settings_given(monkeypatch, tmp_path):
    report = BenchReport(ENV, settings={"runs_per_round": 5, "precision": 0.02, "max_seconds": 60.0})
    call = patch(monkeypatch, "bench", report)
    result = run("bench", "a.onnx", "b.pt", "--baseline", "c.onnx", "--batch-size", "1,2", "--runs", "5", "--int8",
                 "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.md")
    assert result.exit_code == 0, result.output
    assert call.args == ([workflows.Source("a.onnx"), workflows.Source("b.pt")],)
    kw = call.kwargs
    assert (kw["baseline"], kw["settings"], kw["int8"], kw["data"]) == ([workflows.Source("c.onnx")], workflows.BenchSettings((1, 2), runs=5), True, None)
    assert kw["options"].extra_outputs == [tmp_path / "b.json", tmp_path / "b.md", None]
    assert (tmp_path / "b.md").read_text() == report.to_markdown()


def test_reproduce_passes_the_ablation_options_to_the_one_registry(monkeypatch, tmp_path):
    import gaborprune.reproduce as reproduce

    class Report:
        def to_markdown(self):
            return "# the table"

    call = patch(monkeypatch, "reproduce", Report(), module=reproduce)
    result = run("reproduce", "cada-ablation", "--data", "digits", "--settings", "dw3, cada7", "--input-shape", "3,16,16", "--seeds", "2",
                 "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert call.args == ("cada-ablation", "digits")
    kw = call.kwargs
    assert (kw["settings"], kw["input_shape"], kw["seeds"], kw["out"], kw["device"]) == (["dw3", "cada7"], (3, 16, 16), 2, tmp_path, torch.device("cpu"))
    assert "epochs" not in kw and "# the table" in result.stdout


def test_demo_renders_its_typed_report(monkeypatch, tmp_path):
    import gaborprune.demo as demo
    from gaborprune.export.api import ExportReport
    from gaborprune.export.results import Comparison

    export = ExportReport(path="p.onnx", opset=18, inputs=[], max_abs_diff=1e-6, cosine=1.0, file_bytes=4096, params=1500, macs=1, macs_executed=2000,
                          lowering={}, accuracy={"onnx": 91.5})
    latency = BenchReport(ENV, comparisons=[Comparison("pruned", "baseline", 1, 1, 1.25, 0.6, 0.5, 1.2, 1.3, precision="float")])
    report = demo.DemoReport(demo.DemoConfig(), [demo.Stage("recovered", 91.0, 1500, 3000, 1.0)], {"conv1": [12, 48]}, {"pruned": export}, latency)
    call = patch(monkeypatch, "run_demo", report, module=demo)
    result = run("demo", "--out", tmp_path, "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert call.args == (tmp_path, demo.DemoConfig()) and (call.kwargs["device"], call.kwargs["force"]) == (torch.device("cpu"), True)
    assert "kernels kept: conv1 12/48   (75% removed)" in result.stdout
    assert "pruned.onnx" in result.stdout and "1.50k parameters   2.00k MACs executed   top-1 91.50%" in result.stdout
    assert "batch  1: speedup 1.250x [1.200, 1.300] faster, executed-MAC ratio 0.600, efficiency 0.50" in result.stdout
    assert json.loads(json.dumps(report.to_dict()))["onnx"]["pruned"]["file_bytes"] == 4096  # plain data all through


def test_a_library_message_shows_the_flags(monkeypatch):
    patch(monkeypatch, "evaluate", gp.GaborPruneError("`batch_size` must be an integer of at least 1, not 0"))
    one_line_error(run("eval", "resnet20", "--data", "digits"), "error: --batch-size must be an integer of at least 1, not 0")


# -- the help quotes the library's defaults ---------------------------------------------------------
def _help(command: str, option: str) -> str:
    params = typer.main.get_command(app).commands[command].params
    return next(p.help for p in params if option in p.opts)


def _defaults():
    from gaborprune.export import bench
    from gaborprune.reproduce import reproduce
    from gaborprune.train import evaluate

    cada = ConversionSpec(targets=("x",), to="cada")
    return [
        ("convert", "--seed", ConversionSpec(first=1).seed), ("convert", "--heads", cada.heads), ("convert", "--bases", cada.cada_knobs()["bases"]),
        ("convert", "--context", cada.cada_knobs()["context"]), ("finetune", "--epochs", TrainConfig.epochs), ("finetune", "--lr", TrainConfig.lr),
        ("eval", "--batch-size", inspect.signature(evaluate).parameters["batch_size"].default),
        ("prune", "--threshold", PruneSpec().threshold), ("prune", "--lr", workflows.RECOVERY_LR), ("prune", "--batch-size", TrainConfig.batch_size),
        ("prune", "--seed", TrainConfig.seed), ("export", "--atol", ExportConfig().atol), ("bench", "--batch-size", bench.BATCH_SIZES[0]),
        ("bench", "--threads", bench.THREADS[0]), ("bench", "--warmup", bench.WARMUP), ("bench", "--runs", bench.RUNS),
        ("bench", "--precision", bench.PRECISION), ("bench", "--max-seconds", bench.MAX_SECONDS),
        ("reproduce", "--seeds", inspect.signature(reproduce).parameters["seeds"].default),
    ]


def test_every_default_a_help_text_names_is_the_librarys():
    checked = 0
    for command, option, value in _defaults():
        text = _help(command, option)
        quoted = re.search(r"[Dd]efault:? ([0-9.e+-]+)", text)
        assert quoted, f"{command} {option}: {text}"
        assert float(quoted[1].rstrip(".")) == value, f"{command} {option} says {quoted[1]}, the library {value}"
        checked += 1
    assert checked == len(_defaults())
    assert str(workflows.SWEEP_PNG) in _help("prune", "--png") and workflows.DEVICE in _help("eval", "--device")


def test_options_the_library_defaults_reach_it_as_none():
    """Every option of a command that has a library default is None when left out (the library's applies)."""
    flags_with_cli_defaults = {"--force", "--trust-factory", "--dry-run", "--dynamic-batch", "--int8", "--profile", "--torch", "--out", "--version"}
    for name, command in typer.main.get_command(app).commands.items():
        for p in command.params:
            if p.opts[0].startswith("-") and not set(p.opts) & flags_with_cli_defaults:
                assert p.default is None, f"{name} {p.opts[0]} defaults to {p.default!r} in the CLI"


# -- the workflows, from Python -------------------------------------------------------------------------
def _shared_equal(a: dict, b: dict) -> bool:
    shared = [k for k in a if not k.startswith("conv1.") and k in b]
    return len(shared) > 50 and all(torch.equal(a[k], b[k]) for k in shared)


def test_the_seed_draws_a_fresh_sources_weights_whatever_the_callers_random_state(tmp_path):
    for seed in (0, 1):
        torch.manual_seed(123 + seed)  # the caller's random state does not matter
        assert run("convert", "resnet20", "--target", "conv1", "--init", "random", "--seed", seed, "-o", tmp_path / f"s{seed}.pt").exit_code == 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        oracle = gp.ModelSource("resnet20").build().state_dict()
    seeded = [gp.load_model(str(tmp_path / f"s{seed}.pt"))[0].state_dict() for seed in (0, 1)]
    assert _shared_equal(oracle, seeded[0]) and not _shared_equal(oracle, seeded[1])


def test_python_and_the_cli_build_the_same_initial_weights(tmp_path):
    """A fresh source's weights come from the library's seed (0), not from the caller's random state."""
    assert run("convert", "resnet20", "--target", "conv1", "--init", "random", "-o", tmp_path / "c.pt").exit_code == 0
    torch.manual_seed(123)
    fresh, _ = gp.load_model("resnet20")
    assert _shared_equal(fresh.state_dict(), gp.load_model(str(tmp_path / "c.pt"))[0].state_dict())


def test_prune_with_recovery_records_what_an_independent_evaluation_measures(tmp_path):
    from gaborprune.data import load_data
    from gaborprune.train import evaluate

    source = "tiny_models:gabor_net"
    run_ = workflows.prune(workflows.Source(source, input_shape=(3, 16, 16), trust_factory=True), tmp_path / "p.pt", PruneSpec(ratio=0.5),
                           accuracy=workflows.Accuracy("fake:64:4", recovery_epochs=1, batch_size=16), options=workflows.Options(device="cpu"))
    model, recipe = gp.load_model(str(tmp_path / "p.pt"), trust_factory=True)
    _, test = load_data("fake:64:4", recipe.input_shape)
    measured = evaluate(model, test, torch.device("cpu"), batch_size=16).top1
    record = recipe.metadata["prunes"][0]
    assert record["accuracy_after"] == run_.report.accuracy_after == pytest.approx(measured)
    assert record["source"] == source and {"accuracy_before", "accuracy_pruned", "layers", "criterion"} <= set(record)
    assert [s.kind for s in recipe.steps] == ["prune", "finetune"] and recipe.finetunes[0].config.lr == workflows.RECOVERY_LR
    assert model[0].kernels_alive == run_.report.gabor_layers[0].kernels_after == 12  # half of the 24 kernels, and they stayed removed


@pytest.mark.parametrize("scope", ["all", "banks"])
def test_prune_recovers_a_trained_network_without_warm_up_and_recalibrates(tmp_path, monkeypatch, scope):
    seen = []

    class Stop(Exception):
        pass

    def train(model, recipe, train, test, config, *args, **kwargs):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(workflows, "_train", train)
    with pytest.raises(Stop):
        workflows.prune(workflows.Source("tiny_models:gabor_net", input_shape=(3, 16, 16), trust_factory=True), tmp_path / "p.pt",
                        PruneSpec(scope=scope, round_to=1 if scope == "all" else None),
                        accuracy=workflows.Accuracy("fake:64:4", recovery_epochs=1, batch_size=16), options=workflows.Options(device="cpu"))
    (config,) = seen
    assert (config.epochs, config.lr, config.warmup_epochs, config.batch_size, config.recalibrate) == (1, workflows.RECOVERY_LR, 0.0, 16, True)
    assert not (tmp_path / "p.pt").exists()


@pytest.mark.parametrize("call, fragment", [
    (lambda: workflows.prune("missing.pt", "p.pt", PruneSpec(round_to=16)), "`round_to` counts channels that `scope` all removes"),
    (lambda: workflows.prune("missing.pt", "p.pt", PruneSpec(threshold=0.2), target=TargetSpec(speedup=1.2)), "give a PruneSpec or a TargetSpec, not both"),
    (lambda: workflows.prune("missing.pt", "p.pt", PruneSpec(threshold=0.2, scope="all"), target=TargetSpec(speedup=1.2)),
     "a TargetSpec chooses the kernels itself; drop `threshold` 0.2"),
    (lambda: workflows.prune("missing.pt"), "say where to write the pruned recipe"),
    (lambda: workflows.prune("missing.pt", "p.pt", accuracy=workflows.Accuracy("digits", recovery_epochs=0)),
     "`recovery_epochs` must be an integer of at least 1"),
    (lambda: workflows.prune("missing.pt", "p.pt", accuracy=workflows.Accuracy("nosuch:data")), "nosuch"),
    (lambda: workflows.sweep("missing.pt", [0.1, 1.5], accuracy=workflows.Accuracy("digits")), "`sweep` threshold 1.5 is out of range"),
    (lambda: workflows.sweep("missing.pt", [0.1]), "`sweep` needs `data`"),
    (lambda: workflows.bench(["missing.onnx"], data="digits"), "calibrates `int8`"),
    (lambda: workflows.bench(["missing.onnx"], settings=workflows.BenchSettings(runs=0)), "`runs` must be"),
    (lambda: workflows.finetune("missing.pt", "digits", "o.pt", resume="nowhere.last.pt"), "resume file 'nowhere.last.pt' not found"),
])
def test_workflows_refuse_bad_requests_before_loading_anything(tmp_path, monkeypatch, call, fragment):
    monkeypatch.chdir(tmp_path)  # 'missing.pt' would be a recipe; loading it first would say it is missing instead
    with pytest.raises(gp.GaborPruneError, match=re.escape(fragment)):
        call()
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_fine_tuning_says_how_to_resume(tmp_path, monkeypatch):
    import gaborprune.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "finetune_", interrupted)
    result = run("finetune", "tiny_models:gabor_net", "--data", "fake:64:4", "--input-shape", "3,16,16", "-o", tmp_path / "o.pt", "--device", "cpu")
    one_line_error(result, f"error: interrupted; continue with the same command plus --resume {tmp_path / 'o.last.pt'}")


def test_bench_markdown_and_table_come_from_the_report():
    from gaborprune.export.results import Comparison

    report = BenchReport(ENV | {"date": "today", "torch": "2"}, settings={"runs_per_round": 5, "precision": 0.02, "max_seconds": 60.0},
                         comparisons=[Comparison("m", "base", 1, 1, 1.5, 0.5, 1.0, 1.4, 1.6)])
    md = report.to_markdown("title")
    assert md.startswith("# title\n") and "| m | base | 1 | 1 | 1.500x | 1.400-1.600 | 0.500 | 1.00 | faster |" in md
    assert report.comparison_rows() == [["m", "base", "1", "1", "1.500x", "1.400-1.600", "0.500", "1.00", "faster"]]
