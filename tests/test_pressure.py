"""`gp.Pressure`, the sparsity pressure for any training loop: its value against the penalty and a
float64 closed form, BatchNorm-scale invariance, finite gradients, a plain loop it sparsifies, a
detector pressed in its backbone, and its errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaborprune as gp
from gaborprune.convert import GaborConv2d
from gaborprune.errors import GaborPruneError, InputShapeError, PruneError, TrainingError
from gaborprune.sparsity import GROUP_WEIGHT, GaborSparsity
from gaborprune.train.pressure import PressureReport
from tiny_models import Residual, gabor_net

SHAPE = (3, 8, 8)


class ConvBN(nn.Module):
    """One convolution (a Gabor bank or a plain conv) + BN + a linear head: a penalty computable by hand."""

    def __init__(self, gabor=True):
        super().__init__()
        self.conv = GaborConv2d(3, 4, 5, padding=2, bias=False) if gabor else nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class Wrapper(nn.Module):
    """A model whose network sits one module down, for `module=`."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def conv_bn(gabor=True, seed=0):
    torch.manual_seed(seed)
    model = ConvBN(gabor).double()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.5, -0.3, 0.7, 0.05], dtype=torch.float64))  # a negative gain counts by |gamma|
    return model


def ratio(v):
    return v.abs().sum() / v.norm()


# -- (1) the value: the penalty, and a closed form --------------------------------------------------
@pytest.mark.parametrize("structure,scope", [("kernel", "banks"), ("channel", "banks"), ("channel", "all")])
def test_value_is_strength_times_the_penalty_and_the_closed_form(structure, scope):
    model = conv_bn()
    pressure = gp.Pressure(model, torch.randn(2, *SHAPE, dtype=torch.float64), structure, scope, strength=0.3)
    value = pressure()
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(0.3 * GaborSparsity(model, SHAPE, structure, scope).penalty().item(), rel=1e-12)
    # by hand: s[o, i] = |gamma_o| ||g[o, i]|| / ||g[o, :]||; the out groups' G[o] = |gamma_o| (equal MACs: weights 1)
    with torch.no_grad():
        norms = model.conv.weight.flatten(2).norm(dim=2)  # [4, 3]
        gains = model.bn.weight.abs()
        s = gains[:, None] * norms / norms.norm(dim=1, keepdim=True)
        expected = ratio(s.flatten()) + (GROUP_WEIGHT * ratio(gains) if structure == "channel" else 0)
    assert value.item() == pytest.approx(0.3 * float(expected), rel=1e-12)


def test_plain_convolution_closed_form_with_scope_all():
    model = conv_bn(gabor=False)
    value = gp.Pressure(model, SHAPE, strength=2.0)().item()  # the defaults: channel, all
    assert value == pytest.approx(2.0 * GROUP_WEIGHT * (1.5 + 0.3 + 0.7 + 0.05) / math.hypot(1.5, 0.3, 0.7, 0.05), rel=1e-12)


def test_strength_zero_is_an_exact_zero_that_adds_to_a_loss():
    model = conv_bn()
    pressure = gp.Pressure(model, SHAPE, strength=0)
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    zero = pressure()
    assert zero.item() == 0.0 and zero.dtype == torch.float64 and zero.device == x.device
    loss = model(x).square().mean()
    (loss + pressure()).backward()
    with_zero = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(with_zero, model.parameters()))
    pressure.strength = 0.5  # a warm-up may raise it later
    assert pressure().item() > 0


def test_tracking_reuses_the_forward_kernels_with_the_same_value_and_gradients():
    model = gabor_net().double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    pressure = gp.Pressure(model, x, strength=0.1)
    model(x).sum().mul(0).add(pressure()).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with pressure.tracking():
        out = model(x)
        kept = model[0]._last_weight
        value = pressure()
        assert kept is not None and model[0]._last_weight is None  # the penalty took the forward's kernels
    out.sum().mul(0).add(value).backward()
    assert plain.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-12, atol=1e-15, msg=n)


