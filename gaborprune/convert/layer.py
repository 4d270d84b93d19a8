"""GaborConv2d: a convolution whose every 2-D kernel is a learnable Gabor function."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from gaborprune.convert.fit import GaborParams, fit_gabor, random_gabor
from gaborprune.convert.kernel import GABOR_PARAMS, gabor_kernel, kernel_grid

#: Positive quantities are stored as logs so that no optimiser step can make them zero or negative.
_LOG_PARAMS = ("sigma", "wavelength", "gamma")
#: Logs are clamped to +-9 (values 1.2e-4 to 8.1e3) so exp can neither underflow to 0 nor overflow.
_LOG_LIMIT = 9.0


def _raw_name(param: str) -> str:
    return f"log_{param}" if param in _LOG_PARAMS else param


class GaborConv2d(nn.Module):
    """A drop-in for `nn.Conv2d` whose weight is computed from Gabor parameters.

    There are `out_channels * in_channels // groups` 2-D kernels; each has its own amplitude,
    orientation `theta`, envelope width `sigma`, wavelength, phase `psi` and aspect ratio `gamma`
    (see `gaborprune.convert.kernel`), each a learnable Tensor[C_out, C_in / groups] unless frozen.
    sigma, wavelength and gamma are stored as logs (`log_sigma`, ...). A `mask` buffer of the same
    shape holds 1 for live kernels and 0 for removed ones, whose weights are exact zeros.

    Shapes: input Tensor[N, C_in, H, W] -> output Tensor[N, C_out, H_out, W_out], as `nn.Conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        freeze: Iterable[str] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, not {padding_mode!r}")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid' or integers, not {padding!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding_mode = padding_mode
        frozen = tuple(freeze)
        unknown = sorted(set(frozen) - set(GABOR_PARAMS))
        if unknown:
            raise ValueError(f"cannot freeze {unknown}; Gabor parameters are {', '.join(GABOR_PARAMS)}")
        self.frozen = frozen

        factory = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups)
        init = random_gabor(shape, self.kernel_size, fan_in=shape[1] * math.prod(self.kernel_size), generator=generator)
        for name in GABOR_PARAMS:
            self.register_parameter(_raw_name(name), nn.Parameter(torch.empty(shape, **factory), requires_grad=name not in frozen))
        self.set_gabor_params(init)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.register_buffer("mask", torch.ones(shape, **factory))
        self.register_buffer("grid", kernel_grid(self.kernel_size, **factory), persistent=False)
        self._keep_weight = False  # inside `keeping_weight`: keep the forward pass's kernels for `take_weight`
        self._last_weight: Tensor | None = None

    # -- parameters ------------------------------------------------------------------------
    def gabor_params(self) -> GaborParams:
        """The natural parameters, each Tensor[C_out, C_in / groups] (with autograd)."""
        values = {n: getattr(self, _raw_name(n)) for n in GABOR_PARAMS}
        for n in _LOG_PARAMS:
            values[n] = values[n].clamp(-_LOG_LIMIT, _LOG_LIMIT).exp()
        return GaborParams(**values)

    @torch.no_grad()
    def set_gabor_params(self, params: GaborParams) -> None:
        """Overwrite the parameters (natural units, each Tensor[C_out, C_in / groups])."""
        for name in GABOR_PARAMS:
            value = getattr(params, name)
            getattr(self, _raw_name(name)).copy_(value.log() if name in _LOG_PARAMS else value)

    @property
    def weight(self) -> Tensor:
        """The computed kernels, masked: Tensor[C_out, C_in / groups, kh, kw] (with autograd)."""
        p = self.gabor_params()
        kernels = gabor_kernel(p.amplitude, p.theta, p.sigma, p.wavelength, p.psi, p.gamma, grid=self.grid)
        return kernels * self.mask[..., None, None]

    @property
    def kernels_alive(self) -> int:
        return int(self.mask.count_nonzero())

    @contextlib.contextmanager
    def keeping_weight(self) -> Iterator[None]:
        """Keep the kernels each forward pass computes with autograd on, for one `take_weight` after it
        (the sparsity pressure reads them instead of computing them a second time)."""
        self._keep_weight = True
        try:
            yield
        finally:
            self._keep_weight, self._last_weight = False, None

    def take_weight(self) -> Tensor | None:
        """The kernels of the last forward pass inside `keeping_weight` (None: none since the last take)."""
        weight, self._last_weight = self._last_weight, None
        return weight

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self._keep_weight and torch.is_grad_enabled():
            self._last_weight = weight
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(F.pad(x, self._explicit_padding(), mode=self.padding_mode), weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom), as F.pad wants, for a non-zero padding mode."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.frozen:
            s += f", frozen={self.frozen}"
        return s

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        *,
        kernel_size: int | tuple[int, int] | None = None,
        init: str = "fit",
        freeze: Iterable[str] = (),
        generator: torch.Generator | None = None,
        fit_steps: int = 150,
    ) -> tuple[GaborConv2d, Tensor | None]:
        """A Gabor bank with the hyper-parameters of `conv`.

        Args:
            kernel_size: enlarge the kernel to this size; padding grows by the same amount on each
                side so output shapes do not change. Each dimension must grow by an even number.
            init: "fit" (least squares to the trained kernels, zero-padded to the new size),
                "random" (a spread bank), or "none" (a skeleton whose state_dict is loaded next).

        Returns:
            (the layer, the fitted kernels Tensor[C_out, C_in / groups, kh, kw] in the new size,
            zero-padded, that the fit aimed at; None unless init == "fit").
        """
        old = conv.kernel_size
        new = _pair(kernel_size) if kernel_size is not None else old
        grow = (new[0] - old[0], new[1] - old[1])
        if grow[0] < 0 or grow[1] < 0:
            raise ValueError(f"kernel size {new} is smaller than the original {old}; it may only grow")
        if grow[0] % 2 or grow[1] % 2:
            raise ValueError(f"kernel size {new} must differ from the original {old} by an even number, so the kernel stays centred")
        padding = conv.padding
        if grow != (0, 0) and not isinstance(padding, str):
            padding = (padding[0] + conv.dilation[0] * grow[0] // 2, padding[1] + conv.dilation[1] * grow[1] // 2)
        elif grow != (0, 0) and padding == "valid":
            padding = (conv.dilation[0] * grow[0] // 2, conv.dilation[1] * grow[1] // 2)
        weight = conv.weight.detach()
        layer = cls(
            conv.in_channels, conv.out_channels, new, conv.stride, padding, conv.dilation, conv.groups,
            conv.bias is not None, conv.padding_mode, device=weight.device, dtype=weight.dtype,
            freeze=freeze, generator=generator,
        )
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        target = None
        if init == "fit":
            target = F.pad(weight, (grow[1] // 2, grow[1] // 2, grow[0] // 2, grow[0] // 2))
            params, _ = fit_gabor(target, steps=fit_steps)
            layer.set_gabor_params(params)
        elif init not in ("random", "none"):
            raise ValueError(f"init must be fit, random or none, not {init!r}")
        return layer, target

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """The equivalent plain convolution, with the computed (masked) kernels as its weight."""
        weight = self.weight
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device=weight.device, dtype=weight.dtype,
        )
        conv.weight.copy_(weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv


def alive_kernels(conv: nn.Module) -> torch.Tensor:
    """Bool Tensor[C_out, C_in / groups]: which 2-D kernels are present (not removed, not all-zero)."""
    if isinstance(conv, GaborConv2d):
        return conv.mask != 0
    return conv.weight.detach().flatten(2).abs().amax(dim=2) > 0
