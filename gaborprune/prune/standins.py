"""What a layer becomes when a prune removes all of one side of it (a residual branch removed whole).

A convolution or BatchNorm that loses every output channel becomes `Dropped`: nothing reads it any
more. A convolution that loses every input channel computes a constant per output channel, and
becomes `ChannelConstant` (with the BatchNorm that directly followed it folded in), shaped like the
convolution's output, so that the residual addition it feeds (in place too: `out += identity`) sees what
it did. Both keep the channel counts the layer
had, for reports. `gaborprune.prune.dataflow` treats them as reading nothing; neither costs a MAC.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropped(nn.Module):
    """A layer without output channels. Returns a fresh empty tensor shaped like the layer's output
    would be (a convolution `like`'s spatial size, else its input's), without channels (not a view:
    an in-place activation on a view would bump the input's version and break autograd)."""

    def __init__(self, was: str, in_channels: int, like: nn.Module | None = None) -> None:
        super().__init__()
        self.was, self.in_channels, self.out_channels = was, in_channels, 0
        self.geometry = _geometry(like) if like is not None and (hasattr(like, "kernel_size") or getattr(like, "geometry", None)) else None

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros((x.shape[0], 0, *_size(x, self.geometry)))

    def extra_repr(self) -> str:
        return f"was {self.was}, in_channels={self.in_channels}"


def _geometry(conv: nn.Module) -> tuple:
    """(kernel_size, stride, padding, dilation) of a convolution, or of the stand-in that replaced one."""
    return getattr(conv, "geometry", None) or (conv.kernel_size, conv.stride, conv.padding, conv.dilation)


def _size(x: Tensor, geometry: tuple | None) -> list[int]:
    """The spatial size of the output of a convolution with `geometry` on `x` (None: x's own)."""
    if geometry is None:
        return list(x.shape[2:])
    kernel, stride, padding, dilation = geometry
    if padding == "same":
        return list(x.shape[2:])
    pad = (0, 0) if padding == "valid" else padding
    return [(x.shape[2 + a] + 2 * pad[a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in (0, 1)]


class ChannelConstant(nn.Module):
    """A convolution without input channels: `value` (Tensor[1, C, 1, 1]) at every position of the
    output the convolution `like` made, Tensor[N, C, H', W'] for an input [N, *, H, W] (a fresh
    tensor, so an in-place addition to it works). Trainable, like the bias it is."""

    def __init__(self, was: str, value: Tensor, like: nn.Module) -> None:
        super().__init__()
        self.was, self.in_channels, self.out_channels = was, 0, value.numel()
        self.geometry = _geometry(like)
        self.value = nn.Parameter(value.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], -1, *_size(x, self.geometry)).clone()

    def extra_repr(self) -> str:
        return f"was {self.was}, out_channels={self.out_channels}, stride={self.geometry[1]}"


@torch.no_grad()
def folded_constant(conv: nn.Module, norm: nn.BatchNorm2d | None) -> Tensor:
    """The output per channel of `conv` without inputs (its bias, or 0), through `norm` in eval mode:
    for a BatchNorm2d subclass, its whole forward (timm's BatchNormAct2d: act(drop(bn(c))))."""
    ref = conv.weight
    c = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=ref.dtype, device=ref.device)
    if norm is not None and type(norm) is not nn.BatchNorm2d:
        # run it: the analysis accepts a subclass only when its forward is per channel (`norm_steps`). Two
        # equal samples, so that batch statistics (no running ones) normalise the constant to 0 as below
        modes = {m: m.training for m in norm.modules()}
        norm.eval()
        try:
            return norm(c.view(1, -1, 1, 1).expand(2, -1, 1, 1).clone())[0].flatten()
        finally:
            for m, mode in modes.items():
                m.training = mode
    if norm is not None:
        # without running statistics BatchNorm normalises a constant to 0
        c = (c - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) if norm.track_running_stats else torch.zeros_like(c)
        if norm.affine:
            c = c * norm.weight + norm.bias
    return c
