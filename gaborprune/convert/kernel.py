"""The Gabor kernel function: the one place the formula lives.

    g(x, y) = A * exp(-(x'^2 + gamma^2 * y'^2) / (2 * sigma^2)) * cos(2 * pi * x' / lambda + psi)
    x' =  x * cos(theta) + y * sin(theta)
    y' = -x * sin(theta) + y * cos(theta)

on a grid of tap offsets centred on the kernel: x runs along the width (columns, left to right),
y along the height (rows, top to bottom), both from -(k - 1) / 2 to (k - 1) / 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The learnable quantities of one Gabor kernel, in the order the formula names them.
GABOR_PARAMS = ("amplitude", "theta", "sigma", "wavelength", "psi", "gamma")


def kernel_grid(
    size: tuple[int, int], *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Tap offsets of a kernel, centred on its middle.

    Returns:
        Tensor[2, kh, kw]: y (row offsets) then x (column offsets).
    """
    kh, kw = size
    y = torch.arange(kh, device=device, dtype=dtype) - (kh - 1) / 2
    x = torch.arange(kw, device=device, dtype=dtype) - (kw - 1) / 2
    return torch.stack(torch.meshgrid(y, x, indexing="ij"))


def gabor_envelope_phase(
    theta: Tensor, sigma: Tensor, wavelength: Tensor, gamma: Tensor, grid: Tensor
) -> tuple[Tensor, Tensor]:
    """The Gaussian envelope and the carrier phase 2 pi x' / lambda, without amplitude or psi.

    Args:
        theta, sigma, wavelength, gamma: Tensor[*S], broadcastable to one shape S.
        grid: Tensor[2, kh, kw] from `kernel_grid`.

    Returns:
        (envelope, phase), each Tensor[*S, kh, kw].
    """
    y, x = grid[0], grid[1]
    theta, sigma, wavelength, gamma = (t[..., None, None] for t in (theta, sigma, wavelength, gamma))
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    xr = x * cos_t + y * sin_t  # [*S, kh, kw]
    yr = -x * sin_t + y * cos_t
    envelope = torch.exp(-(xr**2 + (gamma * yr) ** 2) / (2 * sigma**2))
    return envelope, (2 * math.pi) * xr / wavelength


def gabor_kernel(
    amplitude: Tensor,
    theta: Tensor,
    sigma: Tensor,
    wavelength: Tensor,
    psi: Tensor,
    gamma: Tensor,
    size: tuple[int, int] | None = None,
    *,
    grid: Tensor | None = None,
) -> Tensor:
    """Evaluate Gabor kernels; differentiable in every parameter.

    Args:
        amplitude, theta, sigma, wavelength, psi, gamma: Tensor[*S], broadcastable to one shape S
            (for a conv layer S = [C_out, C_in / groups]). sigma, wavelength and gamma must be positive.
        size: (kh, kw). Needed unless `grid` is given.
        grid: a precomputed Tensor[2, kh, kw] from `kernel_grid` (a layer keeps one as a buffer).

    Returns:
        Tensor[*S, kh, kw].
    """
    if grid is None:
        if size is None:
            raise ValueError("gabor_kernel needs size or grid")
        grid = kernel_grid(size, device=amplitude.device, dtype=amplitude.dtype)
    envelope, phase = gabor_envelope_phase(theta, sigma, wavelength, gamma, grid)
    return amplitude[..., None, None] * envelope * torch.cos(phase + psi[..., None, None])
