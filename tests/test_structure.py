"""Structure-aware sparsity: the channel groups come from the prune analysis, a dead group removes its
channel exactly, the group pressure is BatchNorm-scale invariant and kills whole groups."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaborprune as gp
import tiny_models
from gaborprune.convert import GaborConv2d
from gaborprune.errors import GaborPruneError
from gaborprune.prune import prune_model_
from gaborprune.prune.groups import ChannelGroup, channel_groups
from gaborprune.reproduce import EXPERIMENTS
from gaborprune.sparsity import GROUP_WEIGHT, GaborSparsity, following_norms, kernel_strength, l1_l2_ratio
from gaborprune.train import TrainConfig
from helpers import ONLY_DEAD, SHAPE, masked_reference, one_line_error, randomize_norms, run, scale_channels_with_their_norms_

INPUT = "part of the model's input"


def out_groups(banks, n, note=""):
    """n groups of output channels, one per channel c: row c of each (bank, its input channels)."""
    return [ChannelGroup("out", tuple((b, tuple((c, i) for i in range(w))) for b, w in banks), note) for c in range(n)]


def in_groups(bank, height, n):
    return [ChannelGroup("in", ((bank, tuple((o, c) for o in range(height))),)) for c in range(n)]


def padded(reader):
    return f"the dead channel goes only when its constant is 0 at zero-padded '{reader}' (e.g. a BatchNorm shift <= 0 before a ReLU)"


class Tie(nn.Module):
    """A concatenation added to a third bank: a's channel i and b's j are tied to c's i and 4 + j."""

    def __init__(self):
        super().__init__()
        self.a, self.b = GaborConv2d(3, 4, 3, padding=1, bias=False), GaborConv2d(3, 4, 5, padding=2, bias=False)
        self.c = GaborConv2d(3, 8, 1, bias=False)
        self.bn, self.mix, self.bn_m = nn.BatchNorm2d(8), GaborConv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)))
        return self.head(F.relu(self.bn_m(self.mix(x))).mean((2, 3)))


def resnet20_altered():
    return gp.load_model("resnet20_altered", input_shape=SHAPE)[0]


def tie_groups():
    a = [ChannelGroup("out", (("a", tuple((c, i) for i in range(3))), ("c", tuple((c, i) for i in range(3))))) for c in range(4)]
    b = [ChannelGroup("out", (("b", tuple((c, i) for i in range(3))), ("c", tuple((4 + c, i) for i in range(3))))) for c in range(4)]
    return a + b + in_groups("mix", 8, 8) + out_groups([("mix", 8)], 8)


# family -> (build, expected groups, expected {(bank, side): reason} for the sides without groups), all hand-derived
GROUPS = {
    "vgg-chain": (tiny_models.Chain, lambda: out_groups([("g1", 3)], 8, padded("conv2")), {("g1", "in"): INPUT}),
    # g1 -> avg-pool -> g2 (1x1): g1's rows, and g2's columns, each remove a channel; g2's rows reach p and the head
    "folds": (tiny_models.Folds, lambda: out_groups([("g1", 3)], 8) + out_groups([("g2", 8)], 8) + in_groups("g2", 8, 8),
              {("g1", "in"): INPUT}),
    # x + g2(x): g1's and g2's rows are one group; conv3 and the shortcut, plain, read the stream
    "resnet-residual": (tiny_models.Residual, lambda: out_groups([("g1", 3), ("g2", 8)], 8, padded("g2")),
                        {("g1", "in"): INPUT, ("g2", "in"): "also read by plain convolution 'conv3'"}),
    "densenet-concat": (tiny_models.Dense, lambda: out_groups([("stem", 3)], 8), {("stem", "in"): INPUT}),
    "mobilenet-depthwise": (tiny_models.Mobile, lambda: out_groups([("stem.0", 3)], 8, padded("dw.0")), {("stem.0", "in"): INPUT}),
    "concat-and-add": (Tie, tie_groups, {("a", "in"): INPUT, ("b", "in"): INPUT, ("c", "in"): INPUT}),
    "resnet20_altered": (resnet20_altered, lambda: out_groups([("conv1", 3)], 16, padded("conv2")) + in_groups("conv2", 16, 16), {
        ("conv1", "in"): INPUT,
        ("conv2", "out"): "tied to output channels of plain convolution 'layer1.0.conv2' "
                          "(through an addition, product, concatenation or depthwise convolution)",
    }),
}


