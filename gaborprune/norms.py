"""Re-estimating BatchNorm running statistics: the one change conversion and pruning make without gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norms_(model: nn.Module, batches: Iterable[Tensor], *, forward: Callable[[Tensor], object] | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over `batches`.

    Nothing else changes (no gradients, no other buffer or parameter); the model's train/eval mode
    and each norm's momentum are restored. Batches of one sample are skipped (BatchNorm cannot
    take a batch statistic from one).

    Args:
        batches: input batches, Tensor[B, *input_shape], already on the model's device.
        forward: how to run a batch (default `model(x)`); the trainer passes its own for devices
            and memory formats.

    Returns:
        The number of samples the statistics were averaged over (0: nothing to do, or no batch).
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    was_training, seen = model.training, 0
    model.train()
    try:
        for x in batches:
            if len(x) > 1:
                (forward or model)(x)
                seen += len(x)
    finally:
        for m, (momentum, mean, var, count) in zip(norms, saved):
            m.momentum = momentum
            if not seen:  # nothing was averaged: keep what there was
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)
        model.train(was_training)
    return seen
