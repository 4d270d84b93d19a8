"""`--scope all`: channel groups of every convolution, their pressure, and pruning whole channels and
whole residual branches exactly (Step 9)."""

import collections
import copy
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

import gaborprune as gp
from gaborprune.data import DataSpec, load_data
from gaborprune.export.api import ExportConfig, export_model
from gaborprune.prune import PruneSpec, prune_model_
from gaborprune.prune.groups import channel_groups
from gaborprune.prune.plan import PrunePlan, apply_plan_
from gaborprune.prune.standins import ChannelConstant, Dropped
from gaborprune.prune.structured import dead_units
from gaborprune.recipe import save_recipe
from gaborprune.sparsity import GaborSparsity, kernel_strength
from gaborprune.summary import summarize
from gaborprune.train.loop import recalibrate_norms_
from helpers import one_line_error, randomize_norms, run

SHAPE = (3, 16, 16)


def resnet20():
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20", input_shape=SHAPE)
    return randomize_norms(model).eval(), recipe


@torch.no_grad()
def silence_(model: nn.Module, norm: str, channels) -> None:
    """Make channels of a BatchNorm's output exactly 0: gain and shift 0."""
    bn = model.get_submodule(norm)
    bn.weight[list(channels)] = 0
    bn.bias[list(channels)] = 0


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_groups_of_every_convolution_in_a_resnet():
    model, recipe = resnet20()
    analysis = channel_groups(model, SHAPE, "all")
    counts = analysis.counts()
    # the stage-1 stream: the stem and each block's second conv write it (one group per channel, across all four)
    assert counts["conv1+layer1.0.conv2+layer1.1.conv2+layer1.2.conv2 out"] == 16
    assert counts["layer1.0.conv1 out"] == 16 and counts["layer3.2.conv1 out"] == 64  # each branch's inside
    assert analysis.branches == [f"layer{s}.{b}.conv1 out" for s in (1, 2, 3) for b in range(3)]
    missing = {m.describe() for m in analysis.missing}
    assert "layer3.2.conv1 in (64 channels): also read by linear layer 'fc'" in missing  # the classifier stays
    assert not channel_groups(model, SHAPE, "banks").groups  # no Gabor bank: nothing with the old scope


def test_a_plain_groups_strength_is_its_batchnorm_gain_and_invariant_to_the_scale_it_absorbs():
    model, _ = resnet20()
    sparsity = GaborSparsity(model, SHAPE, "channel", "all")
    family = sparsity.families["layer1.0.conv1 out"]
    s = {n: kernel_strength(m, sparsity.norms[n]) for n, m in {**sparsity.layers, **sparsity.plain}.items()}
    torch.testing.assert_close(family.strength(s), model.layer1[0].bn1.weight.abs(), rtol=1e-5, atol=1e-6)
    before = sparsity.penalty().item()
    with torch.no_grad():  # a conv row scaled: BatchNorm divides it out (its statistics scale too)
        model.layer1[0].conv1.weight[3] *= 40.0
        model.layer1[0].bn1.running_mean[3] *= 40.0
        model.layer1[0].bn1.running_var[3] *= 1600.0
    assert sparsity.penalty().item() == pytest.approx(before, rel=1e-5)
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] *= 0.1
    assert sparsity.penalty().item() != pytest.approx(before, rel=1e-3)


def test_a_dead_branch_goes_whole_and_the_output_does_not_change():
    """All channels inside layer1.1 hold exactly 0: the branch becomes its constant, two convolutions go."""
    model, recipe = resnet20()
    silence_(model, "layer1.1.bn1", range(16))
    x = torch.randn(3, *SHAPE)
    before = outputs(model, x)
    report = prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    block = model.layer1[1]
    assert isinstance(block.conv1, Dropped) and isinstance(block.bn1, Dropped)
    assert isinstance(block.conv2, ChannelConstant) and isinstance(block.bn2, nn.Identity)
    assert report.plan.constants == {"layer1.1.conv2": "layer1.1.bn2"}
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)  # the oracle: the unpruned model
    assert report.after.macs < report.before.macs
    assert not any(k.layer.startswith("layer1.1.") for k in report.kept)  # nothing "kept" of a layer removed whole


