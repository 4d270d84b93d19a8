"""Fitting a Gabor bank to what a trained layer *does*: its outputs on calibration images.

A weight fit makes each Gabor kernel close to the trained kernel tap by tap, and weighs every tap
alike; but a 3x3 kernel has 9 taps and a Gabor function 6 parameters, so the fit must give up
something, and what it gives up (often the kernel's mean, which smooth image patches respond to
most) can be what the network relied on. An output fit weighs the error by the statistics of the
layer's actual inputs. With P the im2col patches of the input seen by the converted network
(Tensor[M, C_in * kh * kw] per group) and Q those the original network feeds the same layer:

    E(g) = sum over output channels o of || P g_o - Q w_o ||^2
         = g_o' S g_o - 2 g_o' C w_o + w_o' T w_o,   S = P'P, C = P'Q, T = Q'Q

so the patches are reduced once to three second-moment matrices, and the fit never touches the
images again. For fixed orientation, width, wavelength and aspect ratio, every kernel is linear in
(a, b) = (A cos psi, -A sin psi) (see `gaborprune.convert.fit`), so each output channel's 2 C_in
coefficients solve one small linear system; Adam moves the four nonlinear parameters of all
kernels through that solve (variable projection), starting from the weight fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gaborprune.convert.fit import GaborParams
from gaborprune.convert.kernel import gabor_envelope_phase
from gaborprune.convert.layer import GaborConv2d

#: Patch rows kept per calibration batch (a random subset beyond it): the moments converge long before.
MAX_ROWS_PER_BATCH = 16384
#: Elements of the largest intermediate of one chunk of output channels in the solve.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Moments:
    """Second moments of a layer's input patches, per group, each Tensor[G, D, D] (D = C_in/G * kh * kw).

    Attributes:
        s: converted network's patches with themselves (P'P).
        c: converted against original (P'Q).
        t: original with themselves (Q'Q).
    """

    s: Tensor
    c: Tensor
    t: Tensor


def patches(layer: GaborConv2d, x: Tensor) -> Tensor:
    """The im2col patches `layer` multiplies its kernels with: Tensor[N, G, D, L] for input Tensor[N, C_in, H, W]."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._explicit_padding(), mode=mode)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # [N, C_in*kh*kw, L]
    return cols.reshape(len(x), layer.groups, -1, cols.shape[-1])


class MomentSum:
    """Accumulates `Moments` over calibration batches (float64 on the CPU)."""

    def __init__(self, layer: GaborConv2d, generator: torch.Generator) -> None:
        self.layer, self.generator = layer, generator
        self.s = self.c = self.t = None

    @torch.no_grad()
    def add(self, x_converted: Tensor, x_original: Tensor) -> None:
        p = patches(self.layer, x_converted).permute(1, 0, 3, 2).flatten(1, 2)  # [G, N*L, D]
        q = patches(self.layer, x_original).permute(1, 0, 3, 2).flatten(1, 2)
        if p.shape[1] > MAX_ROWS_PER_BATCH:
            keep = torch.randperm(p.shape[1], generator=self.generator)[:MAX_ROWS_PER_BATCH].to(p.device)
            p, q = p[:, keep], q[:, keep]
        pt = p.transpose(1, 2)
        terms = (pt @ p, pt @ q, q.transpose(1, 2) @ q)  # float32 per batch, summed in float64
        terms = tuple(t.double() for t in terms)
        if self.s is None:
            self.s, self.c, self.t = (t.cpu() for t in terms)
        else:
            for total, term in zip((self.s, self.c, self.t), terms):
                total += term.cpu()

    def moments(self) -> Moments:
        if self.s is None:
            raise ValueError("no calibration batch was seen")
        return Moments(self.s, self.c, self.t)


def _solve(nonlinear: list[Tensor], target: Tensor, m: Moments, grid: Tensor, groups: int, chunk: slice):
    """Best (a, b) of output channels `chunk` for the given nonlinear parameters, and their output error.

    Args:
        nonlinear: theta, log sigma, log wavelength, log gamma, each Tensor[O, Cg].
        target: the trained kernels, Tensor[O, Cg, K] (flattened taps).

    Returns:
        (coefficients Tensor[o, Cg, 2], squared output error Tensor[o]) for the chunk's o channels.
    """
    theta, log_sigma, log_wavelength, log_gamma = (p[chunk] for p in nonlinear)
    env, phase = gabor_envelope_phase(theta, log_sigma.exp(), log_wavelength.exp(), log_gamma.exp(), grid)
    o, cg = theta.shape
    basis = torch.stack([env * torch.cos(phase), env * torch.sin(phase)], dim=2).flatten(-2)  # [o, Cg, 2, K]
    per_group = target.shape[0] // groups
    g = torch.arange(chunk.start, chunk.start + o) // per_group  # each channel's group
    k = basis.shape[-1]
    s = m.s.view(groups, cg, k, cg, k)[g]  # [o, Cg, K, Cg, K]
    c = m.c.view(groups, cg, k, cg, k)[g]
    w = target[chunk]  # [o, Cg, K]
    sb = torch.einsum("oikjl,ojql->oikjq", s, basis)  # S B: [o, Cg, K, Cg, 2]
    gram = torch.einsum("oipk,oikjq->oipjq", basis, sb).reshape(o, 2 * cg, 2 * cg)  # B' S B
    rhs = torch.einsum("oipk,oikjl,ojl->oip", basis, c, w).reshape(o, 2 * cg)  # B' C w
    ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None] * torch.eye(2 * cg, dtype=gram.dtype)
    coef = torch.linalg.solve(gram + ridge, rhs[..., None])[..., 0]  # [o, 2 Cg]
    wtw = torch.einsum("oik,oikjl,ojl->o", w, m.t.view(groups, cg, k, cg, k)[g], w)
    error = (wtw - (coef * rhs).sum(-1)).clamp_min(0)  # at the optimum, E = w'Tw - z'B'Cw
    return coef.reshape(o, cg, 2), error


def _chunks(out_channels: int, cg: int, k: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // (cg * k * cg * k))
    return [slice(i, min(i + step, out_channels)) for i in range(0, out_channels, step)]


def output_error(layer: GaborConv2d, target: Tensor, m: Moments) -> float:
    """Relative output error sqrt(E(g) / w'Tw) of `layer`'s current kernels against `target`
    (Tensor[O, Cg, kh, kw]), over the calibration patches."""
    with torch.no_grad():
        g = layer.weight.detach().double().cpu().flatten(2)  # [O, Cg, K]
        w = target.double().cpu().flatten(2)
        groups = layer.groups
        per_group = g.shape[0] // groups
        cg, k = g.shape[1], g.shape[2]
        idx = torch.arange(g.shape[0]) // per_group
        s, c, t = (x.view(groups, cg * k, cg * k)[idx] for x in (m.s, m.c, m.t))
        gf, wf = g.flatten(1), w.flatten(1)
        e = (torch.einsum("od,ode,oe->o", gf, s, gf) - 2 * torch.einsum("od,ode,oe->o", gf, c, wf)
             + torch.einsum("od,ode,oe->o", wf, t, wf))
        total = torch.einsum("od,ode,oe->o", wf, t, wf).sum()
        return math.sqrt(max(float(e.sum()), 0.0) / float(total)) if total > 0 else 0.0


def fit_outputs_(layer: GaborConv2d, target: Tensor, m: Moments, *, steps: int = 150, lr: float = 0.05) -> None:
    """Refit `layer`'s Gabor parameters, in place, to minimise the output error against the trained
    kernels `target` (Tensor[O, Cg, kh, kw], at the layer's kernel size) over the moments `m`.

    Starts from the layer's current parameters (the weight fit) and keeps the best iterate, whose
    output error is never above the start's (the start's own amplitudes and phases are among the
    candidates the first solve improves on). Frozen parameters stay as they are.
    """
    p = layer.gabor_params()
    raw = [p.theta.detach().double().cpu(), p.sigma.detach().double().cpu().log(),
           p.wavelength.detach().double().cpu().log(), p.gamma.detach().double().cpu().log()]
    names = ("theta", "sigma", "wavelength", "gamma")
    learn = [r.requires_grad_(n not in layer.frozen) for r, n in zip(raw, names)]
    w = target.detach().double().cpu().flatten(2)
    grid = layer.grid.double().cpu()
    o, cg, k = w.shape
    chunks = _chunks(o, cg, k)
    optimizer = torch.optim.Adam([r for r in learn if r.requires_grad], lr=lr) if any(r.requires_grad for r in learn) else None
    best_error = torch.full((o,), math.inf, dtype=torch.float64)
    best_raw = [r.detach().clone() for r in raw]
    best_coef = torch.zeros(o, cg, 2, dtype=torch.float64)
    for step in range(steps + 1):
        if optimizer is not None:
            optimizer.zero_grad()
        for chunk in chunks:
            coef, error = _solve(raw, w, m, grid, layer.groups, chunk)
            with torch.no_grad():
                better = error < best_error[chunk]
                idx = torch.arange(chunk.start, chunk.stop)[better]
                best_error[idx] = error[better].detach()
                best_coef[idx] = coef[better].detach()
                for b, r in zip(best_raw, raw):
                    b[idx] = r.detach()[idx]
            if optimizer is not None and step < steps:
                error.sum().backward()
        if optimizer is None or step == steps:
            break
        optimizer.step()
    a, b = best_coef[..., 0], best_coef[..., 1]
    theta, sigma, wavelength, gamma = best_raw[0], *(r.exp() for r in best_raw[1:])
    layer.set_gabor_params(GaborParams(torch.hypot(a, b), theta, sigma, wavelength, torch.atan2(-b, a), gamma))
