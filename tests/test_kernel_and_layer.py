"""GaborConv2d and the kernel function against oracles: a float64 closed form, F.conv2d with the
materialised kernel, gradcheck, and plain-conv parity."""

import math

import pytest
import torch
from torch import nn

from gaborprune.convert import GABOR_PARAMS, GaborConv2d, gabor_kernel


def closed_form(A, theta, sigma, lam, psi, gamma, kh, kw):
    """The formula, one tap at a time, in Python floats (float64)."""
    out = torch.empty(kh, kw, dtype=torch.float64)
    for r in range(kh):
        for c in range(kw):
            x, y = c - (kw - 1) / 2, r - (kh - 1) / 2
            xr = x * math.cos(theta) + y * math.sin(theta)
            yr = -x * math.sin(theta) + y * math.cos(theta)
            out[r, c] = A * math.exp(-(xr**2 + gamma**2 * yr**2) / (2 * sigma**2)) * math.cos(2 * math.pi * xr / lam + psi)
    return out


@pytest.mark.parametrize("size", [(3, 3), (5, 7), (1, 1), (4, 6)])
def test_kernel_matches_closed_form(size):
    g = torch.Generator().manual_seed(0)
    n = 5
    A = torch.randn(n, generator=g, dtype=torch.float64)
    theta = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    sigma = 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * 2
    lam = 2 + torch.rand(n, generator=g, dtype=torch.float64) * 5
    psi = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi
    gamma = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    got = gabor_kernel(A, theta, sigma, lam, psi, gamma, size)
    assert got.shape == (n, *size)
    for i in range(n):
        want = closed_form(*(float(t[i]) for t in (A, theta, sigma, lam, psi, gamma)), *size)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_kernel_orientation_convention():
    # theta = 0, psi = 0: the carrier varies along x (columns) only when the envelope is isotropic
    k = gabor_kernel(*(torch.tensor([v], dtype=torch.float64) for v in (1.0, 0.0, 100.0, 4.0, 0.0, 1.0)), (5, 5))[0]
    torch.testing.assert_close(k[0], k[4])  # rows identical: no variation along y
    assert k[2, 2] == pytest.approx(1.0) and k[2, 0] == pytest.approx(math.cos(math.pi), abs=1e-3)


LAYER_CASES = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=2, padding=(1, 2), bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=3, padding="valid", groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", padding_mode="circular"),
]


@pytest.mark.parametrize("kwargs", LAYER_CASES)
def test_layer_matches_conv_of_materialised_kernel_and_to_conv2d(kwargs):
    torch.manual_seed(0)
    layer = GaborConv2d(**kwargs, dtype=torch.float64)
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    x = torch.randn(2, kwargs["in_channels"], 11, 13, dtype=torch.float64)
    reference = nn.Conv2d(**kwargs, dtype=torch.float64)  # the plain conv with the same hyper-parameters
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        if layer.bias is not None:
            reference.bias.copy_(layer.bias)
    want = reference(x)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.to_conv2d()(x), want, rtol=1e-10, atol=1e-10)
    assert layer.weight.shape == (kwargs["out_channels"], kwargs["in_channels"] // kwargs.get("groups", 1), *reference.kernel_size)


def test_mask_makes_exact_zeros_and_counts():
    layer = GaborConv2d(3, 4, 3, padding=1)
    layer.mask[1, 2] = 0
    layer.mask[3] = 0
    w = layer.weight
    assert torch.all(w[1, 2] == 0) and torch.all(w[3] == 0)
    assert torch.count_nonzero(w.flatten(2).abs().amax(2)) == 12 - 1 - 3 == layer.kernels_alive


def test_gradcheck_all_parameters():
    torch.manual_seed(0)
    layer = GaborConv2d(2, 3, 3, padding=1, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    # gradcheck through the module: pass parameters as inputs by functional_call
    names = [n for n, _ in layer.named_parameters()]

    def g(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(g, (x, *[p.detach().clone().requires_grad_() for p in layer.parameters()]))


def test_every_learnable_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    layer = GaborConv2d(3, 8, 5, padding=2)
    layer(torch.randn(4, 3, 16, 16)).square().mean().backward()
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"amplitude", "theta", "log_sigma", "log_wavelength", "psi", "log_gamma", "bias"}
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_frozen_parameters_get_no_gradient_and_positive_params_stay_positive():
    layer = GaborConv2d(3, 4, 3, freeze=("theta", "wavelength"))
    assert not layer.theta.requires_grad and not layer.log_wavelength.requires_grad
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=100.0)
    for _ in range(3):  # absurd steps: exp keeps sigma, wavelength, gamma positive
        opt.zero_grad()
        layer(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
    p = layer.gabor_params()
    assert (p.sigma > 0).all() and (p.wavelength > 0).all() and (p.gamma > 0).all()
    assert torch.isfinite(layer.weight).all()
    with pytest.raises(ValueError, match="cannot freeze"):
        GaborConv2d(3, 4, 3, freeze=("lambda",))


def test_state_dict_round_trip():
    a = GaborConv2d(3, 6, 5, padding=2)
    a.mask[0, 1] = 0
    b = GaborConv2d(3, 6, 5, padding=2)
    state = a.state_dict()
    assert "grid" not in state and set(state) == {"amplitude", "theta", "log_sigma", "log_wavelength", "psi", "log_gamma", "bias", "mask"}
    b.load_state_dict(state)
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_device_dtype_and_module_to():
    layer = GaborConv2d(3, 4, 3, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.grid.dtype == torch.float64
    layer = layer.float()
    assert layer(torch.randn(1, 3, 6, 6)).dtype == torch.float32


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=0), dict(kernel_size=3, padding="same"), dict(kernel_size=1),
                                    dict(kernel_size=3, padding="valid", stride=2)])
def test_from_conv2d_enlarged_kernel_keeps_output_shape(kwargs):
    conv = nn.Conv2d(3, 4, **kwargs)
    layer, target = GaborConv2d.from_conv2d(conv, kernel_size=kwargs["kernel_size"] + 4, fit_steps=5)
    x = torch.randn(1, 3, 12, 12)
    assert layer(x).shape == conv(x).shape
    # the fit target is the original kernel zero-padded into the larger grid: same conv output
    plain = nn.Conv2d(3, 4, layer.kernel_size, conv.stride, layer.padding, bias=True)
    with torch.no_grad():
        plain.weight.copy_(target)
        plain.bias.copy_(conv.bias)
    torch.testing.assert_close(plain(x), conv(x), rtol=1e-5, atol=1e-5)


def test_from_conv2d_refuses_shrinking_or_odd_growth():
    conv = nn.Conv2d(3, 4, 5)
    with pytest.raises(ValueError, match="smaller than the original"):
        GaborConv2d.from_conv2d(conv, kernel_size=3)
    with pytest.raises(ValueError, match="even number"):
        GaborConv2d.from_conv2d(conv, kernel_size=6)


def test_gabor_params_listed():
    assert GABOR_PARAMS == ("amplitude", "theta", "sigma", "wavelength", "psi", "gamma")