def test_dead_channels_go_in_multiples_of_round_to_and_the_output_does_not_change():
    model, recipe = resnet20()
    silence_(model, "layer3.0.bn1", range(40))  # 40 of 64 dead; round to 16 keeps 32
    x = torch.randn(3, *SHAPE)
    before = outputs(model, x)
    prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=16))
    assert model.layer3[0].conv1.out_channels == 32 and model.layer3[0].conv2.in_channels == 32
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)
    dead, counts, _ = dead_units(*resnet20_silenced(), 0.01, 1)
    assert counts["layer3.0.conv1 out"] == [24, 64]


def resnet20_silenced():
    model, _ = resnet20()
    silence_(model, "layer3.0.bn1", range(40))
    return model, SHAPE


def test_a_stream_channel_goes_from_every_block_of_the_stage():
    """Channel 5 of the stage-3 stream: every writer's BatchNorm silenced; it goes from all of them
    and from the classifier's input."""
    model, recipe = resnet20()
    for norm in ("layer3.0.bn2", "layer3.0.shortcut.1", "layer3.1.bn2", "layer3.2.bn2"):
        silence_(model, norm, [5])
    x = torch.randn(3, *SHAPE)
    before = outputs(model, x)
    prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert model.fc.in_features == 63 and model.layer3[2].conv2.out_channels == 63 and model.layer3[1].conv1.in_channels == 63
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)


def test_a_weak_channel_keeps_its_constant_where_the_reader_has_no_border():
    """A channel with gain 0 but shift 0.7 read only by 1x1 convolutions: its constant is folded, exactly."""
    model, recipe = resnet20()
    with torch.no_grad():
        bn = model.layer2[0].bn2
        bn.weight[3], bn.bias[3] = 0.0, 0.7
    # the stage-2 stream channel 3 is written by layer2.x.bn2 and the shortcut; silence the other writers' gains only
    with torch.no_grad():
        for norm in ("layer2.0.shortcut.1", "layer2.1.bn2", "layer2.2.bn2"):
            model.get_submodule(norm).weight[3] = 0.0
    x = torch.randn(3, *SHAPE)
    before = outputs(model, x)
    report = prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert model.layer2[2].conv2.out_channels == 31
    assert report.plan.folds  # the constant went somewhere
    # 3x3 readers see it inside and 0 at their one-pixel border: the difference is confined there, and small
    diff = (outputs(model, x) - before).abs().max()
    assert diff < 0.2 * before.abs().max()


def test_the_plan_alone_replays_on_the_unpruned_weights_and_in_a_fresh_interpreter(tmp_path):
    model, recipe = resnet20()
    silence_(model, "layer1.1.bn1", range(16))
    silence_(model, "layer2.2.bn1", range(20))
    unpruned = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    recipe = recipe.with_step(report.step)
    x = torch.randn(3, *SHAPE)
    fresh, _ = gp.load_model("resnet20", input_shape=SHAPE)
    fresh.load_state_dict(unpruned)
    apply_plan_(fresh, PrunePlan.from_dict(report.plan.to_dict()))
    torch.testing.assert_close(outputs(fresh, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    save_recipe(tmp_path / "p.pt", model, recipe)
    torch.save({"x": x, "y": outputs(model, x)}, tmp_path / "io.pt")
    code = (f"import torch, gaborprune as gp; m, r = gp.load_model({str(tmp_path / 'p.pt')!r}); "
            f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True); "
            "print(float((m.eval()(io['x']) - io['y']).abs().max()), type(m.layer1[1].conv2).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    diff, kind = done.stdout.split()
    assert float(diff) == 0.0 and kind == "ChannelConstant"


def test_a_removed_branch_exports_without_its_convolutions(tmp_path):
    model, recipe = resnet20()
    silence_(model, "layer1.1.bn1", range(16))
    recipe = recipe.with_step(prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1)).step)
    report = export_model(model, SHAPE, tmp_path / "m.onnx", ExportConfig(lowering="dense"), provenance=recipe.provenance())  # parity-checked
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node)
    assert ops["Conv"] == 21 - 2 and not {"Slice", "ConstantOfShape", "BatchNormalization"} & set(ops)
    assert report.max_abs_diff < 1e-4


