"""The channel analysis on ops timm models use (`gaborprune.prune.dataflow`), with tiny stand-ins:

- a BatchNorm2d subclass that only adds element-wise steps after its batch norm (timm's
  BatchNormAct2d: `act(drop(bn(x)))`) is a BatchNorm: its channels go, it keeps its class and
  activation, a dead channel's constant is act(beta), and export folds it keeping the activation;
- any other subclass is one opaque leaf with the reason, and analysing it never updates its
  running statistics;
- the graph is traced in eval mode, the mode the analysis runs it in;
- a parameter reshaped to broadcast (ConvNeXt's layer scale) is opaque, not a crash.
"""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from gaborprune.convert import GaborConv2d
from gaborprune.export.lower import fold_batchnorms_
from gaborprune.prune import PruneSpec, prune_model_, slice_module
from gaborprune.prune.dataflow import norm_steps, trace_graph
from gaborprune.prune.groups import channel_groups
from gaborprune.prune.standins import folded_constant
from helpers import ONLY_DEAD, kill, masked_reference, randomize_norms

SHAPE = (3, 16, 16)


class NormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: the functional batch norm (training flag read at call time), then ReLU."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.5, self.eps)
        return F.relu(x)


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d made by hand: the functional batch norm, then its `drop` and `act` children."""

    def __init__(self, num_features: int, act: nn.Module | None = None):
        super().__init__(num_features)
        self.drop, self.act = nn.Dropout(0.5), act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class RollNorm(nn.BatchNorm2d):
    """A subclass that mixes channels after its batch norm: not a BatchNorm to the analysis."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return torch.roll(x, 1, dims=1)


class Net(nn.Module):
    def __init__(self, scale: bool = False, norm=NormAct):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5) if scale else None
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        y = self.bn3(self.conv3(x))
        if self.gamma is not None:
            y = y * self.gamma.reshape(1, -1, 1, 1)
        return self.fc(F.adaptive_avg_pool2d(torch.relu(y), 1).flatten(1))


class ActNet(nn.Module):
    """Gabor banks behind hand-made BatchNormAct2d's: g1 -> ReLU norm -> zero-padded g2 -> SiLU norm ->
    unpadded 1x1 p (no bias) -> ReLU norm -> pooled linear head."""

    def __init__(self):
        super().__init__()
        self.g1, self.bn1 = GaborConv2d(3, 8, 3, 1, 1, bias=False), BNAct(8)
        self.g2, self.bn2 = GaborConv2d(8, 8, 3, 1, 1, bias=False), BNAct(8, nn.SiLU())
        self.p, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), BNAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn2(self.g2(self.bn1(self.g1(x))))
        return self.fc(self.bn3(self.p(x)).mean((2, 3)))


def reasons(model) -> list[str]:
    return channel_groups(model, SHAPE, "all").reasons()


def inputs(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2


# -- which subclasses are BatchNorms -----------------------------------------------------------------
def test_norm_steps_know_element_wise_subclasses_and_say_why_not_the_others():
    bn = BNAct(4, nn.SiLU())
    steps = norm_steps(bn)
    assert steps == (bn.drop, bn.act)  # the children themselves, in order
    (relu,) = norm_steps(NormAct(4))  # a function step
    assert torch.equal(relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert norm_steps(nn.BatchNorm2d(4)) == ()
    assert "'roll'" in norm_steps(RollNorm(4))
    assert "not know as element-wise" in norm_steps(BNAct(4, nn.PReLU(4)))  # a per-channel PReLU
    assert "not know as element-wise" in norm_steps(BNAct(4, nn.Conv2d(4, 4, 1)))

    class Batch(nn.BatchNorm2d):  # batch statistics in eval mode: a shift folded into the running mean would not reach it
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)

    assert "its own statistics" in norm_steps(Batch(4))

    class Super(nn.BatchNorm2d):  # nn.BatchNorm2d.forward checks the input's rank in Python: fx cannot trace it
        def forward(self, x):
            return torch.relu(super().forward(x))

    assert "cannot be traced" in norm_steps(Super(4))
    assert norm_steps(bn) == steps  # decided once per class and settings


def test_a_subclass_that_mixes_channels_is_one_opaque_leaf_and_analysis_leaves_its_statistics():
    model = randomize_norms(Net(norm=RollNorm)).train()
    stats = model.bn1.running_mean.clone(), model.bn1.running_var.clone()
    assert any("'bn1', a RollNorm" in r and "'roll'" in r for r in reasons(model))
    before = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=0.5))
    torch.testing.assert_close(model.bn1.running_mean, stats[0], rtol=0, atol=0)
    torch.testing.assert_close(model.bn1.running_var, stats[1], rtol=0, atol=0)
    assert isinstance(model.bn1, RollNorm) and model.conv1.out_channels == 8  # its channels stay, whole
    assert model.conv2.out_channels < 8 or model.conv3.out_channels < 8  # plain BatchNorms' channels still go
    assert report.max_abs_diff < 1e-4
    assert model.training and before.training


