"""One forward pass on zeros, to learn what a model does with its input (order, shapes, data flow)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gaborprune.errors import InputShapeError


@torch.no_grad()
def probe(model: nn.Module, input_shape: tuple[int, ...], hooks: Iterable[RemovableHandle] = (), batch: int = 1) -> Tensor:
    """Run zeros [batch, *input_shape] through `model` in eval mode, then restore its mode and remove
    `hooks` (the caller's forward hooks, which do the observing).

    Returns:
        The model's output.

    Raises:
        InputShapeError: the model cannot take that input shape, or a strided layer receives an
            input smaller than its stride (the image is smaller than the network's total stride:
            resnet20 "runs" on 1x1 pixels, computing nothing meaningful).
    """
    hooks = list(hooks)
    too_small: list[str] = []
    hooks += [m.register_forward_pre_hook(lambda mod, args, n=n: _check_stride(n, mod, args, too_small))
              for n, m in model.named_modules() if _stride(m) is not None]
    was_training = model.training
    model.eval()
    shown = "x".join(map(str, input_shape))
    try:
        param = next(model.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
        out = model(torch.zeros(batch, *input_shape, device=device, dtype=dtype))
    except Exception as e:  # a user model can raise anything on an input it cannot take
        detail = str(e).splitlines()[0] if str(e) else ""
        raise InputShapeError(
            f"the model failed on an input of shape {list(input_shape)} ({type(e).__name__}: {detail}); pass its C,H,W with `input_shape`"
        ) from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if too_small:
        raise InputShapeError(f"the model cannot run on input {shown}: {too_small[0]}, smaller than its stride; give a larger `input_shape`")
    return out


def _stride(module: nn.Module) -> tuple[int, int] | None:
    """The spatial stride of a downsampling layer (convolutions, pooling, Gabor and CADA layers), else None."""
    stride = getattr(module, "stride", None)
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride, stride)
    if isinstance(stride, (tuple, list)) and len(stride) == 2 and all(isinstance(s, int) for s in stride):
        return tuple(stride) if max(stride) > 1 else None
    return None


def _check_stride(name: str, module: nn.Module, args: tuple, too_small: list[str]) -> None:
    x = args[0] if args else None
    if not too_small and isinstance(x, Tensor) and x.ndim == 4:
        (sh, sw), (h, w) = _stride(module), x.shape[-2:]
        if h < sh or w < sw:
            too_small.append(f"layer '{name}' (stride {sh}x{sw}) gets a {h}x{w} input")


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Bytes one sample's forward pass produces: its input and every leaf module's output (in-place
    results counted once), as if nothing were freed. An upper bound on what a pass holds at once for
    deep networks and about that for shallow ones; times a batch size, it tells whether a batch can fit
    before one is allocated (`gaborprune._validate.check_batch_memory`).
    """
    held: dict[int, Tensor] = {}  # kept alive, so that a freed tensor's address is not reused and missed

    def count(t: object) -> None:
        if isinstance(t, Tensor):
            held.setdefault(t.data_ptr(), t)
        elif isinstance(t, (tuple, list)):
            for item in t:
                count(item)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    count(probe(model, input_shape, [m.register_forward_hook(lambda mod, args, o: count(o)) for m in leaves]))
    x = torch.zeros(input_shape)
    return x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in held.values())
