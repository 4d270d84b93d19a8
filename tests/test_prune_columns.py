"""Pruning unread channels: a channel whose every reader has only zero weights for it goes, with its
producer's kernels, exactly; a channel some reader uses, or that reaches the output, stays and says why."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune.convert import GaborConv2d
from gaborprune.convert.layer import alive_kernels
from gaborprune.prune import prune_model_
from gaborprune.recipe import Recipe, save_recipe
from helpers import ONLY_DEAD, SHAPE, kill, masked_reference, randomize_norms, run


class Concat(nn.Module):
    """Two Gabor banks concatenated, then BN, ReLU and a 1x1 Gabor bank: its columns 4-7 read `b`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = GaborConv2d(3, 4, 3, padding=1, bias=False), GaborConv2d(3, 4, 5, padding=2, bias=False)
        self.bn, self.mix, self.bn_m = nn.BatchNorm2d(8), GaborConv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.bn_m(self.mix(x))), 1).flatten(1))


class Depthwise(nn.Module):
    """A plain conv producer, a plain depthwise conv between BatchNorms, then a 1x1 Gabor bank."""

    def __init__(self):
        super().__init__()
        self.p, self.bn_p = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.mix, self.bn_m = GaborConv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn_dw(self.dw(F.relu(self.bn_p(self.p(x))))))
        return self.head(F.relu(self.bn_m(self.mix(x))).mean((2, 3)))


class TwoReaders(nn.Module):
    """A Gabor bank's channels are read by a 1x1 Gabor bank and, pooled, by the linear head."""

    def __init__(self):
        super().__init__()
        self.g, self.bn = GaborConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.m, self.bn_m = GaborConv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.g(x)))
        y = F.relu(self.bn_m(self.m(x)))
        return self.head(torch.cat([x.mean((2, 3)), y.mean((2, 3))], 1))


class ToOutput(nn.Module):
    """A concatenation ties a Gabor bank's channels to the model's output."""

    def __init__(self):
        super().__init__()
        self.g, self.bn, self.m = GaborConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), GaborConv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.g(x)))
        return torch.cat([self.m(x), x], 1).mean((2, 3))


class DepthwiseBank(nn.Module):
    """A plain conv read by a depthwise Gabor bank and, pooled, by the head."""

    def __init__(self):
        super().__init__()
        self.p, self.bn_p = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn_dw = GaborConv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn_p(self.p(x)))
        y = F.relu(self.bn_dw(self.dw(x)))
        return self.head(torch.cat([x.mean((2, 3)), y.mean((2, 3))], 1))


def mask_columns(bank, columns):
    with torch.no_grad():
        bank.mask[:, columns] = 0


def resnet20_altered(shape=SHAPE):
    model, _ = gp.load_model("resnet20_altered", input_shape=shape)
    return model


# family -> (build, bank whose columns die, columns, expected plan.channels)
REMOVED = {
    "folds": (tiny_models.Folds, "g2", [1, 4], {"g1": {"out": [1, 4]}, "bn1": {"out": [1, 4]}, "g2": {"in": [1, 4]}}),
    "concat": (Concat, "mix", [1, 5, 6], {"a": {"out": [1]}, "b": {"out": [1, 2]}, "bn": {"out": [1, 5, 6]}, "mix": {"in": [1, 5, 6]}}),
    "depthwise-plain-producer": (Depthwise, "mix", [0, 3], {"p": {"out": [0, 3]}, "bn_p": {"out": [0, 3]}, "dw": {"out": [0, 3], "in": [0, 3]},
                                                            "bn_dw": {"out": [0, 3]}, "mix": {"in": [0, 3]}}),
    "resnet20_altered": (resnet20_altered, "conv2", list(range(8)), {"conv1": {"out": list(range(8))}, "bn1": {"out": list(range(8))},
                                                                      "conv2": {"in": list(range(8))}}),
}