# -- (2) BatchNorm-scale invariance ------------------------------------------------------------------
def test_scaling_a_channel_under_batchnorm_leaves_the_pressure_unchanged():
    torch.manual_seed(0)
    model = gabor_net().double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-30  # so that the train-mode function is scale invariant to float64 precision
            nn.init.uniform_(m.weight, 0.5, 1.5)
    pressure = gp.Pressure(model, (3, 16, 16), "channel", "all", strength=1.0)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    before_out, before = model(x), pressure().item()
    with torch.no_grad():
        model[0].amplitude[2] *= 10.0  # every kernel of the bank's output channel 2
        model[0].amplitude[5] *= 0.01
        model[3].weight[7] *= 25.0  # every kernel of the plain conv's output channel 7
    torch.testing.assert_close(model(x), before_out, rtol=1e-9, atol=1e-9)  # BatchNorm divides it out: the same function
    assert pressure().item() == pytest.approx(before, rel=1e-12)
    with torch.no_grad():
        model[1].weight[2] *= 0.1  # the BN gain is the channel's real strength: the pressure sees it
    assert abs(pressure().item() - before) > 1e-3


# -- (3) gradients ----------------------------------------------------------------------------------
def test_every_parameter_the_pressure_reads_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = gabor_net()
    with torch.no_grad():
        model[1].weight[3] = 0.0  # a dead channel (|gamma| = 0) ...
        model[0].mask[5, 1] = 0  # ... and a removed kernel, where ratios and norms reach their edges
    pressure = gp.Pressure(model, (3, 16, 16), "channel", "all", strength=0.1)
    pressure().backward()
    read = {"0.amplitude", "0.theta", "0.log_sigma", "0.log_wavelength", "0.psi", "0.log_gamma", "1.weight", "3.weight", "4.weight"}
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == read  # not the BN shifts nor the head: the pressure does not read them
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    for n in read - {"1.weight"}:
        assert dict(model.named_parameters())[n].grad.abs().sum() > 0, n


# -- (4) a plain PyTorch loop -----------------------------------------------------------------------
def small_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def train_plain_loop(strength, steps=30):
    torch.manual_seed(0)
    model = small_net()
    x, y = torch.randn(32, *SHAPE), torch.randint(0, 4, (32,))
    pressure = gp.Pressure(model, x, strength=strength)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        with pressure.tracking():
            loss = F.cross_entropy(model(x), y) + pressure()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pressure.report()


def test_a_plain_loop_with_the_pressure_kills_channel_groups():
    free, pressed = train_plain_loop(0.0), train_plain_loop(1.0)
    assert free.groups_total == pressed.groups_total == {"0 out": 16, "3 out": 16, "3 in": 16}
    assert free.groups == (48, 48)
    assert pressed.groups[0] <= 36, pressed.groups_alive  # measured: 25 of 48
    assert all(pressed.groups_alive[k] < 16 for k in pressed.groups_total)


# -- the report ---------------------------------------------------------------------------------------
def test_report_renders_and_logs_plain_numbers():
    report = PressureReport({"a": 500, "b": 400}, {"a": 600, "b": 600}, {"x out": 100, "y in": 20}, {"x out": 200, "y in": 100})
    assert str(report) == "groups alive 120/300 (40%), kernels alive 900/1200"
    assert str(PressureReport(groups_alive={"x out": 3}, groups_total={"x out": 4})) == "groups alive 3/4 (75%), no Gabor banks"
    logged = report.to_dict()
    assert logged == {"groups_alive": 120, "groups_total": 300, "groups_alive_fraction": 0.4, "kernels_alive": 900, "kernels_total": 1200}
    detailed = report.to_dict(per_label=True)
    assert detailed["groups_alive/y in"] == 20 and detailed["kernels_alive/b"] == 400
    assert all(type(v) in (int, float) for v in detailed.values())
    json.dumps(detailed)


