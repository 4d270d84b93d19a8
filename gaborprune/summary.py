"""Per-layer and whole-model counts: kernels, parameters, MACs and FLOPs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gaborprune.convert.cada import CADAConv2d
from gaborprune.convert.layer import GaborConv2d, alive_kernels
from gaborprune.convert.spec import conv_modules
from gaborprune.probe import probe
from gaborprune.strength import alive_counts


@dataclass(frozen=True)
class LayerSummary:
    name: str
    type: str  # "conv", "gabor" or "cada" (a CADA block's own filtering; its 1x1 convolutions are rows of their own)
    kernel_size: tuple[int, int]
    in_channels: int
    out_channels: int
    groups: int
    kernels: int  # 2-D kernels: out_channels * in_channels / groups (CADA: its stored base kernels, heads x bases)
    kernels_alive: int  # present and, in a Gabor bank, not driven to zero (see `summarize`)
    params: int
    macs: int  # multiply-accumulates of this layer for one input image


@dataclass(frozen=True)
class ModelSummary:
    """Counts at one input image of shape `input_shape`.

    MACs count convolutions, CADA blocks and linear layers, skipping removed kernels; FLOPs = 2 x MACs.
    `params` counts stored parameter values (a Gabor kernel stores 6 whatever its size).
    """

    input_shape: tuple[int, int, int]
    layers: tuple[LayerSummary, ...]
    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "layers": [asdict(layer) | {"kernel_size": list(layer.kernel_size)} for layer in self.layers],
            "params": self.params,
            "macs": self.macs,
            "flops": self.flops,
        }


@torch.no_grad()
def summarize(model: nn.Module, input_shape: tuple[int, int, int], norms: dict[str, str] | None = None) -> ModelSummary:
    """Count kernels, parameters and MACs by running one forward pass on zeros [1, *input_shape]
    (`norms`: the model's `following_norms` when known, e.g. `ModelAnalysis.norms`).

    A Gabor kernel is alive when it is not removed (masked) and its strength is at least
    `gaborprune.strength.DEFAULT_THRESHOLD` of the strongest in its layer: the count `finetune` logs and `prune` keeps by
    default. A plain kernel is alive when it is not all zeros. MACs skip removed kernels only: weak
    ones are still computed until they are pruned.
    """
    convs = conv_modules(model)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, CADAConv2d)}
    spatial: dict[str, tuple[int, int]] = {}  # output (H, W) of each conv and CADA block
    linear_macs = 0

    def conv_hook(name):
        def hook(module, args, output):
            spatial.setdefault(name, tuple(output.shape[-2:]))
        return hook

    def linear_hook(module, args, output):
        nonlocal linear_macs
        linear_macs += module.in_features * output.numel() // output.shape[0]

    hooks = [m.register_forward_hook(conv_hook(n)) for n, m in (convs | blocks).items()]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    probe(model, input_shape, hooks)

    strong = alive_counts(model, input_shape, norms=norms)
    layers = []
    for name, m in blocks.items():  # before their own 1x1 convolutions, as in named_modules
        base = m.heads * m.bases if m.invariance != "none" else 0
        layers.append(LayerSummary(
            name, "cada", (m.kernel_size, m.kernel_size), m.out_channels, m.out_channels, m.out_channels, base, base,
            sum(p.numel() for p in m.parameters(recurse=False)), m.mixing_macs(*spatial.get(name, (0, 0))),
        ))
    for name, m in convs.items():
        present = int(alive_kernels(m).sum())
        alive = strong.get(name, present)
        kh, kw = m.kernel_size
        layers.append(LayerSummary(
            name, "gabor" if isinstance(m, GaborConv2d) else "conv", (kh, kw), m.in_channels, m.out_channels,
            m.groups, m.out_channels * (m.in_channels // m.groups), alive,
            sum(p.numel() for p in m.parameters()), present * kh * kw * math.prod(spatial.get(name, (0, 0))),
        ))
    order = {n: i for i, n in enumerate(dict(model.named_modules()))}
    layers.sort(key=lambda layer: order[layer.name])
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(tuple(input_shape), tuple(layers), params, sum(layer.macs for layer in layers) + linear_macs)
