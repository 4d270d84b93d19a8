"""One forward pass on zeros, to learn what a model does with its input (order, shapes, data flow)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gaborprune.errors import GaborPruneError


@torch.no_grad()
def probe(model: nn.Module, input_shape: tuple[int, ...], hooks: Iterable[RemovableHandle] = (), batch: int = 1) -> Tensor:
    """Run zeros [batch, *input_shape] through `model` in eval mode, then restore its mode and remove
    `hooks` (the caller's forward hooks, which do the observing).

    Returns:
        The model's output.

    Raises:
        GaborPruneError: the model cannot take that input shape.
    """
    hooks = list(hooks)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
        return model(torch.zeros(batch, *input_shape, device=device, dtype=dtype))
    except Exception as e:  # a user model can raise anything on an input it cannot take
        detail = str(e).splitlines()[0] if str(e) else ""
        raise GaborPruneError(
            f"the model failed on an input of shape {list(input_shape)} ({type(e).__name__}: {detail}); pass its C,H,W with --input-shape"
        ) from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
