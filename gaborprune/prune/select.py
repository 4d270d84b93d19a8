"""Which Gabor kernels are dead: by a relative-strength threshold or to a budget. Never mutates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gaborprune._validate import is_int
from gaborprune.errors import PruneError
from gaborprune.scopes import IMPORTANCES, SCOPES
from gaborprune.sparsity import GaborSparsity
from gaborprune.strength import DEFAULT_THRESHOLD


@dataclass(frozen=True)
class PruneSpec:
    """How to choose the kernels to remove.

    Kernel strength is the BatchNorm-scale-invariant measure of `gaborprune.sparsity`, relative to
    the strongest kernel of its layer. A layer with a budget (its own, or the global one) keeps its
    strongest kernels up to the budget; every other layer keeps the kernels at or above `threshold`.

    Attributes:
        threshold: in [0, 1); a kernel weaker than `threshold` x its layer's strongest is removed.
        ratio: remove this fraction, in [0, 1), of all Gabor kernels: the weakest across all layers
            without a budget of their own, ranked by relative strength. With scope "all": of the
            channels that can go exactly, the weakest first (instead of `threshold`; the Gabor banks'
            kernels are still chosen by `threshold`).
        keep: keep this many kernels across all layers without a budget of their own.
        layer_ratio: {layer: fraction of that layer's kernels to remove}.
        layer_keep: {layer: kernels that layer keeps}.
        scope: "banks" (default): kernels of the Gabor banks, and the channels that leaves empty or
            unread; "all": also whole channels of every convolution whose channel group is weaker than
            `threshold` x its family's strongest (`gaborprune.prune.structured`).
        round_to: with scope "all" only, each layer (or residual stream) keeps a multiple of this many
            channels; None or 1: any count.
        module: the part of the model the channel analysis reads (`gaborprune.prune.part`): a
            module path, "" for the whole model; None (default): the whole model when torch.fx
            traces it, else its `backbone` (detectors).
        importance: with scope "all" and a `ratio` (or a target), what ranks the channels (`gaborprune.prune.importance`):
            "gain" (the BatchNorm gain) or "taylor" (the first-order loss change of removing each, which
            `prune_model_` then needs as `scores`); None: "taylor" where the workflow has training data
            (`prune --data`: on CIFAR-10 it kept 77.9% at MAC ratio 0.49 where the gain kept 63.8% at
            0.43, docs/benchmarks.md), else "gain".

    Kernels removed before (masked) count as removed: budgets are fractions of a layer's full size.
    """

    threshold: float = DEFAULT_THRESHOLD
    ratio: float | None = None
    keep: int | None = None
    layer_ratio: dict[str, float] = field(default_factory=dict)
    layer_keep: dict[str, int] = field(default_factory=dict)
    scope: str = "banks"
    round_to: int | None = None
    importance: str | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if self.module is not None and not (isinstance(self.module, str) and all(p.isidentifier() or p.isdigit() for p in self.module.split("."))
                                            or self.module == ""):
            raise PruneError(f"`module` must be a module path such as 'backbone' or 'backbone.body', not {self.module!r}")
        if self.scope not in SCOPES:
            raise PruneError(f"unknown `scope` '{self.scope}'; known: {', '.join(SCOPES)}")
        if self.round_to is not None and not (is_int(self.round_to) and 1 <= self.round_to <= 1024):
            raise PruneError(f"`round_to` must be a channel count from 1 to 1024, not {self.round_to!r}")
        if self.round_to is not None and self.scope != "all":
            raise PruneError("`round_to` counts channels that `scope` all removes; add `scope` all or drop `round_to`")
        if self.importance is not None and self.importance not in IMPORTANCES:
            raise PruneError(f"unknown `importance` '{self.importance}'; known: {', '.join(IMPORTANCES)}")
        if self.importance == "taylor" and self.scope != "all":
            raise PruneError(f"`importance` {self.importance} ranks the channels that `scope` all removes; add `scope` all, or drop `importance`")
        if self.scope == "all" and (self.keep is not None or self.layer_ratio or self.layer_keep):
            raise PruneError("`scope` all removes channels by `threshold` or `ratio`; `keep`, `layer_ratio` and `layer_keep` count kernels of the "
                             "Gabor banks (use `scope` banks)")
        if not 0 <= self.threshold < 1:
            raise PruneError(f"`threshold` must be in [0, 1) (a fraction of the layer's strongest kernel), not {self.threshold}")
        if self.ratio is not None and self.keep is not None:
            raise PruneError("give a global `ratio` or a global `keep`, not both")
        for name, r in [("", self.ratio)] + list(self.layer_ratio.items()):
            if r is not None and not 0 <= r < 1:
                raise PruneError(f"`{'layer_ratio' if name else 'ratio'}` {name + '=' if name else ''}{r} is out of range; "
                                 "it is the fraction of kernels removed, in [0, 1)")
        for name, k in [("", self.keep)] + list(self.layer_keep.items()):
            if k is not None and k < 1:
                raise PruneError(f"`{'layer_keep' if name else 'keep'}` {name + '=' if name else ''}{k} would remove every kernel; keep at least 1")
        both = sorted(set(self.layer_ratio) & set(self.layer_keep))
        if both:
            raise PruneError(f"layer '{both[0]}' has both a `layer_ratio` and a `layer_keep`; give one")

    def to_dict(self) -> dict:
        d = {"threshold": self.threshold, "ratio": self.ratio, "keep": self.keep,
             "layer_ratio": dict(self.layer_ratio), "layer_keep": dict(self.layer_keep)}
        return (d | ({"scope": self.scope, "round_to": self.round_to} if self.scope != "banks" else {})
                | ({"importance": self.importance} if self.importance is not None else {})
                | ({"module": self.module} if self.module is not None else {}))

    @classmethod
    def from_dict(cls, d: dict) -> PruneSpec:
        return cls(**d)

    def describe(self, layers: list[str] | None = None) -> str:
        """One line, e.g. 'threshold 0.05' or 'conv1: remove 83%, conv2: keep 15'. With the model's
        Gabor layer names, the rule for the other layers is left out when there are none."""
        parts = [f"{n}: remove {r:.0%}" for n, r in self.layer_ratio.items()]
        parts += [f"{n}: keep {k}" for n, k in self.layer_keep.items()]
        if layers is not None and set(layers) <= set(self.layer_ratio) | set(self.layer_keep):
            return ", ".join(parts)
        rest = "others: " if parts else ""
        if self.ratio is not None and self.scope == "all":
            by = "by their Taylor loss change" if self.importance == "taylor" else "weakest first"
            parts.append(f"remove {self.ratio:.0%} of the removable channels ({by})")
        elif self.ratio is not None:
            parts.append(f"{rest}remove {self.ratio:.0%} (weakest across layers)")
        elif self.keep is not None:
            parts.append(f"{rest}keep {self.keep} (strongest across layers)")
        else:
            parts.append(f"{rest}threshold {self.threshold:g}")
        if self.scope == "all":
            parts.append(f"channels of every convolution{f' (multiples of {self.round_to})' if self.round_to and self.round_to > 1 else ''}")
        if self.module:
            parts.append(f"in '{self.module}'")
        return ", ".join(parts)


def _strongest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries (ties broken by position, so the choice is reproducible)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores.flatten().double().cpu(), descending=True, stable=True).indices
        keep[order[:k]] = True
    return keep.view(scores.shape)


def select_kernels(model: nn.Module, input_shape: tuple[int, int, int], spec: PruneSpec, analysis=None) -> dict[str, Tensor]:
    """The kernels each Gabor bank keeps under `spec` (`analysis`: a `ModelAnalysis` of `model` to reuse).

    Returns:
        {layer: bool Tensor[C_out, C_in / groups]} (True: keep), for every Gabor bank, on the CPU.

    Raises:
        PruneError: the model has no Gabor bank, a named layer is not one, or the budget would
            remove every kernel of a layer.
    """
    sparsity = GaborSparsity(model, input_shape, analysis=analysis)
    if not sparsity and spec.scope == "all":
        return {}
    if not sparsity:
        raise PruneError("the model has no Gabor banks to prune; convert some layers first "
                         "(e.g. the first two convolutions), fine-tune with `sparsity`, then prune")
    for name in list(spec.layer_ratio) + list(spec.layer_keep):
        if name not in sparsity.layers:
            raise PruneError(f"'{name}' is not a Gabor bank of this model; Gabor banks: {', '.join(sparsity.layers)}")
    strength = {n: s.cpu() for n, s in sparsity.relative_strengths().items()}
    present = {n: m.mask.cpu() != 0 for n, m in sparsity.layers.items()}
    keep: dict[str, Tensor] = {}
    for name, s in strength.items():
        total = s.numel()
        if name in spec.layer_ratio:
            keep[name] = present[name] & _strongest(s, total - round(spec.layer_ratio[name] * total))
        elif name in spec.layer_keep:
            if spec.layer_keep[name] > total:
                raise PruneError(f"`layer_keep` {name}={spec.layer_keep[name]}: the layer has only {total} kernels")
            keep[name] = present[name] & _strongest(s, spec.layer_keep[name])
        elif (spec.ratio is None or spec.scope == "all") and spec.keep is None:  # scope all's ratio counts channels
            keep[name] = present[name] & (s >= spec.threshold)
    pooled = [n for n in strength if n not in keep]
    if pooled:  # the global budget, ranked across layers by strength relative to each layer's strongest
        scores = torch.cat([strength[n].flatten() for n in pooled])
        total = scores.numel()
        k = total - round(spec.ratio * total) if spec.ratio is not None else spec.keep
        if k > total:
            raise PruneError(f"`keep` {k}: the Gabor banks have only {total} kernels")
        chosen = _strongest(scores, k).split([strength[n].numel() for n in pooled])
        for n, c in zip(pooled, chosen):
            keep[n] = present[n] & c.view(strength[n].shape)
    for name, k in keep.items():
        if not k.any():
            raise PruneError(f"that would remove every kernel of '{name}' and cut the network in two; "
                             "lower `ratio` or `threshold`, or raise `keep`")
    return {n: keep[n] for n in strength}
