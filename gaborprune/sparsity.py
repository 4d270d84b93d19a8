"""The sparsity pressure: a penalty on the kernel strengths of `gaborprune.strength`,

    s[o, i] = |bn.weight[o]| * ||g[o, i]|| / ||g[o, :]||         (BN follows the layer)
    s[o, i] = ||g[o, i]||                                          (no BN follows)

invariant to the per-channel scale BatchNorm absorbs.

The pressure is built from the ratio of L1 and L2 norms,
    R(v) = ||v||_1 / ||v||_2       in [1, sqrt(n)]  (R^2 is a smooth count of the live entries of v),
which is scale invariant: it rewards concentrating strength in few entries (driving the others
towards zero while useful ones keep their strength), not shrinking everything. Two structures:

    kernel:   P = sum_layers R(s_layer)
    channel:  P = sum_layers R(s_layer) + GROUP_WEIGHT * sum_families R_w(G_family)

`kernel` pushes single kernels to zero (the seed paper's pressure). ONNX Runtime's convolutions cost
the same with 9 or 128 of their kernels non-zero, so for speed `channel` also pushes whole *channel
groups* (`gaborprune.prune.groups`): the kernels whose joint death removes a channel exactly (the
output channel of a bank, the input column of a bank, or a residual/concatenation tie across banks).
A group's strength is the L2 norm of its members' strengths,

    G[k] = sqrt(sum_{(layer, o, i) in group k} s_layer[o, i]^2),

and a *family* is the groups with the same label (the same banks and side, e.g. all of conv1's
output channels, or all of conv2's input columns); R over a family's strengths, between 1 and
sqrt(groups), is lowest when few groups stay. The group term weighs each group k by what its
removal saves,

    R_w(G) = sum_k w_k G_k / ||G||_2,     w_k = saved_k / mean(saved over all groups of all families),

so the weights average 1 across the penalty: R_w = R when every group saves the same, and the
penalty is then exactly the unweighted one (it is computed as such). `saved_k` is the MACs per
image the group's channel drops (`GroupAnalysis.saved_macs`: its writers' rows, its readers'
columns, depthwise channels on the way), or with `finetune --latency-aware` the ONNX Runtime time
it saves (`gaborprune.export.costs`). This differs from equal weights only across families: the
groups of one family drop like rows and columns of the same layers. On resnet20_altered conv1's
rows and conv2's columns are the same 16 channels, so all weigh 1 there.
With scope "all" (`finetune --scope all`) plain convolutions join in: their strength is the same
s (the share formula with their BatchNorm gain; no kernel term, since kernels inside a plain layer
are not time), so a plain row's G is its BatchNorm gain |bn.weight[o]|. And a *branch term* pushes
whole residual branches to zero: with B_j the root mean square of G over the channels inside
branch j (the groups `GroupAnalysis.branches` names; the mean, so that wide and narrow branches
compare),

    P += BRANCH_WEIGHT * R(B)                   over all branches of the model,

unweighted: on small networks each convolution costs about the same time whatever its width
(notes/latency-probe.md), so every branch saves about the same. A branch whose B falls below the
prune threshold x the median branch's goes whole (`gaborprune.prune.structured`).
The weights are constants, so all terms inherit the invariance of s. The kernel
term has weight 1 and each family GROUP_WEIGHT = 2: in the latency probe's prototype
(notes/latency-probe.md, resnet20_altered on digits, --sparsity 0.1) that killed 9 of conv2's 16
input columns at 99.73% test accuracy (the kernel term alone: 3, at 99.18%; weight 4: 13, at 98.35%).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaborprune.convert.layer import GaborConv2d
from gaborprune.errors import GaborPruneError
from gaborprune.scopes import SCOPES, STRUCTURES
from gaborprune.strength import DEFAULT_THRESHOLD, following_norms, kernel_strength, relative_strengths

__all__ = ["BRANCH_WEIGHT", "DEFAULT_THRESHOLD", "GROUP_WEIGHT", "GaborSparsity", "following_norms", "kernel_strength", "l1_l2_ratio"]

#: The weight of each family's group term against the kernel term (see the module doc).
GROUP_WEIGHT = 2.0
#: The weight of the branch term (scope "all", see the module doc).
BRANCH_WEIGHT = 2.0


def l1_l2_ratio(s: Tensor, weights: Tensor | None = None) -> Tensor:
    """||s||_1 / ||s||_2: sqrt(n) when all n entries are equal, 1 when only one is non-zero.
    With `weights` (Tensor like s), the weighted sum_k w_k |s_k| / ||s||_2."""
    l1 = s.abs().sum() if weights is None else (weights * s.abs()).sum()
    return l1 / s.norm().clamp_min(1e-12)


@dataclass
class _Family:
    """The groups of one label, as index tensors into the banks' strengths."""

    size: int  # groups
    parts: list[tuple[str, Tensor, Tensor]]  # (bank, flat kernel index of each member, its group), both Tensor[members]
    weights: Tensor | None = None  # w_k, Tensor[groups] (None: all 1)

    def ratio(self, strengths: dict[str, Tensor]) -> Tensor:
        """R_w(G) of the module doc (differentiable)."""
        g = self.strength(strengths)
        if self.weights is None:
            return l1_l2_ratio(g)
        if self.weights.device != g.device or self.weights.dtype != g.dtype:
            self.weights = self.weights.to(g.device, g.dtype)
        return l1_l2_ratio(g, self.weights)

    def _gather(self, strengths: dict[str, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        for k, (bank, flat, group) in enumerate(self.parts):
            s = strengths[bank]
            if flat.device != s.device:  # the model moved since the groups were found
                flat, group = flat.to(s.device), group.to(s.device)
                self.parts[k] = (bank, flat, group)
            yield s.flatten()[flat], group

    def strength(self, strengths: dict[str, Tensor]) -> Tensor:
        """G: the L2 norm of each group's member strengths, Tensor[groups] (differentiable)."""
        total = None
        for v, group in self._gather(strengths):
            sq = torch.zeros(self.size, dtype=v.dtype, device=v.device).index_add(0, group, v.square())
            total = sq if total is None else total + sq
        return total.clamp_min(1e-24).sqrt()  # sqrt's gradient at 0 is infinite; a group's is at most 1 here

    def strongest(self, strengths: dict[str, Tensor]) -> Tensor:
        """Each group's strongest member, Tensor[groups]."""
        best = None
        for v, group in self._gather(strengths):
            top = torch.zeros(self.size, dtype=v.dtype, device=v.device).scatter_reduce(0, group, v, "amax")
            best = top if best is None else torch.maximum(best, top)
        return best


class GaborSparsity:
    """The Gabor layers of a model with their BatchNorms: strengths, alive counts, and the penalty.

    Args:
        structure: None (default): kernels only, no channel analysis (what `prune` needs). "kernel":
            the kernel pressure, with the channel groups found and counted. "channel": the groups
            pressed too (see the module doc), weighed by the MACs each saves until `weigh` says
            otherwise; `weighed_by` names the source (equal, macs, latency).
        scope: "banks" (default): the groups of the Gabor banks; "all" (needs "channel"): of every
            ungrouped convolution, plain ones in `plain`, and the residual branches in `branches`.
        analysis: the `ModelAnalysis` of `model` (or of a copy of it with other weights) whose graph
            and norms are reused; made here when None.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], structure: str | None = None, scope: str = "banks",
                 analysis=None) -> None:
        if structure is not None and structure not in STRUCTURES:
            raise GaborPruneError(f"unknown `structure` '{structure}'; known: {', '.join(STRUCTURES)}")
        if scope not in SCOPES:
            raise GaborPruneError(f"unknown `scope` '{scope}'; known: {', '.join(SCOPES)}")
        if scope == "all" and structure != "channel":
            raise GaborPruneError("`scope` all presses channel groups of every convolution; it needs `structure` channel")
        from gaborprune.prune.analysis import ModelAnalysis  # the prune package imports this module

        self.analysis = analysis if analysis is not None else ModelAnalysis(model, input_shape)
        modules = dict(model.named_modules())
        norms = self.analysis.norms
        self.structure, self.scope = structure, scope
        self.layers = {n: m for n, m in modules.items() if isinstance(m, GaborConv2d)}
        self.norms = {n: modules[norms[n]] if n in norms else None for n in self.layers}
        self.groups = self._analyse(model) if structure is not None else None
        # scope "all": the plain convolutions in groups, whose strengths the group terms read too
        self.plain = {}
        for g in self.groups.groups if self.groups is not None else []:
            for name, _ in g.members:
                if name not in self.layers:
                    self.plain[name] = modules[name]
                    self.norms[name] = modules[self.groups.norms[name]] if name in self.groups.norms else None
        self.families: dict[str, _Family] = self._families() if self.groups is not None else {}
        self.branches = [b for b in (self.groups.branches if self.groups is not None else []) if b in self.families]
        self.weighed_by = "equal"  # what the group weights come from: equal, macs or latency
        if structure == "channel" and self.groups.groups:
            self.weigh(self.groups.saved_macs(), "macs")

    def __bool__(self) -> bool:
        return bool(self.layers) or bool(self.plain)

    def _analyse(self, model: nn.Module):
        from gaborprune.prune.groups import GroupAnalysis

        return self.analysis.groups(self.scope, model) if self.layers or self.scope == "all" else GroupAnalysis()

    def _conv(self, name: str) -> nn.Module:
        return self.layers[name] if name in self.layers else self.plain[name]

    def _families(self) -> dict[str, _Family]:
        members: dict[str, dict[str, tuple[list[int], list[int]]]] = {}  # label -> bank -> (flat indices, groups)
        sizes: dict[str, int] = {}
        for g in self.groups.groups:
            k = sizes.get(g.label, 0)
            sizes[g.label] = k + 1
            for bank, kernels in g.members:
                width = self._conv(bank).weight.shape[1] if bank in self.plain else self.layers[bank].mask.shape[1]
                flat, group = members.setdefault(g.label, {}).setdefault(bank, ([], []))
                flat += [o * width + i for o, i in kernels]
                group += [k] * len(kernels)
        families = {}
        for label, banks in members.items():
            parts = []
            for bank, (flat, group) in banks.items():
                device = next(self._conv(bank).parameters()).device
                parts.append((bank, torch.tensor(flat, device=device), torch.tensor(group, device=device)))
            families[label] = _Family(sizes[label], parts)
        return families

    def weigh(self, saved: Sequence[float], source: str) -> None:
        """Weigh the groups (in `groups.groups` order) by what removing each saves (MACs, ms):
        w_k = saved_k / mean(saved), see the module doc. `source` names what `saved` counts."""
        groups = self.groups.groups if self.groups is not None else []
        if len(saved) != len(groups) or not all(math.isfinite(v) and v >= 0 for v in saved) or groups and sum(saved) <= 0:
            raise GaborPruneError(f"group savings must be {len(groups)} finite values >= 0, not all 0; got {list(saved)[:8]}")
        self.weighed_by = source
        if len(set(saved)) <= 1:  # all weigh 1: the unweighted penalty, exactly
            for f in self.families.values():
                f.weights = None
            return
        mean = sum(saved) / len(saved)
        per_family: dict[str, list[float]] = {}
        for g, v in zip(groups, saved):
            per_family.setdefault(g.label, []).append(v / mean)
        for label, f in self.families.items():
            f.weights = torch.tensor(per_family[label], dtype=torch.float32, device=f.parts[0][1].device)

    def group_weights(self) -> dict[str, list[float]]:
        """{label: w_k per group}, for reports."""
        return {label: f.weights.tolist() if f.weights is not None else [1.0] * f.size for label, f in self.families.items()}

    def penalty(self) -> Tensor:
        """The pressure of the module doc, for this structure (differentiable): per Gabor layer the
        L1/L2 ratio of the kernel strengths, plus with "channel" the group terms.

        Inside `track_forward`, a layer's kernels come from its latest forward pass with autograd
        rather than being computed a second time; each pass's kernels serve one penalty."""
        total = torch.zeros(())
        strengths = {}
        for n, m in self.layers.items():
            weight = m.take_weight()
            strengths[n] = kernel_strength(m, self.norms[n], weight)
            total = total + l1_l2_ratio(strengths[n])
        for n, m in self.plain.items():  # no kernel term: kernels inside a plain layer are not time
            strengths[n] = kernel_strength(m, self.norms[n])
        if self.structure == "channel":
            for family in self.families.values():
                total = total + GROUP_WEIGHT * family.ratio(strengths)
            if len(self.branches) > 1:
                total = total + BRANCH_WEIGHT * l1_l2_ratio(torch.stack([self._branch(b, strengths) for b in self.branches]))
        return total

    def _branch(self, label: str, strengths: dict[str, Tensor]) -> Tensor:
        """B: the root mean square of G over the branch's channels (differentiable)."""
        f = self.families[label]
        return f.strength(strengths).norm() / math.sqrt(f.size)

    @torch.no_grad()
    def relative_branch_strengths(self) -> dict[str, float]:
        """{branch label: B / the median branch's B} (scope "all"; {} without branches). The median, not
        the strongest: one dominant branch would make every other look dead, and below 1 at most
        half the branches can fall under it."""
        strengths = self._strengths()
        norms = {b: float(self._branch(b, strengths)) for b in self.branches}
        mid = float(torch.tensor(list(norms.values())).median()) if norms else 0.0
        return {b: v / mid if mid > 0 else 0.0 for b, v in norms.items()}

    @contextlib.contextmanager
    def track_forward(self) -> Iterator[None]:
        """Let each layer keep the kernels its forward pass computes, for `penalty` right after that
        pass in the same training step: on a GPU, computing a bank's kernels is a string of small
        kernel launches, and doing it once per step instead of twice is visibly faster."""
        with contextlib.ExitStack() as stack:
            for m in self.layers.values():
                stack.enter_context(m.keeping_weight())
            yield

    def relative_strengths(self) -> dict[str, Tensor]:
        """Strength / the layer's strongest kernel, Tensor[C_out, C_in / groups] per layer, in [0, 1]."""
        return relative_strengths(self.layers, self.norms)

    def alive(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
        """Kernels per layer whose relative strength is at least `threshold` (and not masked)."""
        return {n: int((r >= threshold).sum()) for n, r in self.relative_strengths().items()}

    def totals(self) -> dict[str, int]:
        return {n: m.mask.numel() for n, m in self.layers.items()}

    def groups_alive(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
        """Groups per label that are alive at `threshold`. Scope "banks": with a kernel alive (as
        `alive`), so `prune --threshold` removes every kernel of a dead group. Scope "all": with a
        strength G (module doc) of at least `threshold` x the strongest of its family, the rule
        `prune --scope all` removes groups by. Empty without a channel analysis."""
        if not self.families:
            return {}
        if self.scope == "all":
            return {label: int((g >= threshold).sum()) for label, g in self.relative_group_strengths().items()}
        r = self.relative_strengths()
        return {label: int((f.strongest(r) >= threshold).sum()) for label, f in self.families.items()}

    def _strengths(self) -> dict[str, Tensor]:
        """s of every layer the group terms read (banks and, with scope "all", plain convolutions), float."""
        return {n: kernel_strength(m, self.norms[n]).float() for n, m in {**self.layers, **self.plain}.items()}

    @torch.no_grad()
    def group_strengths(self) -> dict[str, Tensor]:
        """{label: G}, Tensor[groups] on the CPU. An out group's G is its channel's BatchNorm gain |gamma|
        (its kernels' shares of the row sum to 1 in square), comparable across layers."""
        strengths = self._strengths()
        return {label: f.strength(strengths).cpu() for label, f in self.families.items()}

    def relative_group_strengths(self) -> dict[str, Tensor]:
        """{label: G / the family's strongest G}, Tensor[groups] in [0, 1], on the CPU."""
        return {label: g / g.max().clamp_min(1e-30) for label, g in self.group_strengths().items()}

    def groups_total(self) -> dict[str, int]:
        """{label: groups}, e.g. {'conv1 out': 16, 'conv2 in': 16}."""
        return {label: f.size for label, f in self.families.items()}
