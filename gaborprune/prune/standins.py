"""What a layer becomes when a prune removes all of one side of it (a residual branch removed whole).

A convolution or BatchNorm that loses every output channel becomes `Dropped`: nothing reads it any
more. A convolution that loses every input channel computes a constant per output channel, and
becomes `ChannelConstant` (with the BatchNorm that directly followed it folded in), which broadcasts
where the branch's output is added to the residual stream. Both keep the channel counts the layer
had, for reports. `gaborprune.prune.dataflow` treats them as reading nothing; neither costs a MAC.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropped(nn.Module):
    """A layer without output channels. Returns a fresh empty tensor shaped like its input without
    channels (not a view: an in-place activation on a view would bump the input's version and
    break autograd)."""

    def __init__(self, was: str, in_channels: int) -> None:
        super().__init__()
        self.was, self.in_channels, self.out_channels = was, in_channels, 0

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros((x.shape[0], 0, *x.shape[2:]))

    def extra_repr(self) -> str:
        return f"was {self.was}, in_channels={self.in_channels}"


class ChannelConstant(nn.Module):
    """A convolution without input channels: `value`, Tensor[1, C, 1, 1], whatever the input.
    Trainable, like the bias it is."""

    def __init__(self, was: str, value: Tensor) -> None:
        super().__init__()
        self.was, self.in_channels, self.out_channels = was, 0, value.numel()
        self.value = nn.Parameter(value.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"was {self.was}, out_channels={self.out_channels}"


@torch.no_grad()
def folded_constant(conv: nn.Module, norm: nn.BatchNorm2d | None) -> Tensor:
    """The output per channel of `conv` without inputs (its bias, or 0), through `norm` in eval mode."""
    ref = conv.weight
    c = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=ref.dtype, device=ref.device)
    if norm is not None:
        # without running statistics BatchNorm normalises a constant to 0
        c = (c - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) if norm.track_running_stats else torch.zeros_like(c)
        if norm.affine:
            c = c * norm.weight + norm.bias
    return c
