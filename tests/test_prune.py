"""Pruning: kernel selection, exact compaction on four topologies, plans replayed from recipes."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune.convert import GaborConv2d
from gaborprune.prune import PruneError, PrunePlan, PruneSpec, apply_plan_, prune_model_, select_kernels, slice_module
from gaborprune.recipe import Recipe, read_recipe, save_recipe
from helpers import FAMILIES, ONLY_DEAD, SHAPE, kill, masked_reference, randomize_norms, setup_chain, setup_dense, setup_residual


def out_in(model, name):
    m = model.get_submodule(name)
    if isinstance(m, nn.BatchNorm2d):
        return m.num_features
    if isinstance(m, nn.Linear):
        return m.in_features
    return (m.out_channels, m.in_channels)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compacted_model_equals_masked_model(family):
    build, setup = FAMILIES[family]
    torch.manual_seed(0)
    model = randomize_norms(build()).eval()
    expected, kept = setup(model)
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)

    for name, size in expected.items():
        assert out_in(model, name) == size, name
    assert {(k.layer, k.channel) for k in report.kept} == kept
    reference = masked_reference(original, report.plan).eval()
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        diff = (reference(x) - model.eval()(x)).abs().max().item()
    assert diff <= 1e-5
    assert report.max_abs_diff <= 1e-5
    assert report.after.params < report.before.params and report.after.macs < report.before.macs
    # the masked kernels of surviving channels are still exact zeros
    for m in model.modules():
        if isinstance(m, GaborConv2d):
            dead = m.mask == 0
            assert (m.weight.detach()[dead] == 0).all()


def test_kept_channels_say_why():
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Residual()).eval()
    setup_residual(model)
    reasons = {(k.layer, k.channel): k.reason for k in prune_model_(model, SHAPE, ONLY_DEAD).kept}
    assert "tied to a live channel of 'g2'" in reasons[("g1", 2)]
    assert "tied to a live channel of 'g1'" in reasons[("g2", 3)]
    chain = randomize_norms(tiny_models.Chain()).eval()
    setup_chain(chain)
    reasons = {k.channel: k.reason for k in prune_model_(chain, SHAPE, ONLY_DEAD).kept}
    assert "zero-padded convolution" in reasons[3] and "'conv2'" in reasons[3]


class Shuffle(nn.Module):
    """A channel shuffle the analysis does not know: dead channels must stay."""

    def __init__(self):
        super().__init__()
        self.g, self.bn, self.head = GaborConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.g(x)))
        return self.head(torch.roll(x, 1, dims=1)).mean((2, 3))


@pytest.mark.parametrize("cls,fragment", [(Shuffle, "read by 'roll'"), (tiny_models.Untraceable, "could not be traced")])
def test_unknown_topology_keeps_the_channel_and_names_it(cls, fragment):
    torch.manual_seed(0)
    model = randomize_norms(cls()).eval()
    kill(model.bn, [0, 1], -1.0)
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert model.g.out_channels == 8 and not report.plan.channels
    assert [k.channel for k in report.kept] == [0, 1] and fragment in report.kept[0].reason
    assert (model.g.mask[:2] == 0).all() and model.g.kernels_alive == 18  # masked all the same
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(model(x), masked_reference(original, report.plan)(x))


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "densenet121", "mobilenet_v2"])
def test_torchvision_models_compact_exactly(name):
    torch.manual_seed(0)
    shape = (3, 64, 64)
    model, recipe = gp.load_model(f"torchvision:{name}", input_shape=shape, num_classes=10)
    gp.gaborize_(model, gp.ConversionSpec(first=1, init="random"), shape)
    randomize_norms(model)
    stem = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    kill(stem, [0, 1, 2], -1.0)
    kill(stem, [3], 0.5)
    original = copy.deepcopy(model).eval()
    report = prune_model_(model.eval(), shape, ONLY_DEAD)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (masked_reference(original, report.plan)(x) - model(x)).abs().max().item() <= 1e-5
    gabor = report.gabor_layers[0]
    removed = gabor.channels_before - gabor.channels_after
    assert removed + len(report.kept) == 4 and all(k.reason for k in report.kept)  # each dead channel: removed, or kept with a reason
    # resnet18: the stem is tied to layer1's identity shortcuts; vgg, mobilenet: 0.5 reaches a zero-padded conv;
    # densenet: it reaches only 1x1 convs, whose BNs (or, for transitions, the next block's BNs) absorb it
    expected_kept = {"resnet18": {0, 1, 2, 3}, "densenet121": set()}.get(name, {3})
    assert {k.channel for k in report.kept} == expected_kept


def test_plan_replays_from_the_recipe_in_a_fresh_interpreter(tmp_path):
    torch.manual_seed(0)
    model, recipe = gp.load_model("tiny_models:Dense")
    randomize_norms(model)
    setup_dense(model)
    recipe = recipe.with_step(prune_model_(model, SHAPE, ONLY_DEAD).step)
    recipe = recipe.with_step(prune_model_(model, SHAPE, PruneSpec(layer_ratio={"stem": 0.8})).step)  # a second prune, on the compacted model
    save_recipe(tmp_path / "p.pt", model, recipe)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        torch.save({"x": x, "y": model.eval()(x)}, tmp_path / "io.pt")
    code = (f"import torch, gaborprune as gp; m, r = gp.load_model({str(tmp_path / 'p.pt')!r}, trust_factory=True); "
            f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True); "
            "print(float((m.eval()(io['x']) - io['y']).abs().max()), m.stem.out_channels, len(r.prunes))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(tiny_models.__file__.rsplit("/", 1)[0]), "PATH": ""})
    assert done.returncode == 0, done.stderr
    diff, channels, plans = done.stdout.split()
    assert float(diff) == 0.0 and int(channels) == model.stem.out_channels and int(plans) == 2
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert raw["steps"][0]["plan"]["channels"]["stem"]["out"] == [0, 1, 2]


def test_select_by_ratio_keep_and_threshold():
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20_altered")
    strength = gp.prune.select.GaborSparsity(model, recipe.input_shape).relative_strengths()
    keep = select_kernels(model, recipe.input_shape, PruneSpec(layer_ratio={"conv1": 0.83, "conv2": 0.94}))
    assert int(keep["conv1"].sum()) == 48 - round(0.83 * 48) and int(keep["conv2"].sum()) == 256 - round(0.94 * 256)
    for name, k in keep.items():  # the strongest stay
        assert strength[name][k].min() >= strength[name][~k].max()
    pooled = select_kernels(model, recipe.input_shape, PruneSpec(ratio=0.5))
    assert sum(int(k.sum()) for k in pooled.values()) == 152
    assert min(strength[n][k].min() for n, k in pooled.items()) >= max(strength[n][~k].max() for n, k in pooled.items())
    assert sum(int(k.sum()) for k in select_kernels(model, recipe.input_shape, PruneSpec(keep=100)).values()) == 100
    mixed = select_kernels(model, recipe.input_shape, PruneSpec(threshold=0.3, layer_keep={"conv1": 10}))
    assert int(mixed["conv1"].sum()) == 10 and torch.equal(mixed["conv2"], strength["conv2"] >= 0.3)


def test_selection_ignores_the_scale_batchnorm_absorbs():
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Chain())
    before = select_kernels(model, SHAPE, PruneSpec(threshold=0.3))
    with torch.no_grad():
        model.g1.amplitude[2] *= 100.0  # BN divides this out: the function barely changes
        model.g1.amplitude[5] *= 0.01
    after = select_kernels(model, SHAPE, PruneSpec(threshold=0.3))
    assert torch.equal(before["g1"], after["g1"])


@pytest.mark.parametrize("spec,message", [
    (dict(threshold=1.5), "`threshold` must be in [0, 1)"),
    (dict(ratio=1.0), "`ratio` 1.0 is out of range"),
    (dict(layer_ratio={"g1": -0.1}), "`layer_ratio` g1=-0.1 is out of range"),
    (dict(keep=0), "would remove every kernel"),
    (dict(ratio=0.5, keep=3), "not both"),
])
def test_bad_criteria(spec, message):
    with pytest.raises(PruneError, match=message.replace("[", r"\[").replace(")", r"\)")):
        PruneSpec(**spec)


def test_budgets_that_cut_the_network_or_name_no_bank_are_refused():
    model = tiny_models.Residual()
    with pytest.raises(PruneError, match="would remove every kernel of 'g2' and cut the network"):
        select_kernels(model, SHAPE, PruneSpec(keep=1))
    with pytest.raises(PruneError, match="'conv3' is not a Gabor bank of this model; Gabor banks: g1, g2"):
        select_kernels(model, SHAPE, PruneSpec(layer_keep={"conv3": 3}))
    with pytest.raises(PruneError, match="has only 24 kernels"):
        select_kernels(model, SHAPE, PruneSpec(layer_keep={"g1": 25}))
    with pytest.raises(PruneError, match="no Gabor banks to prune; convert some layers first"):
        select_kernels(gp.load_model("resnet20")[0], (3, 32, 32), PruneSpec())


def test_slice_module_and_bad_plans():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    cut = slice_module(conv, out=[1, 4], inp=[0])
    torch.testing.assert_close(cut.weight, conv.weight[[0, 2, 3, 5]][:, [1, 2, 3]])
    torch.testing.assert_close(cut.bias, conv.bias[[0, 2, 3, 5]])
    bank = GaborConv2d(4, 4, 3, groups=4, freeze=("gamma",))
    thin = slice_module(bank, out=[2], inp=[2])
    assert thin.groups == 3 and not thin.log_gamma.requires_grad
    torch.testing.assert_close(thin.weight, bank.weight[[0, 1, 3]])
    with pytest.raises(PruneError, match="output channel 9 does not exist"):
        slice_module(conv, out=[9])
    with pytest.raises(PruneError, match="removes every output channel"):
        slice_module(conv, out=list(range(6)))
    with pytest.raises(PruneError, match="names 'nope'"):
        apply_plan_(tiny_models.Chain(), PrunePlan(channels={"nope": {"out": [0]}}))
    with pytest.raises(PruneError, match="malformed prune plan"):
        PrunePlan.from_dict({"kernels": 3})


def test_read_recipe_keeps_plans(tmp_path):
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20_altered")
    recipe = recipe.with_step(prune_model_(model, recipe.input_shape, PruneSpec(layer_ratio={"conv1": 0.5})).step)
    save_recipe(tmp_path / "r.pt", model, recipe)
    again, _ = read_recipe(tmp_path / "r.pt")
    assert again.steps == recipe.steps and [s.kind for s in again.steps] == ["prune"]
    assert again.prunes[0].plan.kernels["conv1"]


# -- the command line ------------------------------------------------------------------------------
from helpers import one_line_error, run  # noqa: E402


@pytest.fixture(scope="module")
def chain_recipe(tmp_path_factory):
    """A Chain recipe with channels 0-2 dead (removable) and 3-4 dead (kept)."""
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Chain())
    setup_chain(model)
    path = tmp_path_factory.mktemp("prune") / "chain.pt"
    save_recipe(path, model, Recipe(gp.ModelSource("tiny_models:Chain"), SHAPE))
    return path


def test_cli_dry_run_reports_and_writes_nothing(chain_recipe, tmp_path):
    import json

    result = run("prune", chain_recipe, "--trust-factory", "--threshold", "1e-6", "--dry-run", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "would remove from g1: out 0, 1, 2" in result.stdout and "kept dead channels of g1 (3, 4)" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] is None and list(tmp_path.iterdir()) == [tmp_path / "r.json"]
    g1 = report["layers"][0]
    assert (g1["name"], g1["kernels_before"], g1["kernels_after"], g1["channels_before"], g1["channels_after"]) == ("g1", 24, 9, 8, 5)
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert report["max_abs_diff"] <= 1e-5 and "accuracy_before" not in report
    assert "accuracy not measured: add --data SPEC" in result.stdout and "--finetune-epochs N" in result.stdout


def test_cli_prune_recalibrates_batchnorm_only_and_can_skip_it(chain_recipe, tmp_path):
    import json

    for flag, name in (("--recalibrate", "r"), ("--no-recalibrate", "n")):
        result = run("prune", chain_recipe, "--trust-factory", "-o", tmp_path / f"{name}.pt", "--ratio", "g1=0.5", "--data", "fake:64:4",
                     "--batch-size", "16", flag, "--json", tmp_path / f"{name}.json")
        assert result.exit_code == 0, result.output
    on, off = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("r", "n"))
    assert on["accuracy_after"] == on["accuracy_recalibrated"]
    assert "accuracy_recalibrated" not in off and off["accuracy_after"] == off["accuracy_pruned"] == on["accuracy_pruned"]
    recalibrated, _ = gp.load_model(str(tmp_path / "r.pt"), trust_factory=True)
    skipped, _ = gp.load_model(str(tmp_path / "n.pt"), trust_factory=True)
    a, b = recalibrated.state_dict(), skipped.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved), moved


def test_cli_prune_evaluates_recovers_and_keeps_the_mask(chain_recipe, tmp_path):
    import json

    out = tmp_path / "p.pt"
    result = run("prune", chain_recipe, "--trust-factory", "-o", out, "--ratio", "g1=0.5", "--data", "fake:64:4", "--finetune-epochs", "1",
                 "--batch-size", "16", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert {"accuracy_before", "accuracy_pruned", "accuracy_recalibrated", "accuracy_after"} <= set(report)
    assert report["layers"][0]["kernels_after"] == 12 and "top-1 accuracy on fake:64:4 (test split): before" in result.stdout
    assert "BatchNorm recalibrated" in result.stdout and "after recovery" in result.stdout
    model, recipe = gp.load_model(str(out), trust_factory=True)
    assert model.g1.kernels_alive == 12 and (model.g1.weight.detach()[model.g1.mask == 0] == 0).all()
    assert recipe.metadata["prunes"][0]["accuracy_after"] == report["accuracy_after"]
    assert run("inspect", out, "--trust-factory").exit_code == 0
    one_line_error(run("prune", chain_recipe, "--trust-factory", "-o", out), "exists; pass --force")


def test_cli_sweep_prints_a_table_and_plots(chain_recipe, tmp_path):
    import json

    result = run("prune", chain_recipe, "--trust-factory", "--sweep", "0.01,0.9", "--data", "fake:64:4", "--png", tmp_path / "s.png", "--json",
                 tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    points = json.loads((tmp_path / "s.json").read_text())["points"]
    assert [p["threshold"] for p in points] == [0.01, 0.9] and points[0]["kernels_kept"] > points[1]["kernels_kept"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.png"]


def test_a_sweep_point_scores_what_the_prune_at_its_threshold_scores(chain_recipe, tmp_path, monkeypatch):
    """The sweep recalibrates BatchNorm as prune does, once per point: its accuracy at a threshold is
    prune's recalibrated accuracy there (same data, same calibration images); without recalibration,
    prune's accuracy right after pruning."""
    import json

    from gaborprune import workflows

    calls = []
    real = workflows._Measures.recalibrate_
    monkeypatch.setattr(workflows._Measures, "recalibrate_", lambda self, m: calls.append(1) or real(self, m))
    source = workflows.Source(str(chain_recipe), trust_factory=True)
    workflows.sweep(source, [0.01, 0.9], accuracy=workflows.Accuracy("fake:64:4"), options=workflows.Options(device="cpu"))
    assert len(calls) == 2
    workflows.sweep(source, [0.01, 0.9], accuracy=workflows.Accuracy("fake:64:4", recalibrate=False), options=workflows.Options(device="cpu"))
    assert len(calls) == 2

    for flag, key in (("--recalibrate", "accuracy_recalibrated"), ("--no-recalibrate", "accuracy_pruned")):
        swept = run("prune", chain_recipe, "--trust-factory", "--sweep", "0.9", "--data", "fake:64:4", flag, "--png", tmp_path / f"s{flag}.png",
                    "--json", tmp_path / f"s{flag}.json")
        pruned = run("prune", chain_recipe, "--trust-factory", "--threshold", "0.9", "--data", "fake:64:4", flag, "--dry-run",
                     "--json", tmp_path / f"p{flag}.json")
        assert swept.exit_code == 0 and pruned.exit_code == 0, swept.output + pruned.output
        [point] = json.loads((tmp_path / f"s{flag}.json").read_text())["points"]
        assert point["accuracy"] == json.loads((tmp_path / f"p{flag}.json").read_text())[key]


