"""How strong each Gabor kernel is, measured so that BatchNorm cannot fake sparsity, and which are alive.

A convolution followed by BatchNorm computes the same function when all kernels of an output channel
are scaled together: BN divides the scale out. So a kernel's raw norm means nothing on its own. The
strength is the kernel's share of its output channel times the BN gain of that channel:

    s[o, i] = |bn.weight[o]| * ||g[o, i]|| / ||g[o, :]||         (BN follows the layer)
    s[o, i] = ||g[o, i]||                                          (no BN follows)

which is invariant to that per-channel scale, still lets a whole channel die (its BN gain goes to 0),
and matches the BN-folded deploy weight up to the channel's input statistics. A leaf: the model
summary counts alive kernels with it, and the sparsity pressure (`gaborprune.sparsity`) builds on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.probe import probe

#: A kernel is alive while its strength is at least this fraction of the strongest in its layer, and
#: `prune` keeps it by default. Measured on resnet20_altered trained 8 epochs on digits at --sparsity
#: 0.1 (docs/results.md): with BatchNorm recalibration, 0.01 and 0.02 keep top-1 (99.18%), 0.03 and
#: 0.05 lose 1.1 points (three weak but live conv2 kernels go); 0.02 removes as much compute as 0.01.
DEFAULT_THRESHOLD = 0.02


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


@torch.no_grad()
def relative_strengths(layers: dict[str, GaborConv2d], norms: dict[str, nn.BatchNorm2d | None]) -> dict[str, Tensor]:
    """Strength / the layer's strongest kernel, Tensor[C_out, C_in / groups] per layer, in [0, 1].

    Args:
        layers: Gabor banks by name; norms: the BatchNorm that follows each (None: none).
    """
    out = {}
    for n, m in layers.items():
        s = kernel_strength(m, norms.get(n)).float()
        out[n] = s / s.max().clamp_min(1e-30)
    return out


def alive_counts(model: nn.Module, input_shape: tuple[int, int, int], threshold: float = DEFAULT_THRESHOLD,
                 norms: dict[str, str] | None = None) -> dict[str, int]:
    """Kernels per Gabor bank whose relative strength is at least `threshold` (and not masked).
    `norms`: `following_norms` of the model when known."""
    modules = dict(model.named_modules())
    layers = {n: m for n, m in modules.items() if isinstance(m, GaborConv2d)}
    if not layers:
        return {}
    norms = {n: modules[b] for n, b in (norms if norms is not None else following_norms(model, input_shape)).items()}
    return {n: int((r >= threshold).sum()) for n, r in relative_strengths(layers, norms).items()}
