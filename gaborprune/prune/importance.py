"""How much removing a channel costs: the importance `scope` all ranks channels by with a `ratio`.

Two criteria (`PruneSpec.importance`):

- "gain": the channel's G (`Unit.absolute`): for a channel written by a convolution, its BatchNorm
  gain |gamma|. Needs no data; the channel pressure drives it towards 0.
- "taylor": the first-order (Taylor) estimate of the change in the training loss when the channel
  is removed, from gradients on labelled training batches (Molchanov et al., "Importance estimation
  for neural network pruning", 2019). Removing a unit replaces a tensor t by what it holds once the
  unit is gone, t0 (by its out side: its BatchNorm's output becomes the shift beta, a convolution's
  output without BatchNorm 0; by its in side: its readers' input channel 0), so to first order
  the loss changes by sum((t0 - t) * dL/dt) over the batch and every position. That is exact where
  the loss is linear in t. A unit's score is the root mean square of its per-batch estimates (a
  channel whose estimates cancel across batches still matters to each), summed over the tensors
  its removal touches (the writers of a residual stream's channel, the readers of a column).

`taylor_scores` returns {`Unit.key`: score}; `dead_units` ranks by it instead of the gain when given.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune.errors import PruneError

_NORM = nn.modules.batchnorm._BatchNorm


def _channels(g) -> dict[str, list[int]]:
    """{layer: the channel indices of that layer's side} of a group."""
    index = 0 if g.kind == "out" else 1
    return {layer: sorted({k[index] for k in kernels}) for layer, kernels in g.members}


def _removed_value(m: nn.Module) -> Tensor:
    """Per channel, what a BatchNorm outputs once its channel's convolution rows and gain are zeroed
    (`zero_units_`): beta with an affine BatchNorm, -mean / std without."""
    if m.affine:
        return m.bias.detach()
    return -m.running_mean / torch.sqrt(m.running_var + m.eps)


def taylor_estimates(model: nn.Module, input_shape: tuple[int, int, int], batches: Iterable[tuple[Tensor, Tensor]],
                     analysis=None, loss=F.cross_entropy) -> dict[str, list[float]]:
    """{`Unit.key`: [first-order change of `loss` on each batch when the unit is removed]} (see the
    module doc), `model` in eval mode (BatchNorm by its running statistics), nothing in it changed
    and no parameter's gradient touched.

    Raises:
        PruneError: no channel can be removed exactly, or no batch was given.
    """
    from gaborprune.prune.structured import units
    from gaborprune.sparsity import GaborSparsity

    sparsity = GaborSparsity(model, tuple(input_shape), "channel", "all", analysis=analysis)
    found = units(sparsity) if sparsity.groups is not None else []
    if not found:
        raise PruneError("no channel of this model can be removed exactly, so there is nothing to rank")
    modules, norms = dict(model.named_modules()), sparsity.groups.norms
    keys = [u.key for u in found]
    # where each unit's removal shows: (module, "out"/"in") -> the channels read there, per unit
    points: dict[tuple[str, str], list[tuple[str, list[int]]]] = defaultdict(list)
    for key, u in zip(keys, found):
        g = u.groups[u.side]
        for layer, channels in _channels(g).items():
            norm = norms.get(layer) if g.kind == "out" else None
            points[(norm if isinstance(modules.get(norm), _NORM) else layer, g.kind)].append((key, channels))

    seen: list[tuple[tuple[str, str], Tensor, Tensor]] = []  # (point, t, t0 per channel)

    def hook(point):
        name, side = point

        def keep(t: Tensor) -> Tensor:
            """Record t and pass on a copy: an in-place op downstream (ReLU(inplace=True)) then changes
            the copy, so t keeps its values and its gradient is the one through the copy."""
            m = modules[name]
            t0 = _removed_value(m) if side == "out" and isinstance(m, _NORM) else torch.zeros(t.shape[1], device=t.device)
            seen.append((point, t, t0.to(t.dtype)))
            return t.clone()
        if side == "out":
            return modules[name].register_forward_hook(lambda m, args, out: keep(out))
        return modules[name].register_forward_pre_hook(lambda m, args: (keep(args[0]), *args[1:]))

    handles = [hook(p) for p in points]
    estimates: dict[str, list[float]] = defaultdict(list)
    training = model.training
    model.eval()
    try:
        for x, y in batches:
            seen.clear()
            with torch.enable_grad():
                out = model(x.detach().requires_grad_(True))
                grads = torch.autograd.grad(loss(out, y), [t for _, t, _ in seen], allow_unused=True)
            batch: dict[str, float] = defaultdict(float)
            for (point, t, t0), grad in zip(seen, grads):
                if grad is None:
                    continue
                shape = [1, -1] + [1] * (t.dim() - 2)
                per_channel = ((t0.view(shape) - t.detach()) * grad).transpose(0, 1).reshape(t.shape[1], -1).sum(1)
                for key, channels in points[point]:
                    batch[key] += float(per_channel[channels].sum())
            for key in keys:
                estimates[key].append(batch.get(key, 0.0))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    if not estimates or not next(iter(estimates.values())):
        raise PruneError("the Taylor importance needs at least one labelled batch")
    return dict(estimates)


def taylor_scores(model: nn.Module, input_shape: tuple[int, int, int], batches: Iterable[tuple[Tensor, Tensor]],
                  analysis=None, loss=F.cross_entropy) -> dict[str, float]:
    """{`Unit.key`: root mean square over `batches` of its first-order loss change} (see the module doc):
    what `PruneSpec(scope="all", ratio=R, importance="taylor")` ranks channels by, the smallest first."""
    estimates = taylor_estimates(model, input_shape, batches, analysis, loss)
    return {key: (sum(e * e for e in values) / len(values)) ** 0.5 for key, values in estimates.items()}