@pytest.mark.parametrize("args,fragments", [
    (["--threshold", "1.5"], ["--threshold must be in [0, 1)"]),
    (["--ratio", "1.2"], ["--ratio 1.2 is out of range"]),
    (["--keep", "g1=0"], ["--keep g1=0 would remove every kernel"]),
    (["--keep", "conv2=3", "--dry-run"], ["'conv2' is not a Gabor bank", "Gabor banks: g1"]),
    ([], ["say where to write the pruned recipe with -o (or look first with --dry-run)"]),
    (["--sweep", "0.1", "--data", "digits", "-o", "x.pt"], ["a sweep writes no recipe"]),
    (["--sweep", "0.1,2"], ["--sweep threshold 2.0 is out of range"]),
    (["--finetune-epochs", "1", "-o", "x.pt"], ["--finetune-epochs needs --data"]),
])
def test_cli_bad_input(chain_recipe, args, fragments, tmp_path):
    one_line_error(run("prune", chain_recipe, "--trust-factory", *args), *fragments)
    assert not (tmp_path / "x.pt").exists()


def test_cli_needs_gabor_banks_and_well_formed_budgets(tmp_path):
    one_line_error(run("prune", "vgg16", "-o", tmp_path / "x.pt"), "no Gabor banks to prune; convert some layers first")
    assert not (tmp_path / "x.pt").exists()
    result = run("prune", "vgg16", "--ratio", "half", "--dry-run")
    assert result.exit_code == 2 and "'half' is not R or NAME=R" in result.output


def test_a_dead_channel_of_a_depthwise_bank_goes_with_the_live_channel_only_it_reads():
    # the live channel 2 of '0' is read only by the bank's dead kernel: it goes too (a live second
    # reader keeps it: tests/test_prune_columns.py)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          GaborConv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    randomize_norms(model).eval()
    kill(model[4], [2], -1.0)
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert not report.kept
    assert report.plan.channels == {"0": {"out": [2]}, "1": {"out": [2]}, "3": {"out": [2], "in": [2]}, "4": {"out": [2]}, "8": {"in": [2]}}
    assert model[0].out_channels == 7 and model[3].kernels_alive == 7 and model[8].in_features == 7
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert (masked_reference(original, report.plan)(x) - model(x)).abs().max().item() <= 1e-5
