"""How strong each Gabor kernel is, measured so that BatchNorm cannot fake sparsity.

A convolution followed by BatchNorm computes the same function when all kernels of an output channel
are scaled together: BN divides the scale out. So a kernel's raw norm means nothing on its own. The
strength used here is the kernel's share of its output channel times the BN gain of that channel:

    s[o, i] = |bn.weight[o]| * ||g[o, i]|| / ||g[o, :]||         (BN follows the layer)
    s[o, i] = ||g[o, i]||                                          (no BN follows)

which is invariant to that per-channel scale, still lets a whole channel die (its BN gain goes to 0),
and matches the BN-folded deploy weight up to the channel's input statistics.

The sparsity pressure is, per layer, the ratio of the strengths' L1 and L2 norms,
    R = ||s||_1 / ||s||_2          in [1, sqrt(n)]  (R^2 is a smooth count of the live kernels),
which is scale invariant as a whole: it rewards concentrating strength in few kernels (driving the
others towards zero while useful ones keep their strength), not shrinking everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.probe import probe

#: A kernel is alive while its strength is at least this fraction of the strongest in its layer.
DEFAULT_THRESHOLD = 0.05


def following_norms(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, str]:
    """For each Gabor layer, the BatchNorm2d that directly consumes its output, found by one
    forward pass on zeros (a tensor passed straight from the conv to the BN)."""
    modules = dict(model.named_modules())
    gabors = {n for n, m in modules.items() if isinstance(m, GaborConv2d)}
    outputs: dict[int, str] = {}
    pairs: dict[str, str] = {}

    def conv_hook(name):
        return lambda mod, args, out: outputs.__setitem__(id(out), name)

    def bn_hook(name):
        def hook(mod, args):
            conv = outputs.get(id(args[0]))
            if conv is not None and mod.num_features == modules[conv].out_channels:
                pairs.setdefault(conv, name)
        return hook

    hooks = [modules[n].register_forward_hook(conv_hook(n)) for n in gabors]
    hooks += [m.register_forward_pre_hook(bn_hook(n)) for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
    probe(model, input_shape, hooks)
    return pairs


def kernel_strength(layer: GaborConv2d, norm: nn.BatchNorm2d | None = None, weight: Tensor | None = None) -> Tensor:
    """Scale-invariant strength of each kernel, Tensor[C_out, C_in / groups] (0 for removed ones).

    Differentiable: the regulariser calls it with autograd on. `weight`: the layer's kernels when
    already computed (default: computed here)."""
    s = (layer.weight if weight is None else weight).flatten(2).norm(dim=2)  # [O, I]
    if norm is not None and norm.affine:
        s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm.weight.abs()[:, None]
    return s


def l1_l2_ratio(s: Tensor) -> Tensor:
    """||s||_1 / ||s||_2: sqrt(n) when all n entries are equal, 1 when only one is non-zero."""
    return s.abs().sum() / s.norm().clamp_min(1e-12)


class GaborSparsity:
    """The Gabor layers of a model with their BatchNorms: strengths, alive counts, and the penalty."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        modules = dict(model.named_modules())
        norms = following_norms(model, input_shape)
        self.layers = {n: m for n, m in modules.items() if isinstance(m, GaborConv2d)}
        self.norms = {n: modules[norms[n]] if n in norms else None for n in self.layers}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def penalty(self) -> Tensor:
        """Sum over Gabor layers of the L1/L2 ratio of the kernel strengths (differentiable).

        Inside `track_forward`, a layer's kernels come from its latest forward pass with autograd
        rather than being computed a second time; each pass's kernels serve one penalty."""
        total = torch.zeros(())
        for n, m in self.layers.items():
            weight, m.last_weight = m.last_weight, None
            total = total + l1_l2_ratio(kernel_strength(m, self.norms[n], weight))
        return total

    @contextlib.contextmanager
    def track_forward(self) -> Iterator[None]:
        """Let each layer keep the kernels its forward pass computes, for `penalty` right after that
        pass in the same training step: on a GPU, computing a bank's kernels is a string of small
        kernel launches, and doing it once per step instead of twice is visibly faster."""
        for m in self.layers.values():
            m.keep_weight = True
        try:
            yield
        finally:
            for m in self.layers.values():
                m.keep_weight, m.last_weight = False, None

    @torch.no_grad()
    def relative_strengths(self) -> dict[str, Tensor]:
        """Strength / the layer's strongest kernel, Tensor[C_out, C_in / groups] per layer, in [0, 1]."""
        out = {}
        for n, m in self.layers.items():
            s = kernel_strength(m, self.norms[n]).float()
            out[n] = s / s.max().clamp_min(1e-30)
        return out

    def alive(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
        """Kernels per layer whose relative strength is at least `threshold` (and not masked)."""
        return {n: int((r >= threshold).sum()) for n, r in self.relative_strengths().items()}

    def totals(self) -> dict[str, int]:
        return {n: m.mask.numel() for n, m in self.layers.items()}