def test_a_second_prune_after_a_branch_went():
    """The stand-ins read nothing and carry constants: the stream around them can still be cut."""
    model, recipe = resnet20()
    silence_(model, "layer1.1.bn1", range(16))
    prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    for norm in ("bn1", "layer1.0.bn2", "layer1.2.bn2"):
        silence_(model, norm, [2])
    with torch.no_grad():
        model.layer1[1].conv2.value[0, 2] = 0.0  # the removed branch's constant for that channel
    x = torch.randn(3, *SHAPE)
    before = outputs(model, x)
    prune_model_(model, SHAPE, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert model.conv1.out_channels == 15 and model.layer1[1].conv2.out_channels == 15
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)


def test_recalibration_gives_the_statistics_of_the_whole_split():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    data = load_data(DataSpec.parse("fake:40:3"), SHAPE)[0]
    seen = []
    hook = model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    recalibrate_norms_(model, data, 16, torch.device("cpu"))
    hook.remove()
    y = torch.cat(seen)  # the BatchNorm's inputs over the whole split
    torch.testing.assert_close(model[1].running_mean, y.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and not model.training


def test_scope_options_give_one_line_errors(tmp_path):
    for args, words in [
        (["finetune", "resnet20", "--data", "fake:64:4", "--input-shape", "3,16,16", "--scope", "all", "--structure", "kernel", "-o", str(tmp_path / "a.pt")],
         "--structure channel"),
        (["finetune", "resnet20", "--data", "fake:64:4", "--input-shape", "3,16,16", "--scope", "every", "-o", str(tmp_path / "b.pt")], "every"),
        (["prune", "resnet20", "--input-shape", "3,16,16", "--round-to", "16", "-o", str(tmp_path / "c.pt")], "--scope all"),
        (["prune", "resnet20", "--input-shape", "3,16,16", "--scope", "all", "--keep", "5", "-o", str(tmp_path / "d.pt")], "--threshold or --ratio"),
    ]:
        one_line_error(run(*args), words)
    assert not list(tmp_path.iterdir())


class MacsTimer:
    """Times in proportion to MACs, with a little noise shared by each pair (the tests fix the timings)."""

    def __init__(self, model, shape):
        from gaborprune.summary import summarize

        self.summarize, self.shape = summarize, shape
        self.base = summarize(model, shape).macs

    def time(self, candidate):
        ratio = self.summarize(candidate, self.shape).macs / self.base
        noise = [1 + 0.001 * (k % 5) for k in range(40)]
        return [n for n in noise], [ratio * n for n in noise]


def test_pruning_to_a_speedup_removes_the_weakest_channels_first():
    from gaborprune.prune.candidates import TARGET_RATIOS
    from gaborprune.search import prune_to_target_

    model, recipe = resnet20()
    with torch.no_grad():  # graded branches: layer1.k's inside at gain 0.1 (k + 1), the rest at 1
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        for k in range(3):
            model.layer1[k].bn1.weight.fill_(0.1 * (k + 1))
    report = prune_to_target_(model, SHAPE, speedup=1.05, scope="all", round_to=16, timer=MacsTimer(model, SHAPE))
    assert report.chosen is not None and report.prune is not None
    chosen = report.chosen_candidate
    assert chosen.meets and chosen.speedup.low >= 1.05 and report.removed == {"ratio": TARGET_RATIOS[report.chosen - 1]}
    assert all(not c.meets for c in report.candidates if c.k < report.chosen)  # nothing less was enough
    assert report.prune.after.macs / report.prune.before.macs == pytest.approx(chosen.mac_ratio)
    assert chosen.branches == sorted(report.prune.plan.constants)
    assert report.step.plan == report.prune.plan and isinstance(model.layer1[0].conv2, ChannelConstant)  # the weakest branch went, whole
    unreachable = prune_to_target_(resnet20()[0], SHAPE, speedup=1e6, scope="all", timer=MacsTimer(*resnet20_silenced()))
    assert unreachable.chosen is None and unreachable.step is None and "not reachable" in unreachable.message
    assert [c.details for c in unreachable.candidates] == [{"ratio": TARGET_RATIOS[-1]}]


def _uniform_resnet20():
    """Every BatchNorm gain 1: no pressure separated anything, so no relative threshold removes a channel."""
    model, recipe = resnet20()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    return model


def test_a_target_is_met_even_where_the_pressure_separated_nothing():
    """Relative thresholds (up to 0.8 of the strongest, the earlier candidates) removed nothing here;
    a share of the channels, weakest first, reaches the target."""
    from gaborprune.search import prune_to_target_

    model = _uniform_resnet20()
    assert prune_model_(copy.deepcopy(model), SHAPE, PruneSpec(threshold=0.8, scope="all", round_to=4)).after.macs == summarize(model, SHAPE).macs
    report = prune_to_target_(model, SHAPE, speedup=1.5, scope="all", round_to=4, timer=MacsTimer(model, SHAPE))
    assert report.chosen is not None and report.chosen_candidate.mac_ratio <= 1 / 1.5 + 0.01
    x = torch.randn(2, *SHAPE)
    assert torch.isfinite(model.eval()(x)).all()


def test_a_mac_target_is_counted_and_met_by_the_least_removal():
    from gaborprune.search import prune_to_target_

    model = _uniform_resnet20()
    report = prune_to_target_(model, SHAPE, macs=0.6, scope="all", round_to=4)  # no timer: nothing is timed
    chosen = report.chosen_candidate
    assert chosen.mac_ratio <= 0.6 and chosen.measured is None and report.baseline is None
    assert report.prune.after.macs <= 0.6 * report.prune.before.macs
    tried = {c.k: c for c in report.candidates}
    assert report.chosen - 1 in tried and tried[report.chosen - 1].mac_ratio > 0.6  # the bisection closed on the answer
    assert all(c.meets == (c.mac_ratio <= 0.6) for c in report.candidates)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_a_ratio_removes_that_share_of_the_channels_weakest_first(ratio):
    from gaborprune.prune.structured import units

    model, _ = resnet20()
    removed, _, _ = dead_units(model, SHAPE, 0.02, None, ratio=ratio)
    every = units(GaborSparsity(model, SHAPE, "channel", "all"))
    share = round(ratio * len(every))
    assert 0.9 * share <= len(removed) <= share  # a layer whose every channel is among the weakest keeps one

    def key(u):
        layer, kernels = u.groups[u.side].members[0]
        return u.side, layer, tuple(kernels[0])

    weakest, gone = max(u.absolute for u in removed), {key(u) for u in removed}
    assert all(u.absolute >= weakest for u in every if key(u) not in gone)  # none kept is weaker than one removed
    spec = PruneSpec(scope="all", ratio=ratio, round_to=1)
    report = prune_model_(model, SHAPE, spec)  # checks compacted == masked itself
    assert report.after.macs < report.before.macs and report.step.plan.spec == spec.to_dict()


@pytest.mark.parametrize("name, norm, channels, check", [
    # an inverted residual: the expansion's channels, through a depthwise conv, go from the 1x1 on each side
    ("Mobile", "block.1", range(16), lambda m: m.block[0].out_channels == 16 and m.block[3].groups == 16 and m.block[6].in_channels == 16),
    # a dense layer: the bottleneck's channels go; the concatenated stem stays a group of its own
    ("Dense", "layers.0.norm2", [0, 1, 5], lambda m: m.layers[0].conv1.out_channels == 5 and m.layers[0].conv2.in_channels == 5),
])
def test_silenced_channels_go_exactly_across_topologies(name, norm, channels, check):
    torch.manual_seed(0)
    model, recipe = gp.load_model(f"tiny_models:{name}", trust_factory=True)
    randomize_norms(model).eval()
    silence_(model, norm, channels)
    x = torch.randn(3, *recipe.input_shape)
    before = outputs(model, x)
    prune_model_(model, recipe.input_shape, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert check(model)
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)


def silence_units_(model: nn.Module, shape, count: int = 2) -> list[str]:
    """Silence `count` units of the first set with at least four that go by their out side (their
    writers' BatchNorms: gain and shift 0). Returns the writers' names."""
    from gaborprune.prune.structured import units

    sparsity = GaborSparsity(model, shape, "channel", "all")
    by_set = collections.defaultdict(list)
    for u in units(sparsity):
        if u.side == "out" and all(layer in sparsity.groups.norms for layer, _ in u.groups["out"].members):
            by_set[u.set].append(u)
    members = next(m for m in by_set.values() if len(m) >= 4)
    writers = []
    for u in members[:count]:
        for layer, kernels in u.groups["out"].members:
            silence_(model, sparsity.groups.norms[layer], [kernels[0][0]])
            writers.append(layer)
    return writers


@pytest.mark.parametrize("family", ["Chain", "Folds", "Residual", "Dense", "Mobile"])
def test_silenced_units_go_exactly_in_every_topology_family(family):
    torch.manual_seed(0)
    model, recipe = gp.load_model(f"tiny_models:{family}", trust_factory=True, input_shape=SHAPE)
    randomize_norms(model).eval()
    writers = silence_units_(model, recipe.input_shape)
    x = torch.randn(3, *recipe.input_shape)
    before = outputs(model, x)
    report = prune_model_(model, recipe.input_shape, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert all(report.plan.channels[w]["out"] for w in writers)
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121"])
def test_silenced_units_go_exactly_in_torchvision_models(name, tmp_path):
    """...and the pruned model exports, onnxruntime computing what PyTorch does."""
    torch.manual_seed(0)
    model, recipe = gp.load_model(f"torchvision:{name}", num_classes=10, input_shape=(3, 64, 64))
    randomize_norms(model).eval()
    writers = silence_units_(model, recipe.input_shape)
    x = torch.randn(2, *recipe.input_shape)
    before = outputs(model, x)
    report = prune_model_(model, recipe.input_shape, PruneSpec(threshold=0.01, scope="all", round_to=1))
    assert all(report.plan.channels[w]["out"] for w in writers) and report.after.macs < report.before.macs
    torch.testing.assert_close(outputs(model, x), before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    import onnxruntime as ort

    gp.export_model(model, recipe.input_shape, tmp_path / "m.onnx", gp.ExportConfig(lowering="dense", check_inputs=1))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), before[:1], rtol=1e-4, atol=1e-4 * float(before.abs().max()))


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_a_ratio_prunes_mobilenets_whose_shifts_are_not_zero(name):
    """Trained BatchNorms have shifts: a removed channel's constant act(shift) would reach the zero-padded
    depthwise convolution after it unevenly, so the channel must carry 0 (it was zeroed, then refused as
    'a gaborprune bug'). The compacted model computes what the masked one does."""
    torch.manual_seed(0)
    model, recipe = gp.load_model(f"torchvision:{name}", num_classes=10, input_shape=(3, 64, 64))
    randomize_norms(model).eval()
    report = prune_model_(model, recipe.input_shape, PruneSpec(scope="all", ratio=0.3))
    assert report.after.macs < 0.8 * report.before.macs
    assert report.max_abs_diff <= 1e-4 * max(1.0, float(outputs(model, torch.randn(2, *recipe.input_shape)).abs().max()))
