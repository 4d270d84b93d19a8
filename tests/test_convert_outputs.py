"""Conversion fitted to layer outputs (`convert --data`) and BatchNorm recalibration, against oracles."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gaborprune.convert import ConversionSpec, gaborize_
from gaborprune.norms import recalibrate_norms_


class Stem(nn.Module):
    """Two convolutions with BatchNorm, one grouped and with reflect padding at a larger kernel."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, groups=2, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def trained_stem() -> nn.Module:
    """Smooth, correlated kernels a Gabor function cannot match exactly, and BatchNorm statistics of real inputs."""
    torch.manual_seed(0)
    model = Stem()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            conv.weight.add_(0.3 * torch.randn(conv.weight.shape[:2])[..., None, None])  # a strong kernel mean
    recalibrate_norms_(model, calibration())
    return model.eval()


def calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.randn(64, 3, 18, 18, generator=g), 3, 1)  # [64, 3, 16, 16], correlated neighbours
    return list((smooth + 0.5).split(16))


def direct_output_error(original, converted, name, batches) -> float:
    """The oracle: ||conv_g(x') - conv_w(x)|| / ||conv_w(x)|| by running both networks, in float64."""
    ins = {}
    for key, model in (("orig", original), ("conv", converted)):
        hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a, key=key: ins.setdefault(key, []).append(a[0].double()))
        with torch.no_grad():
            for x in batches:
                model.eval()(x)
        hook.remove()
    w_layer = copy.deepcopy(original.get_submodule(name)).double()
    g_layer = copy.deepcopy(converted.get_submodule(name)).double()
    with torch.no_grad():
        want = torch.cat([w_layer(x) for x in ins["orig"]])
        got = torch.cat([g_layer(x) for x in ins["conv"]])
        if w_layer.bias is not None:  # the error the fit weighs is that of the kernels; both layers share the bias
            want, got = want - w_layer.bias[:, None, None], got - g_layer.bias[:, None, None]
    return float((got - want).norm() / want.norm())


def test_the_output_fit_lowers_the_output_error_and_reports_it_exactly():
    original = trained_stem()
    weight_fit, output_fit = copy.deepcopy(original), copy.deepcopy(original)
    spec = ConversionSpec(first=2, fit_steps=60)
    gaborize_(weight_fit, spec, (3, 16, 16))
    report = gaborize_(output_fit, spec, (3, 16, 16), calibration=calibration())
    for layer in report.layers:  # the reported errors are the direct ones, measured on the calibration images
        assert abs(layer.output_error - direct_output_error(original, output_fit, layer.name, calibration())) < 1e-4
        assert layer.output_error < 0.9 * layer.weight_fit_output_error
    # the weight fit's own error, measured the same way on conv1 (its inputs are the image in both networks)
    assert abs(report.layers[0].weight_fit_output_error - direct_output_error(original, weight_fit, "conv1", calibration())) < 1e-4
    # on held-out images the fitted network is closer to the original than the weight fit, logits included
    held_out = torch.cat(calibration(seed=7))
    with torch.no_grad():
        want = original(held_out)
        assert (output_fit.eval()(held_out) - want).norm() < (weight_fit.eval()(held_out) - want).norm()


def test_a_frozen_amplitude_keeps_the_weight_fit():
    model = trained_stem()
    report = gaborize_(model, ConversionSpec(first=1, freeze=("amplitude",), fit_steps=10), (3, 16, 16), calibration=calibration())
    assert report.layers[0].output_error == report.layers[0].weight_fit_output_error


def test_recalibration_changes_only_batchnorm_statistics_and_averages_the_batches():
    model = trained_stem()
    with torch.no_grad():
        model.bn1.running_mean.fill_(5.0)
    before = copy.deepcopy(model.state_dict())
    inputs = []
    hook = model.bn1.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    seen = recalibrate_norms_(model, calibration(seed=3))
    hook.remove()
    assert seen == 64 and not model.training  # the mode is restored
    after = model.state_dict()
    stats = {f"{bn}.{s}" for bn in ("bn1", "bn2") for s in ("running_mean", "running_var")}
    for key, value in before.items():
        assert torch.equal(value, after[key]) == (key not in stats), key  # num_batches_tracked counts the 4 batches again
    # the oracle: equal batches, so the cumulative average is the mean of per-batch means and unbiased variances
    means = torch.stack([x.mean((0, 2, 3)) for x in inputs])
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in inputs])
    torch.testing.assert_close(model.bn1.running_mean, means.mean(0))
    torch.testing.assert_close(model.bn1.running_var, variances.mean(0))
    assert model.bn1.momentum == 0.1  # restored


def test_recalibration_without_batches_keeps_the_statistics():
    model = trained_stem()
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_norms_(model, [torch.zeros(1, 3, 16, 16)]) == 0  # a batch of one cannot give statistics
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
