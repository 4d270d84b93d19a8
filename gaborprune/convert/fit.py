"""Initial Gabor parameters for a bank: least-squares fits of trained kernels, or a random spread.

The fit uses variable projection. For fixed orientation, envelope width, wavelength and aspect
ratio, a Gabor kernel is linear in (a, b) = (A cos psi, -A sin psi):

    g = a * env * cos(phase) + b * env * sin(phase)

so amplitude and phase have a closed-form least-squares solution (a 2x2 system per kernel). What is
left to search is four nonlinear parameters: a grid of starts over orientation, wavelength and width
picks the best basin for each kernel, then Adam refines all kernels of a layer at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gaborprune.convert.kernel import gabor_envelope_phase, gabor_kernel, kernel_grid


@dataclass(frozen=True)
class GaborParams:
    """Natural (unconstrained-free) Gabor parameters, each Tensor[*S]."""

    amplitude: Tensor
    theta: Tensor
    sigma: Tensor
    wavelength: Tensor
    psi: Tensor
    gamma: Tensor

    def kernel(self, size: tuple[int, int]) -> Tensor:
        """Tensor[*S, kh, kw]."""
        return gabor_kernel(
            self.amplitude, self.theta, self.sigma, self.wavelength, self.psi, self.gamma, size
        )

    def reshape(self, *shape: int) -> GaborParams:
        return GaborParams(*(getattr(self, f).reshape(shape) for f in self.__dataclass_fields__))


def _start_grid(size: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Starts over orientation x wavelength x envelope width (aspect ratio 1), each Tensor[S]."""
    k = max(size, default=1)
    thetas = torch.arange(8, dtype=dtype) * (math.pi / 8)
    wavelengths = torch.logspace(math.log10(2.0), math.log10(max(2.0 * k, 3.0)), 6, dtype=dtype)
    sigmas = torch.logspace(math.log10(0.5), math.log10(max(0.6 * k, 1.0)), 4, dtype=dtype)
    t, w, s = torch.meshgrid(thetas, wavelengths, sigmas, indexing="ij")
    return t.flatten(), s.flatten(), w.flatten(), torch.ones_like(t.flatten())


