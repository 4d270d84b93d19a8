"""What a model will cost before it is built: its architecture on the meta device, which holds shapes
and no data.

A builder argument (`channels=4000`, a ViT's `image_size=16000`) or an input shape (3x4096x4096)
that asks for more memory than there is would otherwise be found out by allocating it: minutes of
swapping, a process the kernel kills, or an allocation failure as a traceback. `meta_build` builds
the architecture for nothing, and `check_footprint` counts its weights and what one input's forward
pass produces and refuses the model against `gaborprune._validate.memory_budget` before a byte of it
exists. Command-line sources and recipes go through the same estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gaborprune._validate import _gb, memory_budget
from gaborprune.errors import GaborPruneError


class _NoRandomInit(TorchFunctionMode):
    """Skips drawing random values into meta tensors (there are none to draw): `normal_` on meta
    loads torch's Python decompositions (sympy and 900 modules: a second and 150 MB)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RANDOM_FILLS and args and isinstance(args[0], Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


_RANDOM_FILLS = {Tensor.normal_, Tensor.uniform_, Tensor.log_normal_, Tensor.exponential_, Tensor.geometric_, Tensor.cauchy_,
                 Tensor.random_, Tensor.bernoulli_, torch.nn.init.orthogonal_, torch.nn.init.sparse_}


def meta_build(build: Callable[[], nn.Module]) -> nn.Module | None:
    """`build()` with every tensor on the meta device (no memory, no initialisation cost).

    Returns:
        The meta model, or None when the architecture cannot be built there (a builder that reads
        values, such as torchvision's RegNet, which a model source reports as a `GaborPruneError`
        naming the meta tensor; or a bad argument): then the real build tells, with its own error.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), _NoRandomInit():
            model = build()
    except Exception:  # an operation meta tensors do not support, or what the real build will raise too
        return None
    return model if isinstance(model, nn.Module) else None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def meta_activation_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """`gaborprune.probe.activation_bytes` on a meta model: one sample's input and every leaf
    module's output (in-place results once), or None when the forward pass fails on meta tensors."""
    held: dict[int, Tensor] = {}  # by identity: meta tensors have no addresses; kept alive so ids stay unique

    def count(t: object) -> None:
        if isinstance(t, Tensor):
            held.setdefault(id(t), t)
        elif isinstance(t, (tuple, list)):
            for item in t:
                count(item)

    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape, device="meta", dtype=dtype)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(lambda mod, args, out: count(out)) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        count(model(x))
    except Exception:  # a model that fails on this shape fails again, with its own message, when run for real
        return None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in held.values() if t is not x)


def activation_bound(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """A cheap upper bound on `meta_activation_bytes` for networks whose layers never grow the image:
    the input and each leaf module's output, each at most the widest dimension of any weight times
    the input's pixels, in the weights' element size."""
    tensors = [*model.parameters(), *model.buffers()]
    widest = max([input_shape[0], *(max(t.shape, default=1) for t in tensors)])
    size = max([4, *(t.element_size() for t in tensors if t.is_floating_point())])
    leaves = sum(1 for m in model.modules() if next(m.children(), None) is None)
    return (1 + leaves) * widest * math.prod(input_shape[1:]) * size


def check_footprint(model: nn.Module, input_shape: tuple[int, ...], what: str, error: type[GaborPruneError], weights: int | None = None) -> None:
    """Refuse a meta model whose weights and one input's forward pass would not fit in
    `memory_budget()`, before it is built for real. The forward pass runs on meta tensors only when
    `activation_bound` does not already show that it fits (running it loads a second of torch's
    Python code).

    Args:
        weights: the weight bytes to count, when the model was larger while being built.

    Raises:
        `error`: naming `what`, the estimate (weights and one input), the limit and what to change.
    """
    limit = memory_budget()
    weights = weight_bytes(model) if weights is None else weights
    if limit is None or weights + activation_bound(model, input_shape) <= limit:
        return
    activations = meta_activation_bytes(model, input_shape) or 0  # unknown: the weights alone decide
    need = weights + activations
    if need <= limit:
        return
    shown = "x".join(map(str, input_shape))
    parts = f"{_gb(weights)} of weights" + (f" and {_gb(activations)} for one {shown} input" if activations else "")
    change = "a smaller `input_shape`" if activations > weights else "smaller model arguments"
    raise error(f"{what} needs about {_gb(need)} of memory ({parts}, estimated before building), "
                f"more than the {_gb(limit)} available; give {change}")