def output_sizes(model, shape):
    """H * W of every convolution's output at one input of `shape`."""
    sizes, hooks = {}, []

    def hook(name):
        def record(module, args, out):
            sizes[name] = out.shape[-2] * out.shape[-1]
        return record

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, GaborConv2d)):
            hooks.append(m.register_forward_hook(hook(name)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sizes


def expected_mac_drop(model, channels, shape):
    """MACs of the kernels and linear weights that `channels` removes from `model` (present ones only)."""
    sizes, drop = output_sizes(model, shape), 0
    for name, sides in channels.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            drop += len(sides.get("in", [])) * m.out_features
        elif isinstance(m, (nn.Conv2d, GaborConv2d)):
            alive = alive_kernels(m)
            cut = torch.zeros_like(alive)
            cut[sides.get("out", [])] = True
            if m.groups == 1:
                cut[:, sides.get("in", [])] = True
            drop += int((alive & cut).sum()) * m.kernel_size[0] * m.kernel_size[1] * sizes[name]
    return drop


def output_diff(a, b, shape=SHAPE):
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


@pytest.mark.parametrize("family", list(REMOVED))
def test_unread_channels_go_with_their_producers_kernels(family):
    build, bank, columns, expected = REMOVED[family]
    torch.manual_seed(0)
    model = randomize_norms(build()).eval()
    mask_columns(model.get_submodule(bank), columns)
    masked = copy.deepcopy(model)  # the oracle: nothing cut out
    drop = expected_mac_drop(masked, expected, SHAPE)
    sizes_before = {n: (m.out_channels, m.in_channels) for n, m in masked.named_modules() if isinstance(m, (nn.Conv2d, GaborConv2d))}

    report = prune_model_(model, SHAPE, ONLY_DEAD)

    assert report.plan.channels == expected and not report.kept
    assert output_diff(masked, model) < 1e-5 and report.max_abs_diff < 1e-5
    for name, sides in expected.items():
        m = model.get_submodule(name)
        if isinstance(m, (nn.Conv2d, GaborConv2d)):
            out, inp = sizes_before[name]
            assert (m.out_channels, m.in_channels) == (out - len(sides.get("out", [])), inp - len(sides.get("in", []))), name
    assert drop > 0 and report.before.macs - report.after.macs == drop
    changes = {c.name: c for c in report.layers}
    consumer = changes[bank]
    assert consumer.in_channels_before - consumer.in_channels_after == len(columns)
    assert consumer.kernels_after == consumer.kernels_before  # its removed columns held only masked kernels
    for m in model.modules():
        if isinstance(m, GaborConv2d):
            assert (m.weight.detach()[m.mask == 0] == 0).all()


def test_the_readers_linear_weights_count_and_a_live_second_reader_keeps_the_channel():
    torch.manual_seed(0)
    model = randomize_norms(TwoReaders()).eval()
    mask_columns(model.m, [1, 2, 6])
    with torch.no_grad():
        model.head.weight[:, [2, 6]] = 0  # the head ignores x's channels 2 and 6 too; channel 1 it reads
    masked = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert report.plan.channels == {"g": {"out": [2, 6]}, "bn": {"out": [2, 6]}, "m": {"in": [2, 6]}, "head": {"in": [2, 6]}}
    assert [(k.layer, k.channel, k.side) for k in report.kept] == [("m", 1, "in")]
    assert "also read, with non-zero weights, by 'head'" in report.kept[0].reason
    assert model.g.out_channels == 6 and model.head.in_features == 14 and model.m.in_channels == 6
    assert output_diff(masked, model) < 1e-5
    assert report.before.macs - report.after.macs == expected_mac_drop(masked, report.plan.channels, SHAPE)


def test_a_channel_dead_in_one_consumer_but_live_in_another_stays():
    torch.manual_seed(0)
    model = randomize_norms(TwoReaders()).eval()
    mask_columns(model.m, [3])  # the head still reads channel 3
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert not report.plan.channels and model.g.out_channels == 8 and model.m.kernels_alive == 56
    assert [(k.layer, k.channel, k.side) for k in report.kept] == [("m", 3, "in")]


@pytest.mark.parametrize("build,columns,fragment", [
    (tiny_models.Residual, [2, 5], "also read, with non-zero weights, by 'conv3'"),  # x + g2(x): the identity path reaches conv3
    (ToOutput, [0, 7], "part of the model's output"),
])
def test_a_tie_to_a_reader_that_uses_it_or_to_the_output_keeps_the_channel(build, columns, fragment):
    torch.manual_seed(0)
    bank = "g2" if build is tiny_models.Residual else "m"
    model = randomize_norms(build()).eval()
    mask_columns(model.get_submodule(bank), columns)
    masked = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert not report.plan.channels
    assert [(k.layer, k.channel, k.side) for k in report.kept] == [(bank, c, "in") for c in columns]
    assert all(fragment in k.reason for k in report.kept), report.kept
    assert output_diff(masked, model) == 0


def test_a_dead_depthwise_channel_tied_to_a_live_channel_that_another_layer_reads_stays():
    torch.manual_seed(0)
    model = randomize_norms(DepthwiseBank()).eval()
    kill(model.bn_dw, [2], -1.0)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert [(k.layer, k.channel, k.side) for k in report.kept] == [("dw", 2, "out")] and not report.plan.channels
    assert "tied to a live channel of 'p'" in report.kept[0].reason and "which 'head' reads" in report.kept[0].reason


def test_dead_output_channels_and_unread_channels_combine_in_one_component():
    """Residual: g1's channel 0 is dead (a constant 0), g2's channel 0 is live but every reader of
    x + g2(x) ignores channel 0, and g2 reads the constant: the whole component goes."""
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Residual()).eval()
    kill(model.bn1, [0], -1.0)
    with torch.no_grad():
        model.conv3.weight[:, 0] = 0
        model.shortcut.weight[:, 0] = 0
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    masked = masked_reference(original, report.plan)  # g1's channel 0, masked by the prune
    assert report.plan.channels == {"g1": {"out": [0]}, "bn1": {"out": [0]}, "g2": {"out": [0], "in": [0]}, "bn2": {"out": [0]},
                                    "conv3": {"in": [0]}, "shortcut": {"in": [0]}}
    assert output_diff(masked, model) < 1e-5 and not report.kept


def test_a_gabor_bank_on_the_residual_stream_of_resnet20_altered_keeps_its_dead_columns():
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20_altered", input_shape=SHAPE)
    gp.gaborize_(model, gp.ConversionSpec(targets=("layer1.0.conv1",), init="random"), SHAPE)
    randomize_norms(model).eval()
    mask_columns(model.layer1[0].conv1, [3, 9])
    masked = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)
    assert not report.plan.channels and [(k.layer, k.channel) for k in report.kept] == [("layer1.0.conv1", 3), ("layer1.0.conv1", 9)]
    assert "by 'layer2.0.conv1'" in report.kept[0].reason  # layer1's one block adds the channel to its output, read by layer2
    assert output_diff(masked, model) == 0