@pytest.mark.parametrize("family", list(GROUPS))
def test_groups_found_on_each_topology(family):
    build, expected, missing = GROUPS[family]
    torch.manual_seed(0)
    analysis = channel_groups(build(), SHAPE)
    assert set(analysis.groups) == set(expected()) and len(analysis.groups) == len(expected())
    assert {(m.layer, m.side): m.reason for m in analysis.missing} == missing
    assert analysis.note is None
    sparsity = GaborSparsity(build(), SHAPE, "channel")
    assert sum(sparsity.groups_total().values()) == len(expected())


def test_the_report_counts_groups_by_layer_and_side_and_says_why_others_have_none():
    analysis = channel_groups(resnet20_altered(), SHAPE)
    assert analysis.counts() == {"conv1 out": 16, "conv2 in": 16}
    assert analysis.reasons() == ["conv1 in (3 channels): part of the model's input",
                                  "conv2 out (16 channels): tied to output channels of plain convolution 'layer1.0.conv2' "
                                  "(through an addition, product, concatenation or depthwise convolution)"]
    assert channel_groups(tiny_models.Residual(), SHAPE).counts() == {"g1+g2 out": 8}  # one group across the tied banks


def old_penalty(model, shape):
    """The kernel pressure as it was before structures: sum over banks of the kernels' L1/L2 ratio."""
    norms, modules = following_norms(model, shape), dict(model.named_modules())
    return sum(l1_l2_ratio(kernel_strength(m, modules[norms[n]] if n in norms else None))
               for n, m in modules.items() if isinstance(m, GaborConv2d))


def test_an_untraceable_model_has_no_groups_and_keeps_the_kernel_pressure():
    torch.manual_seed(0)
    model = tiny_models.Untraceable()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    assert not sparsity.groups.groups and "torch.fx could not trace the model" in sparsity.groups.note
    assert sparsity.groups_alive() == {} and sparsity.penalty().item() == pytest.approx(old_penalty(model, SHAPE).item(), rel=1e-6)


def dead_constant_zero(model, group):
    """Make the constant a dead out group's channel emits 0 after the ReLU: no bias, BN shift -1."""
    norms, modules = following_norms(model, SHAPE), dict(model.named_modules())
    with torch.no_grad():
        for bank, kernels in group.members:
            c = kernels[0][0]
            if modules[bank].bias is not None:
                modules[bank].bias[c] = 0
            if bank in norms:  # (the banks of Tie add up before their BatchNorm: 0 there folds anyway)
                bn = modules[norms[bank]]
                bn.running_mean[c], bn.bias[c] = 0.0, -1.0


@pytest.mark.parametrize("family", list(GROUPS))
def test_a_dead_group_removes_its_channel_and_changes_the_output_by_nothing(family):
    build, _, _ = GROUPS[family]
    torch.manual_seed(0)
    model = randomize_norms(build()).eval()
    groups = {g.label: g for g in channel_groups(model, SHAPE).groups if g.channel == 1}  # channel 1 of each label
    for group in groups.values():
        m = copy.deepcopy(model)
        if group.kind == "out":
            dead_constant_zero(m, group)
        with torch.no_grad():
            for bank, kernels in group.members:
                for o, i in kernels:
                    m.get_submodule(bank).mask[o, i] = 0
        original = copy.deepcopy(m)
        report = prune_model_(m, SHAPE, ONLY_DEAD)
        assert not report.kept, (group.label, report.kept)
        for bank, kernels in group.members:
            o, i = kernels[0]
            assert report.plan.channels[bank][group.kind] == [o if group.kind == "out" else i], (group.label, report.plan.channels)
        x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2
        with torch.no_grad():
            assert (masked_reference(original, report.plan).eval()(x) - m.eval()(x)).abs().max().item() <= 1e-5, group.label