@pytest.mark.parametrize("norm", [NormAct, BNAct])
def test_an_element_wise_subclass_prunes_like_a_batchnorm_and_keeps_its_class(norm):
    model = randomize_norms(Net(norm=norm)).eval()
    original = copy.deepcopy(model)
    assert not any("'bn1'" in r for r in reasons(model))
    report = prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=0.5))
    assert model.conv1.out_channels < 8 and type(model.bn1) is norm and model.bn1.num_features == model.conv1.out_channels
    assert model.bn1.running_mean.shape == model.bn1.weight.shape == (model.conv1.out_channels,)
    assert report.max_abs_diff < 1e-4
    with torch.no_grad():  # the independent oracle: the plan's folds added, removed columns zeroed, no surgery
        ref = copy.deepcopy(original)
        for f in report.plan.folds:
            getattr(ref.get_submodule(f["module"]), f["attr"]).add_(torch.tensor(f["delta"]))
        for name, sides in report.plan.channels.items():
            m = ref.get_submodule(name)
            if sides.get("in") and isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[:, sides["in"]] = 0
        x = inputs()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


# -- dead channels whose constant goes through the activation ----------------------------------------
def test_dead_channels_behind_a_norm_act_go_exactly_with_their_activated_constants():
    torch.manual_seed(0)
    model = randomize_norms(ActNet()).eval()
    kill(model.bn1, [0, 1], -1.0)  # relu(-1) = 0 reaches zero-padded g2: removable
    kill(model.bn1, [2], 0.5)  # relu(0.5) = 0.5 into zero-padded g2: uneven at its borders, kept
    kill(model.bn2, [0], 0.5)  # silu(0.5) into unpadded p: folds into bn3's running mean (p has no bias)
    kill(model.bn2, [1], -1.0)  # silu(-1) = -0.27, not 0: folds too
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, ONLY_DEAD)

    assert (model.g1.out_channels, model.bn1.num_features, model.g2.in_channels) == (6, 6, 6)
    assert (model.g2.out_channels, model.bn2.num_features, model.p.in_channels) == (6, 6, 6)
    assert isinstance(model.bn1, BNAct) and isinstance(model.bn1.act, nn.ReLU) and isinstance(model.bn2.act, nn.SiLU)
    assert {(k.layer, k.channel) for k in report.kept} == {("g1", 2)}
    assert "zero-padded convolution" in report.kept[0].reason
    assert {(f["module"], f["attr"]) for f in report.plan.folds} == {("bn3", "running_mean")}
    silu = F.silu(torch.tensor([0.5, -1.0], dtype=torch.float64))  # the constants the removed channels held
    expected = -(original.p.weight.detach().double()[:, :2, 0, 0] @ silu)
    torch.testing.assert_close(sum(torch.tensor(f["delta"], dtype=torch.float64) for f in report.plan.folds), expected)
    x = inputs()
    with torch.no_grad():  # the oracle: the unpruned model with the plan's kernels masked
        torch.testing.assert_close(model(x), masked_reference(original, report.plan).eval()(x), rtol=0, atol=1e-5)
    assert report.max_abs_diff <= 1e-5