def _solve(target: Tensor, c: Tensor, s: Tensor, r0: Tensor, r1: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form least squares of target ~ a c + b s, from the 2x2 normal equations.

    Args:
        target: Tensor[N, K]; c, s: the two basis kernels, Tensor[M, K]; r0, r1: target . c and
            target . s, broadcast to the result shape R ([N] when M == N, [N, M] for shared starts).

    Returns:
        (coefficients Tensor[*R, 2], squared residual Tensor[*R]).
    """
    g00, g01, g11 = (c * c).sum(-1), (c * s).sum(-1), (s * s).sum(-1)
    ridge = 1e-6 * (g00 + g11).clamp_min(1e-12)  # keeps 1x1 and needle-thin kernels solvable
    g00, g11 = g00 + ridge, g11 + ridge
    det = g00 * g11 - g01 * g01
    coef = torch.stack([(g11 * r0 - g01 * r1) / det, (g00 * r1 - g01 * r0) / det], dim=-1)
    residual = (target**2).sum(-1, keepdim=r0.dim() > 1) - coef[..., 0] * r0 - coef[..., 1] * r1
    return coef, residual


def _basis(envelope: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """The cosine and sine Gabor kernels, each Tensor[M, K] (flattened)."""
    envelope, phase = envelope.flatten(-2), phase.flatten(-2)
    return envelope * torch.cos(phase), envelope * torch.sin(phase)


def _project_each(target: Tensor, envelope: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
    """Each kernel against its own basis: target Tensor[N, K], basis from Tensor[N, kh, kw]."""
    c, s = _basis(envelope, phase)
    return _solve(target, c, s, (target * c).sum(-1), (target * s).sum(-1))


def _project_shared(target: Tensor, envelope: Tensor, phase: Tensor) -> Tensor:
    """Every kernel against every start (matrix products, no [N, S, K] tensor): residual Tensor[N, S]."""
    c, s = _basis(envelope, phase)
    return _solve(target, c, s, target @ c.T, target @ s.T)[1]


def fit_gabor(weight: Tensor, *, steps: int = 150, lr: float = 0.05) -> tuple[GaborParams, Tensor]:
    """Fit one Gabor function to each 2-D kernel by least squares.

    Args:
        weight: Tensor[*S, kh, kw], the trained kernels.
        steps: Adam refinement steps after the grid of starts (0 keeps the best start).

    Returns:
        (params with Tensor[*S] fields, relative error ||w - g|| / ||w|| per kernel as Tensor[*S];
        0 for an all-zero kernel).
    """
    shape, size = weight.shape[:-2], tuple(weight.shape[-2:])
    w = weight.detach().to("cpu", torch.float64).reshape(-1, size[0] * size[1])  # [N, K]
    norms = w.norm(dim=1)
    target = w / norms.clamp_min(1e-30)[:, None]
    grid = kernel_grid(size, dtype=torch.float64)

    # Grid of starts: the basis depends on the start only, so all kernels share it.
    starts = _start_grid(size, torch.float64)
    env, phase = gabor_envelope_phase(*starts, grid)  # [S, kh, kw]
    res = _project_shared(target, env, phase)  # [N, S]
    best = res.argmin(dim=1)
    theta, sigma, wavelength, gamma = (s[best].clone() for s in starts)

    raw = [theta, sigma.log(), wavelength.log(), gamma.log()]
    for r in raw:
        r.requires_grad_(True)
    best_raw = [r.detach().clone() for r in raw]
    best_res = torch.full_like(norms, math.inf)
    optimizer = torch.optim.Adam(raw, lr=lr)
    for step in range(steps + 1):
        env, phase = gabor_envelope_phase(raw[0], raw[1].exp(), raw[2].exp(), raw[3].exp(), grid)
        _, res = _project_each(target, env, phase)  # [N]
        with torch.no_grad():
            improved = res < best_res
            best_res = torch.where(improved, res, best_res)
            for b, r in zip(best_raw, raw):
                b[improved] = r[improved]
        if step == steps:
            break
        optimizer.zero_grad()
        res.sum().backward()
        optimizer.step()

    theta, sigma, wavelength, gamma = best_raw[0], *(r.exp() for r in best_raw[1:])
    env, phase = gabor_envelope_phase(theta, sigma, wavelength, gamma, grid)
    coef, _ = _project_each(target, env, phase)
    a, b = coef[:, 0] * norms, coef[:, 1] * norms
    params = GaborParams(torch.hypot(a, b), theta, sigma, wavelength, torch.atan2(-b, a), gamma)
    fitted = params.kernel(size).flatten(1)
    rel_error = (w - fitted).norm(dim=1) / norms.clamp_min(1e-30)
    rel_error = torch.where(norms > 0, rel_error, torch.zeros_like(rel_error))
    return params.reshape(*shape), rel_error.reshape(shape)


def random_gabor(
    shape: tuple[int, ...], size: tuple[int, int], *, fan_in: int, generator: torch.Generator | None = None
) -> GaborParams:
    """A spread bank: orientations stratified over [0, pi), wavelengths and widths spread over the
    kernel's scale, random phase, aspect ratio near 1, amplitudes scaled like Kaiming-normal init
    (each kernel's norm about sqrt(2 / fan_in) * sqrt(kh * kw)).

    Returns:
        params with Tensor[*shape] fields (float64).
    """
    n = math.prod(shape)
    k = max(size)

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    order = torch.randperm(n, generator=generator).to(torch.float64)
    theta = (order + uniform(0, 1)) * (math.pi / n)
    wavelength = torch.exp(uniform(math.log(2.0), math.log(max(2.0 * k, 2.5))))
    sigma = uniform(0.25, 0.6) * max(k, 2)
    psi = uniform(-math.pi, math.pi)
    gamma = torch.exp(uniform(math.log(0.5), math.log(1.5)))
    unit = GaborParams(torch.ones(n, dtype=torch.float64), theta, sigma, wavelength, psi, gamma)
    norms = unit.kernel(size).flatten(1).norm(dim=1).clamp_min(1e-12)
    amplitude = math.sqrt(2.0 / max(fan_in, 1)) * math.sqrt(size[0] * size[1]) / norms
    return GaborParams(amplitude, theta, sigma, wavelength, psi, gamma).reshape(*shape)