def test_kernel_structure_is_the_old_penalty_exactly():
    torch.manual_seed(0)
    model = randomize_norms(resnet20_altered())
    model.conv2.mask[3, :5] = 0
    old = old_penalty(model, SHAPE)
    for structure in ("kernel", None):
        assert torch.equal(GaborSparsity(model, SHAPE, structure).penalty(), old)
    assert GaborSparsity(model, SHAPE, "channel").penalty() > old


def test_channel_penalty_is_the_kernel_term_plus_the_group_ratios():
    """resnet20_altered: conv1's groups are its rows, conv2's its columns (closed form)."""
    torch.manual_seed(0)
    model = randomize_norms(resnet20_altered())
    s1, s2 = kernel_strength(model.conv1, model.bn1), kernel_strength(model.conv2, model.bn2)
    expected = old_penalty(model, SHAPE) + GROUP_WEIGHT * (l1_l2_ratio(s1.norm(dim=1)) + l1_l2_ratio(s2.norm(dim=0)))
    torch.testing.assert_close(GaborSparsity(model, SHAPE, "channel").penalty(), expected)


def test_the_penalty_is_invariant_to_the_scale_batchnorm_absorbs():
    """Scale one output channel's amplitudes and its BatchNorm's statistics together: the model
    computes the same function, and the channel pressure is unchanged."""
    torch.manual_seed(0)
    model = randomize_norms(resnet20_altered()).eval()
    model.bn1.eps = model.bn2.eps = 0.0  # so that scaling the variance is exact
    sparsity = GaborSparsity(model, SHAPE, "channel")
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        before_y, before_p = model(x), sparsity.penalty().item()
        scale_channels_with_their_norms_(((model.conv1, model.bn1, 5, 30.0), (model.conv2, model.bn2, 2, 1e-2)))
        torch.testing.assert_close(model(x), before_y, rtol=1e-4, atol=1e-4)  # the same function...
    assert sparsity.penalty().item() == pytest.approx(before_p, rel=1e-5)  # ...the same pressure
    with torch.no_grad():
        model.bn2.weight[2] *= 0.1  # a real change of strength is seen
    assert sparsity.penalty().item() != pytest.approx(before_p, rel=1e-3)


def test_group_ratio_closed_form_across_tied_banks():
    """Residual: group k's strength is sqrt(||s_g1[k]||^2 + ||s_g2[k]||^2); L1/L2 over the 8 groups."""
    family = GaborSparsity(tiny_models.Residual(), SHAPE, "channel").families["g1+g2 out"]
    even = {"g1": torch.ones(8, 3), "g2": torch.ones(8, 8)}
    torch.testing.assert_close(family.strength(even), torch.full((8,), math.sqrt(11.0)))
    assert float(l1_l2_ratio(family.strength(even))) == pytest.approx(math.sqrt(8))
    two = {"g1": torch.zeros(8, 3), "g2": torch.zeros(8, 8)}
    two["g1"][0, 0], two["g2"][5, 3] = 3.0, 4.0  # groups 0 and 5 hold 3 and 4
    assert float(l1_l2_ratio(family.strength(two))) == pytest.approx(7 / 5)
    one = {"g1": torch.zeros(8, 3), "g2": torch.zeros(8, 8)}
    one["g1"][2, 0], one["g2"][2] = 3.0, 0.5  # the same group on both banks
    assert float(l1_l2_ratio(family.strength(one))) == pytest.approx(1.0)