class Branchy(nn.Module):
    """A residual stream with one weak branch whose last convolution feeds a ReLU norm-act."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 4, 3, padding=1, bias=False), BNAct(4)
        self.c2, self.bn2 = nn.Conv2d(4, 8, 1, bias=False), BNAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + self.bn2(self.c2(self.bn1(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_branch_removed_whole_becomes_the_activated_constant_of_its_norm_act():
    model = randomize_norms(Branchy(), seed=3).eval()
    with torch.no_grad():
        model.bn1.weight.mul_(1e-3)  # the weakest channels: the branch's inside goes whole
    original = copy.deepcopy(model)
    report = prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=4 / 12))
    assert report.plan.constants == {"c2": "bn2"}
    assert isinstance(model.bn2, nn.Identity) and model.c2.out_channels == 8 and model.c2.in_channels == 0
    value = model.c2.value.detach().flatten()
    assert (value == 0).any() and (value > 0).any()  # relu(bn2(0)): the activation is in the constant
    with torch.no_grad():  # the oracle: the plan's folds added and c2's columns zeroed, no surgery
        ref = copy.deepcopy(original)
        for f in report.plan.folds:
            getattr(ref.get_submodule(f["module"]), f["attr"]).add_(torch.tensor(f["delta"]))
        ref.c2.weight.zero_()
        x = inputs()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
    assert report.max_abs_diff <= 1e-5


# -- the pieces: slicing, the constant of a convolution without inputs, export's fold ----------------
def test_slice_module_keeps_the_subclass_its_activation_and_its_channels():
    norm = randomize_norms(BNAct(6, nn.SiLU())).eval()
    norm.weight.requires_grad_(False)
    cut = slice_module(norm, out=[1, 4])
    assert type(cut) is BNAct and cut.num_features == 4 and isinstance(cut.act, nn.SiLU) and cut.act is not norm.act
    assert not cut.weight.requires_grad and cut.bias.requires_grad and not cut.training
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(cut(x[:, [0, 2, 3, 5]]), norm(x)[:, [0, 2, 3, 5]])
    plain = slice_module(nn.BatchNorm2d(6), out=[0])
    assert type(plain) is nn.BatchNorm2d and plain.num_features == 5


def test_a_constant_through_a_norm_act_is_the_activation_of_the_norm():
    conv = nn.Conv2d(4, 3, 1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.3, -0.2, 1.0]))
    norm = randomize_norms(BNAct(3)).train()  # its mode does not matter: the constant is what eval computes
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([-2.0, 0.4, 0.1]))
    bn = (conv.bias - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(folded_constant(conv, norm), torch.relu(bn).detach())
    assert folded_constant(conv, norm)[0] == 0 and norm.training and norm.drop.training
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict({k: v for k, v in norm.state_dict().items()})
    torch.testing.assert_close(folded_constant(conv, plain), bn.detach())  # a plain BatchNorm: no activation


def test_export_folds_a_norm_act_into_its_convolution_keeping_the_activation():
    model = randomize_norms(Net(norm=BNAct)).eval()
    x = inputs()
    with torch.no_grad():
        want = model(x)
    folded = fold_batchnorms_(model)
    assert {"bn1", "bn2", "bn3"} <= set(folded)
    assert isinstance(model.bn1, nn.Sequential) and [type(m) for m in model.bn1] == [nn.Dropout, nn.ReLU]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    functional = randomize_norms(Net(norm=NormAct)).eval()
    assert "bn1" not in fold_batchnorms_(functional) and isinstance(functional.bn1, NormAct)  # a function step: kept whole


# -- tracing ----------------------------------------------------------------------------------------
def test_the_graph_is_traced_in_eval_mode_and_the_mode_restored():
    model = randomize_norms(Net()).train()
    graph = trace_graph(model)
    assert model.training
    assert not any(n.op == "call_function" and n.target is F.batch_norm for n in graph.nodes)  # the leaf is called, not inlined
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(fx.GraphModule(model, graph).eval()(x), copy.deepcopy(model).eval()(x))


def test_a_reshaped_parameter_is_opaque_and_the_rest_still_prunes():
    model = randomize_norms(Net(scale=True)).eval()
    assert any("a reshaped parameter" in r for r in reasons(model))
    x = torch.randn(2, *SHAPE)
    report = prune_model_(model, SHAPE, PruneSpec(scope="all", ratio=0.5))
    assert model.conv3.out_channels == 8  # tied to the layer scale: kept
    assert report.max_abs_diff < 1e-4 and model(x).shape == (2, 4)
