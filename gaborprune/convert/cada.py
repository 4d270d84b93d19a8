"""CADAConv2d: context-aware decomposed attention (the second seed paper), as a conv-like layer.

At every output position p, each head g builds a k x k filter from B base kernels mixed by
coefficients, optionally plus a relative-position kernel R_g shared by all positions, and applies it
to a 1x1 value projection V of the input:

    Y_c(p) = sum_delta [ sum_b a_{g,b}(p) K_{g,b}(delta) + R_g(delta) ] * V_c(p * stride + delta)

with g = g(c) the head of channel c (C_out / heads channels each). The knobs span the inductive
biases the paper studies:

- `invariance="strict"`: one kernel per head for all positions (B = 1, no coefficients): a depthwise
  convolution of V. Bases, context and relative position make no sense here and are refused.
- `invariance="relaxed"` (CADA): B shared bases per head; a_{g,b}(p) = softmax_b of an r x r
  convolution of the input (`context=r`), or of learned constants (`context=0`: no context
  awareness, which reduces to a depthwise convolution with a learned mixture).
- `invariance="none"`: a free kernel per position, generated from the input by an r x r convolution
  (involution-like), plus R_g.

Because the coefficients sum to 1 over b, R_g folds into every base, and the relaxed output is a
per-position weighted sum of B depthwise convolutions: no k^2-times-larger unfolded tensor is made.
No invariance accumulates k^2 shifted products of V instead, which avoids it too.
`basis="gabor"` makes the base kernels Gabor functions (six learnable parameters each, the same
kernel function as GaborConv2d): a small shared Gabor dictionary mixed by context.

Shapes: input Tensor[N, C_in, H, W] -> output Tensor[N, C_out, H_out, W_out], with "same"-style
padding k // 2, so H_out = (H - 1) // stride + 1 for odd k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune.convert.fit import random_gabor
from gaborprune.convert.kernel import GABOR_PARAMS, gabor_kernel, kernel_grid
from gaborprune.errors import ConversionError

INVARIANCES = ("strict", "relaxed", "none")
BASES = ("free", "gabor")
_LOG = ("sigma", "wavelength", "gamma")


class CADAConv2d(nn.Module):
    """Context-aware decomposed attention; see the module docstring for the formula and knobs.

    Args:
        in_channels, out_channels: C_in, C_out.
        kernel_size: k (odd), the locality.
        stride: 1, or 2 for downsampling (coefficients are computed at output positions).
        heads: G, dividing out_channels; each head has its own bases and coefficients.
        bases: B base kernels per head (relaxed only).
        context: r, the size of the coefficients' input window (0: constant coefficients).
        invariance: "strict", "relaxed" or "none".
        rel_pos: add a learned relative-position kernel per head (relaxed, none).
        basis: "free" (learned taps) or "gabor" (Gabor functions), for strict and relaxed.
        bias: a bias per output channel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *, heads: int = 1,
                 bases: int = 4, context: int = 3, invariance: str = "relaxed", rel_pos: bool = False,
                 basis: str = "free", bias: bool = True) -> None:
        super().__init__()
        checks = [
            (invariance in INVARIANCES, f"invariance must be one of {', '.join(INVARIANCES)}, not '{invariance}'"),
            (basis in BASES, f"basis must be one of {', '.join(BASES)}, not '{basis}'"),
            (kernel_size >= 1 and kernel_size % 2 == 1, f"kernel size must be odd and positive, not {kernel_size}"),
            (stride in (1, 2), f"stride must be 1 or 2, not {stride}"),
            (heads >= 1 and out_channels % heads == 0, f"heads ({heads}) must divide out_channels ({out_channels})"),
            (bases >= 1, f"bases must be at least 1, not {bases}"),
            (context >= 0 and (context == 0 or context % 2 == 1), f"context must be 0 (none) or an odd size, not {context}"),
            (not (invariance == "strict" and bases != 1), f"strict invariance has one kernel per head: bases must be 1, not {bases}"),
            (not (invariance == "strict" and context), "strict invariance has no coefficients: context must be 0"),
            (not (invariance == "strict" and rel_pos), "strict invariance already has one absolute kernel: rel_pos adds nothing"),
            (not (invariance == "none" and bases != 1), "no invariance generates a free kernel per position: bases must be 1"),
            (not (invariance == "none" and context == 0), "no invariance generates kernels from the input: context must be at least 1"),
            (not (invariance == "none" and basis == "gabor"), "no invariance has no base kernels: basis must be free"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConversionError(message)
        self.in_channels, self.out_channels, self.kernel_size, self.stride = in_channels, out_channels, kernel_size, stride
        self.heads, self.bases, self.context = heads, bases, context
        self.invariance, self.rel_pos, self.basis = invariance, rel_pos, basis
        k, g, b = kernel_size, heads, bases
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        if invariance != "none":
            if basis == "free":
                self.kernels = nn.Parameter(torch.randn(g, b, k, k) / k)
            else:
                params = random_gabor((g, b), (k, k), fan_in=k * k)
                for name in GABOR_PARAMS:
                    value = getattr(params, name).float()
                    self.register_parameter(f"log_{name}" if name in _LOG else name, nn.Parameter(value.log() if name in _LOG else value))
                self.register_buffer("grid", kernel_grid((k, k)), persistent=False)
        if invariance == "relaxed":
            if context:
                self.coefficients = nn.Conv2d(in_channels, g * b, context, stride, context // 2)
            else:
                self.logits = nn.Parameter(torch.zeros(g, b))
        if invariance == "none":
            self.generator = nn.Conv2d(in_channels, g * k * k, context, stride, context // 2)
        self.relative = nn.Parameter(torch.zeros(g, k, k)) if rel_pos else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, kernel_size: int | None = None, **knobs) -> CADAConv2d:
        """A CADA block in the place of `conv`: same channels, stride and output size (random init).

        Raises:
            ConversionError: a non-square kernel, a stride other than 1 or 2, dilation, or padding
                other than "same" (the block pads k // 2), which would change output shapes.
        """
        kh, kw = conv.kernel_size
        if kh != kw or kh % 2 == 0:
            raise ConversionError(f"CADA replaces square, odd-sized convolutions; this one is {kh}x{kw}")
        if conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
            raise ConversionError(f"CADA takes stride 1 or 2; this convolution has stride {tuple(conv.stride)}")
        if conv.dilation != (1, 1):
            raise ConversionError(f"CADA has no dilation; this convolution has dilation {tuple(conv.dilation)}")
        if conv.padding not in ("same", (kh // 2, kw // 2)):
            raise ConversionError(f"CADA keeps 'same' padding (k // 2); this convolution has padding {conv.padding}, so output shapes would change")
        weight = conv.weight
        block = cls(conv.in_channels, conv.out_channels, kernel_size or kh, conv.stride[0], bias=conv.bias is not None, **knobs)
        return block.to(weight.device, weight.dtype).train(conv.training)

    def base_kernels(self) -> Tensor:
        """The base kernels, Tensor[G, B, k, k] (relative position not included)."""
        if self.basis == "free":
            return self.kernels
        p = {n: getattr(self, f"log_{n}").clamp(-9, 9).exp() if n in _LOG else getattr(self, n) for n in GABOR_PARAMS}
        return gabor_kernel(p["amplitude"], p["theta"], p["sigma"], p["wavelength"], p["psi"], p["gamma"], grid=self.grid)

    def coefficient_maps(self, x: Tensor) -> Tensor:
        """Relaxed mode: a_{g,b}(p), Tensor[N, G, B, H_out, W_out] (or [1, G, B, 1, 1] without
        context), softmax over B."""
        if self.context:
            logits = self.coefficients(x)
            return logits.view(x.shape[0], self.heads, self.bases, *logits.shape[-2:]).softmax(dim=2)
        return self.logits.softmax(dim=1)[None, :, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        v = self.value(x)  # [N, C, H, W]
        n, c = v.shape[:2]
        per_head = c // self.heads
        pad = self.kernel_size // 2
        if self.invariance == "none":
            y = self._free_kernels(x, v)
        else:
            kernels = self.base_kernels()  # [G, B, k, k]
            if self.relative is not None:  # coefficients sum to 1: R_g folds into every base
                kernels = kernels + self.relative[:, None]
            weights = kernels.repeat_interleave(per_head, dim=0)[:, :, None]  # [C, B, 1, k, k]: channel c gets its head's bases
            if self.invariance == "strict":
                y = F.conv2d(v, weights[:, 0], None, self.stride, pad, groups=c)
            else:
                a = self.coefficient_maps(x)  # [N or 1, G, B, H', W']
                y = 0
                for b in range(self.bases):  # one depthwise convolution per base, weighted per position, accumulated
                    d = F.conv2d(v, weights[:, b], None, self.stride, pad, groups=c)  # [N, C, H', W']
                    h, w = d.shape[-2:]
                    y = y + (d.view(n, self.heads, per_head, h, w) * a[:, :, b, None]).view(n, c, h, w)
        return y if self.bias is None else y + self.bias[:, None, None]

    def _free_kernels(self, x: Tensor, v: Tensor) -> Tensor:
        """A kernel per position and head, generated from the input, applied as k^2 shifted products
        of V accumulated one offset at a time: no k^2-times-larger unfolded tensor, and faster than an
        unfold in PyTorch and ONNX Runtime (docs/benchmarks.md)."""
        n, c = v.shape[:2]
        k, g, s, pad = self.kernel_size, self.heads, self.stride, self.kernel_size // 2
        kernels = self.generator(x)  # [N, G * k * k, H', W']
        h, w = kernels.shape[-2:]
        kernels = kernels.view(n, g, 1, k * k, h, w)
        if self.relative is not None:
            kernels = kernels + self.relative.view(1, g, 1, k * k, 1, 1)
        padded = F.pad(v, (pad, pad, pad, pad))
        padded = padded.view(n, g, c // g, *padded.shape[-2:])
        y = 0
        for i in range(k):
            for j in range(k):
                tap = padded[..., i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s]  # V(p * stride + delta)
                y = y + tap * kernels[:, :, :, i * k + j]
        return y.reshape(n, c, h, w)

    def mixing_macs(self, h_out: int, w_out: int) -> int:
        """Multiply-accumulates per image of the block's own arithmetic, beside its convolution
        submodules (value, coefficients, generator): the k x k filtering of V (one depthwise pass per
        base, plus the per-position weighting of each pass, in relaxed mode)."""
        taps = self.out_channels * self.kernel_size**2 * h_out * w_out
        if self.invariance == "relaxed":
            return self.bases * (taps + self.out_channels * h_out * w_out)
        return taps

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, heads={self.heads}, invariance={self.invariance}"
        if self.invariance == "relaxed":
            s += f", bases={self.bases}, context={self.context}"
        elif self.invariance == "none":
            s += f", context={self.context}"
        if self.basis != "free":
            s += f", basis={self.basis}"
        if self.rel_pos:
            s += ", rel_pos=True"
        return s