def masked_resnet(tmp_path, columns=range(8)):
    torch.manual_seed(0)
    model, recipe = gp.load_model("resnet20_altered", input_shape=SHAPE)
    randomize_norms(model)
    mask_columns(model.conv2, list(columns))
    path = tmp_path / "masked.pt"
    save_recipe(path, model, recipe)
    return path


def test_the_plan_replays_from_the_recipe_in_a_fresh_interpreter(tmp_path):
    model, recipe = gp.load_model(str(masked_resnet(tmp_path)))
    recipe = recipe.with_step(prune_model_(model, recipe.input_shape, ONLY_DEAD).step)
    assert recipe.prunes[0].plan.channels["conv2"] == {"in": list(range(8))}
    assert recipe.prunes[0].plan.channels["conv1"]["out"] == list(range(8))
    save_recipe(tmp_path / "p.pt", model, recipe)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        torch.save({"x": x, "y": model.eval()(x)}, tmp_path / "io.pt")
    code = (f"import torch, gaborprune as gp; m, r = gp.load_model({str(tmp_path / 'p.pt')!r}); "
            f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True); "
            "print(float((m.eval()(io['x']) - io['y']).abs().max()), m.conv1.out_channels, m.bn1.num_features, m.conv2.in_channels, m.conv1.kernels_alive)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={"PATH": ""})
    assert done.returncode == 0, done.stderr
    diff, *sizes = done.stdout.split()
    assert float(diff) == 0.0 and list(map(int, sizes)) == [8, 8, 8, 24]


def test_cli_dry_run_says_what_would_go(tmp_path):
    path = masked_resnet(tmp_path)
    result = run("prune", path, "--threshold", "1e-6", "--dry-run", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "would remove from conv1: out 0, 1, 2, 3, 4, 5, 6, 7" in result.stdout
    assert "would remove from bn1: out 0, 1, 2, 3, 4, 5, 6, 7" in result.stdout and "would remove from conv2: in 0, 1, 2, 3, 4, 5, 6, 7" in result.stdout
    layers = {layer["name"]: layer for layer in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert (layers["conv1"]["channels_before"], layers["conv1"]["channels_after"], layers["conv1"]["kernels_after"]) == (16, 8, 24)
    assert (layers["conv2"]["in_channels_before"], layers["conv2"]["in_channels_after"], layers["conv2"]["kernels_after"]) == (16, 8, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masked.pt", "r.json"]


def test_cli_names_the_kept_columns(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(tiny_models.Residual())
    mask_columns(model.g2, [2, 5])
    save_recipe(tmp_path / "r.pt", model, Recipe(gp.ModelSource("tiny_models:Residual"), SHAPE))
    result = run("prune", tmp_path / "r.pt", "--trust-factory", "--threshold", "1e-6", "--dry-run", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "kept the channels read by dead input columns of g2 (2, 5)" in result.stdout and "'conv3'" in result.stdout
    kept = json.loads((tmp_path / "r.json").read_text())["kept_channels"]
    assert [(k["layer"], k["channel"], k["side"]) for k in kept] == [("g2", 2, "in"), ("g2", 5, "in")]
