"""The least-squares fit: it recovers exact Gabor kernels and is never worse than the zero kernel."""

import torch

from gaborprune.convert.fit import fit_gabor, random_gabor


def test_fit_recovers_gabor_kernels_of_several_sizes():
    for k in (3, 5, 7, 11):
        g = torch.Generator().manual_seed(k)
        truth = random_gabor((32, 3), (k, k), fan_in=27, generator=g)
        target = truth.kernel((k, k))
        params, err = fit_gabor(target)
        assert err.shape == (32, 3)
        assert err.median() < 1e-3, (k, err.median())
        assert (err < 0.1).float().mean() > 0.95, (k, err.max())
        # the reported error is the real one
        real = (params.kernel((k, k)) - target).flatten(2).norm(dim=2) / target.flatten(2).norm(dim=2)
        torch.testing.assert_close(real, err, rtol=1e-6, atol=1e-9)


def test_fit_of_noise_is_no_worse_than_zero_and_scale_equivariant():
    w = torch.randn(200, 3, 3, generator=torch.Generator().manual_seed(0))
    p, err = fit_gabor(w)
    assert (err <= 1.0 + 1e-9).all() and err.median() < 0.8
    p10, err10 = fit_gabor(10 * w)
    torch.testing.assert_close(err10, err, rtol=0, atol=2e-3)  # same basins; Adam noise only
    assert torch.corrcoef(torch.stack([p10.amplitude.abs(), p.amplitude.abs()]))[0, 1] > 0.99


def test_fit_handles_zero_and_pointwise_kernels():
    w = torch.zeros(4, 3, 3)
    w[0] = torch.randn(3, 3)
    p, err = fit_gabor(w)
    assert torch.all(p.amplitude[1:] == 0) and torch.all(err[1:] == 0)
    point = torch.randn(6, 1, 1)
    p, err = fit_gabor(point)
    assert err.max() < 1e-5  # a 1x1 Gabor is A cos(psi): any value is exact
    assert torch.isfinite(p.theta).all() and torch.isfinite(p.sigma).all()


def test_random_bank_is_spread_and_scaled():
    p = random_gabor((64, 16), (3, 3), fan_in=16 * 9, generator=torch.Generator().manual_seed(1))
    theta = p.theta.flatten()
    assert theta.min() >= 0 and theta.max() < torch.pi
    hist = torch.histc(theta, bins=8, min=0, max=torch.pi)
    assert hist.min() > 0.8 * hist.mean()  # stratified orientations fill every bin
    norms = p.kernel((3, 3)).flatten(2).norm(dim=2)
    expected = (2 / (16 * 9)) ** 0.5 * 3
    torch.testing.assert_close(norms, torch.full_like(norms, expected), rtol=1e-6, atol=0)
