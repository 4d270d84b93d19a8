"""`timm:NAME` model sources: any timm model, built with random weights (never downloaded).

timm is an optional dependency (`pip install "gaborprune[timm]"`), imported only when a `timm:`
source is built, so `gaborprune --help` and every other source work without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from gaborprune.errors import ModelSourceError

#: The input a timm model is assumed to take when its configuration names none.
DEFAULT_INPUT_SHAPE = (3, 224, 224)
#: `timm.create_model` arguments that fetch or read weights (a download, a checkpoint file, a cache
#: folder): refused, since a recipe's arguments are data its author chose, and nothing is downloaded.
_FETCHING = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _timm():
    """The timm package, or a ModelSourceError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ModelSourceError('timm models need the optional timm package: pip install "gaborprune[timm]"') from None
    return timm


def timm_builder(name: str) -> Callable[..., nn.Module]:
    """A builder for timm model `name`: `build(**kwargs)` calls `timm.create_model(name,
    pretrained=False, **kwargs)` (e.g. `num_classes`, `drop_rate`).

    Raises:
        ModelSourceError: timm is not installed, or `name` is not a timm model (the message names
            close ones); `build` raises it for an argument that would fetch or read weights
            (`weights`, `pretrained`, `checkpoint_path`, ...), since nothing is downloaded.
    """
    timm = _timm()
    if not name or not timm.is_model(name):
        prefix = name[:4]
        close = timm.list_models(f"{prefix}*")[:8] if prefix else []
        close = close or timm.list_models()[:8]
        raise ModelSourceError(f"unknown timm model '{name}'; e.g. {', '.join(close)} "
                               "(all: python -c 'import timm; print(timm.list_models())')")

    def build(**kwargs: Any) -> nn.Module:
        fetching = [k for k in _FETCHING if kwargs.get(k) not in (None, False)]
        if fetching:
            raise ModelSourceError(f"`{fetching[0]}`: pretrained weights are never downloaded or read by timm here; pass a local state_dict "
                                   "file with `weights` (a timm model's `state_dict()` saved with torch.save)")
        return timm.create_model(name, **{k: v for k, v in kwargs.items() if k not in _FETCHING}, pretrained=False)

    return build


def timm_input_shape(model: nn.Module | None) -> tuple[int, int, int]:
    """The (C, H, W) of `model`'s timm configuration (`pretrained_cfg`, else `default_cfg`:
    `input_size`), or (3, 224, 224) when it names none (or there is no model)."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
            return (int(size[0]), int(size[1]), int(size[2]))
    return DEFAULT_INPUT_SHAPE