def test_the_group_penalty_drops_when_the_same_kernels_concentrate_in_fewer_groups():
    """conv2 keeps one kernel per output channel, each of strength |gamma| = 1: on the diagonal (16
    input columns alive) or all in column 0 (one). The kernel term is the same; the group term
    drops by GROUP_WEIGHT * (sqrt(16) - 1)."""
    torch.manual_seed(0)
    model = resnet20_altered()
    sparsity = GaborSparsity(model, SHAPE, "channel")
    penalties, kernel_terms = [], []
    for keep in (torch.eye(16), torch.zeros(16, 16).index_fill_(1, torch.tensor([0]), 1.0)):
        model.conv2.mask.copy_(keep)
        penalties.append(sparsity.penalty().item())
        kernel_terms.append(GaborSparsity(model, SHAPE, "kernel").penalty().item())
        assert sparsity.groups_alive()["conv2 in"] == int(keep.any(dim=0).sum())
    assert kernel_terms[0] == pytest.approx(kernel_terms[1], rel=1e-6)
    assert penalties[0] - penalties[1] == pytest.approx(GROUP_WEIGHT * (4 - 1), rel=1e-5)


def test_gradients_reach_every_gabor_parameter_and_are_finite():
    torch.manual_seed(0)
    model = randomize_norms(resnet20_altered())
    model.conv2.mask[:, 4] = 0  # a dead group: strength exactly 0
    model.conv1.mask[7] = 0
    with torch.no_grad():
        model.bn1.weight[3] = 0  # a channel dead through its BN gain
    sparsity = GaborSparsity(model, SHAPE, "channel")
    with sparsity.track_forward():
        loss = model(torch.randn(4, *SHAPE)).square().mean() + sparsity.penalty()
    loss.backward()
    for bank in (model.conv1, model.conv2):
        for name, p in bank.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_structure_is_validated_where_the_library_receives_it():
    with pytest.raises(GaborPruneError, match=r"unknown `structure` 'channels'; known: channel, kernel"):
        TrainConfig(structure="channels")
    with pytest.raises(GaborPruneError, match=r"unknown `structure` 'group'"):
        GaborSparsity(tiny_models.Chain(), SHAPE, "group")
    assert TrainConfig().structure == "channel"
    assert all(e.train.structure == "kernel" for e in EXPERIMENTS.values())  # the seed paper counts kernels


def test_cli_rejects_an_unknown_structure(tmp_path):
    one_line_error(run("finetune", "resnet20_altered", "--input-shape", "3,16,16", "--data", "fake:64:4", "--num-classes", "4",
                       "--structure", "rows", "-o", tmp_path / "r.pt"), "unknown --structure 'rows'")
    assert not list(tmp_path.iterdir())


def test_channel_structure_kills_more_whole_groups_than_kernel_structure(tmp_path):
    """The same seed, data and strength: the channel pressure leaves fewer groups alive."""
    dead, lines = {}, {}
    for structure in ("kernel", "channel"):
        result = run("finetune", "resnet20_altered", "--input-shape", "3,16,16", "--num-classes", "4", "--data", "fake:640:4",
                     "--epochs", "3", "--batch-size", "32", "--sparsity", "0.5", "--structure", structure, "--device", "cpu",
                     "-o", tmp_path / f"{structure}.pt", "--json", tmp_path / f"{structure}.json")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / f"{structure}.json").read_text())
        assert report["groups_total"] == {"conv1 out": 16, "conv2 in": 16}
        assert report["history"][-1]["groups_alive"] == report["groups_alive"]
        dead[structure] = sum(report["groups_total"][k] - a for k, a in report["groups_alive"].items())
        lines[structure] = result.stdout
    assert dead["channel"] >= dead["kernel"] + 4, dead
    out = lines["channel"]
    assert "groups: conv1 out " in out and "/16, conv2 in " in out  # the per-epoch line
    assert "channel groups (pressed): conv1 out 16, conv2 in 16" in out
    assert "no group: conv2 out (16 channels): tied to output channels of plain convolution 'layer1.0.conv2'" in out
    assert "counted only, --structure kernel" in lines["kernel"]