def test_report_names_are_the_whole_models_with_module():
    torch.manual_seed(0)
    inner = Residual()
    whole = gp.Pressure(inner, (3, 16, 16), "channel", "banks", strength=0.1)
    wrapped = gp.Pressure(Wrapper(inner), (3, 16, 16), "channel", "banks", strength=0.1, module="net")
    assert wrapped.part.name == "net" and wrapped.part.input_shape == (3, 16, 16)
    assert wrapped().item() == pytest.approx(whole().item(), rel=1e-6)
    a, b = whole.report(), wrapped.report()
    assert "g1+g2 out" in a.groups_total  # the residual ties the banks' rows
    assert b.groups_total == {f"{'+'.join('net.' + n for n in k.split(' ')[0].split('+'))} {k.split(' ')[1]}": v
                              for k, v in a.groups_total.items()}
    assert "net.g1+net.g2 out" in b.groups_total and b.kernels_total == {"net.g1": 24, "net.g2": 64}


# -- (5) a detector, pressed in its backbone ----------------------------------------------------------
def test_a_detector_is_pressed_in_its_backbone_and_trains():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    images = torch.rand(2, 3, 128, 128)
    pressure = gp.Pressure(model, images, strength=0.01)
    assert pressure.part.name == "backbone" and pressure.part.input_shape == (3, 320, 320)  # SSD resizes to 320
    value = pressure()
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(0.01 * GaborSparsity(model.backbone, (3, 320, 320), "channel", "all").penalty().item(), rel=1e-5)
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 100.0, 120.0], [30.0, 40.0, 70.0, 80.0]]), "labels": torch.tensor([2, 3])}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.backbone.features[0][0][1].weight.detach().clone()  # the stem's BatchNorm gains
    loss = sum(model(list(images), targets).values()) + pressure()
    optimizer.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(before, model.backbone.features[0][0][1].weight)
    report = pressure.report()
    assert report.groups_total and not report.kernels_total  # no Gabor banks yet
    assert all(label.startswith("backbone.") for label in report.groups_total)
    assert all(name.startswith("backbone.") for label in report.groups_total for name in label.split(" ")[0].split("+"))


# -- (6) errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength,match", [
    (-0.1, r"`strength` must be >= 0 \(0 disables the pressure\), not -0.1"),
    (math.nan, "`strength` must be a finite number, not nan"),
    (math.inf, "`strength` must be a finite number, not inf"),
    ("0.1", "`strength` must be a finite number, not '0.1'"),
    (True, "`strength` must be a finite number, not True"),
])
def test_bad_strength(strength, match):
    with pytest.raises(TrainingError, match=match):
        gp.Pressure(conv_bn(), SHAPE, strength=strength)
    pressure = gp.Pressure(conv_bn(), SHAPE)
    with pytest.raises(TrainingError, match=match):
        pressure.strength = strength


@pytest.mark.parametrize("kwargs,match", [
    ({"structure": "rows"}, "unknown `structure` 'rows'; known: channel, kernel"),
    ({"scope": "everything"}, "unknown `scope` 'everything'; known: banks, all"),
    ({"structure": "kernel"}, "`scope` all presses channel groups of every convolution, which `structure` kernel does not press"),
])
def test_bad_structure_or_scope(kwargs, match):
    with pytest.raises(GaborPruneError, match=match):
        gp.Pressure(conv_bn(), SHAPE, **kwargs)


def test_nothing_to_press():
    with pytest.raises(TrainingError, match=r"the whole model has no Gabor banks to press with `scope` banks; "
                                             r"convert some layers first \(`gp.gaborize_`\) or use `scope` 'all'"):
        gp.Pressure(conv_bn(gabor=False), SHAPE, scope="banks")
    gp.Pressure(conv_bn(gabor=False), SHAPE, scope="all")  # ... which presses plain convolutions


@pytest.mark.parametrize("example,match", [
    (torch.randn(3, 8, 8), r"got a Tensor of shape \[3, 8, 8\]"),
    ((3, 8), r"got \(3, 8\)"),
    ((3, 0, 8), r"got \(3, 0, 8\)"),
    ("3x8x8", "got a str"),
])
def test_bad_example_input(example, match):
    with pytest.raises(InputShapeError, match=r"`example_input` must be a Tensor\[N, C, H, W\] the model takes, or its shape \(C, H, W\); " + match):
        gp.Pressure(conv_bn(), example)


def test_bad_module():
    with pytest.raises(PruneError, match="the model has no module 'body'; its top-level modules: net"):
        gp.Pressure(Wrapper(conv_bn()), SHAPE, module="body")
