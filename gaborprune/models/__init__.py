"""Model sources: one spec string names a model wherever the CLI or API takes one.

- a built-in CIFAR network: resnet20, resnet32, resnet56, resnet20_altered, vgg11/13/16/19, cada_net;
- `torchvision:NAME`: any torchvision classification, detection or segmentation model (weights from a
  local file only; a detector's input shape is its transform's image size);
- `timm:NAME`: any timm model (the optional extra `gaborprune[timm]`; random weights or a local file);
- `package.module:factory`: a user's own callable returning an `nn.Module`;
- a gaborprune recipe file (`.pt`), handled by `gaborprune.recipe.load_model`.

A factory named on the command line or in code is the user's choice and is called. A factory named
inside a recipe file is code chosen by whoever wrote the file, so a recipe only rebuilds it when the
user trusts it (`trusted_factory`).
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaborprune._io import safe_torch_load
from gaborprune.errors import ModelSourceError
from gaborprune.models.cifar import BUILTINS

_OTHER_FORMS = "torchvision:NAME, timm:NAME, package.module:factory, or a recipe .pt file"
TRUST_ENV = "GABORPRUNE_TRUSTED_MODULES"


@dataclass(frozen=True)
class ModelSource:
    """How to build a model's architecture from nothing (weights come separately).

    Attributes:
        spec: a built-in name, `torchvision:NAME` or `package.module:factory`.
        num_classes: passed to the builder when given.
        kwargs: extra keyword arguments for the builder (JSON-compatible values).
    """

    spec: str
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes is not None and self.num_classes < 1:
            raise ModelSourceError(f"`num_classes` must be at least 1, not {self.num_classes}")

    @property
    def kind(self) -> str:
        if self.spec.startswith("torchvision:"):
            return "torchvision"
        if self.spec.startswith("timm:"):
            return "timm"
        if ":" in self.spec:
            return "factory"
        return "builtin"

    def build(self) -> nn.Module:
        """A fresh model with default initialisation. Raises ModelSourceError."""
        builder = {"builtin": _builtin, "torchvision": _torchvision, "timm": _timm, "factory": _factory}[self.kind](self.spec)
        kwargs = dict(self.kwargs)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        try:
            model = builder(**kwargs)
        except TypeError as e:
            raise ModelSourceError(f"model '{self.spec}' does not take these arguments {kwargs}: {e}") from None
        except (ValueError, RuntimeError, ArithmeticError) as e:  # ArithmeticError: e.g. a zero width divides in an init
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSourceError(f"model '{self.spec}' could not be built{f' with {kwargs}' if kwargs else ''}: {detail}") from None
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"factory '{self.spec}' returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def input_shape(self, model: nn.Module | None = None) -> tuple[int, int, int]:
        """The (C, H, W) the model expects: 32x32 for the CIFAR nets; for torchvision models the
        built architecture's fixed `image_size` (ViT) or else the pretrained crop size; 224x224 for
        factories (override with --input-shape)."""
        if self.kind == "builtin":
            return (3, 32, 32)
        if self.kind == "torchvision":
            fixed = getattr(model, "image_size", None)
            if isinstance(fixed, int):
                return (3, fixed, fixed)
            transform = getattr(model, "transform", None)  # a detector's resizing: SSD's fixed size, else the shorter side
            side = getattr(transform, "fixed_size", None) or getattr(transform, "min_size", None)
            if isinstance(side, (tuple, list)) and side and all(isinstance(v, int) for v in side):
                return (3, side[0], side[-1]) if len(side) == 2 and getattr(transform, "fixed_size", None) else (3, side[0], side[0])
            name = self.spec.split(":", 1)[1]
            try:
                weights = torchvision_models().get_model_weights(name).DEFAULT
                keywords = weights.transforms.keywords
                crop = keywords.get("crop_size", keywords.get("resize_size", 224))  # segmenters: the resize
                crop = crop[0] if isinstance(crop, (list, tuple)) else crop
                return (3, int(crop), int(crop))
            except (ValueError, AttributeError, KeyError):
                return (3, 224, 224)
        if self.kind == "timm":
            from gaborprune.models.timm_models import timm_input_shape

            return timm_input_shape(model)
        return (3, 224, 224)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "num_classes": self.num_classes, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        return cls(d["spec"], d.get("num_classes"), dict(d.get("kwargs") or {}))


def torchvision_models():
    import torchvision.models

    return torchvision.models


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (not detection, segmentation, video...)."""
    return sorted(torchvision_models().list_models(module=torchvision_models()))


def torchvision_detectors() -> list[str]:
    """Names of torchvision's detection and segmentation models (SSD, Faster R-CNN, RetinaNet, FCOS,
    Mask/Keypoint R-CNN; LR-ASPP, DeepLabV3, FCN)."""
    tv = torchvision_models()
    return sorted(tv.list_models(module=tv.detection) + tv.list_models(module=tv.segmentation))


def _builtin(spec: str):
    if spec not in BUILTINS:
        raise ModelSourceError(f"unknown model '{spec}'; known: {', '.join(BUILTINS)}, or {_OTHER_FORMS}")
    return BUILTINS[spec]


def _torchvision(spec: str):
    name = spec.split(":", 1)[1]
    detector = name in torchvision_detectors()
    known = torchvision_classifiers()
    if name not in known and not detector:
        close = [k for k in known + torchvision_detectors() if k.startswith(name[:4])][:8] or known[:8]
        raise ModelSourceError(f"unknown torchvision classification, detection or segmentation model '{name}'; e.g. {', '.join(close)} "
                               "(all: python -c 'import torchvision; print(torchvision.models.list_models())')")

    def build(**kwargs):
        for key in ("weights", "weights_backbone"):
            if kwargs.get(key) is not None:
                raise ModelSourceError(f"pretrained weights are never downloaded (`{key}`); pass a local state_dict with `weights`")
        if detector:  # their builders would fetch ImageNet weights for the backbone by default
            kwargs["weights_backbone"] = None
        return torchvision_models().get_model(name, weights=None, **kwargs)

    return build


def _timm(spec: str):
    from gaborprune.models.timm_models import timm_builder

    return timm_builder(spec.split(":", 1)[1])


def trusted_factory(spec: str) -> bool:
    """Whether the environment trusts the factory `spec` (`package.module:factory`): its module, or a
    package above it, is listed in GABORPRUNE_TRUSTED_MODULES (comma-separated module names).

    A listed package trusts its submodules because importing `pkg.sub` runs `pkg` anyway.
    """
    module = spec.partition(":")[0]
    listed = {m.strip() for m in os.environ.get(TRUST_ENV, "").split(",")} - {""}
    return any(module == m or module.startswith(m + ".") for m in listed)


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def _factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSourceError(f"model spec '{spec}' is not package.module:factory")
    if not all(part.isidentifier() for part in module_name.split(".")):  # '.x' would be a relative import
        raise ModelSourceError(f"model spec '{spec}': '{module_name}' is not a module name (package.module, no leading dot); "
                               "give package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"cannot import module '{module_name}' for model '{spec}': {e}; is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSourceError(f"module '{module_name}' has no callable '{attr}' (model '{spec}')")
    return factory


def pretrained_hint(source: ModelSource, weights: str) -> str:
    """A message for a --weights value that names a pretrained weight set instead of a file."""
    if source.kind == "torchvision":
        name = source.spec.split(":", 1)[1]
        try:
            enum = torchvision_models().get_model_weights(name)
            entry = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
            return (
                f"weights file '{weights}' not found; pretrained weights are never downloaded here. "
                f"Fetch {entry.url} on a machine with internet and pass the saved file with `weights`"
            )
        except (KeyError, ValueError, AttributeError):
            pass
    return f"weights file '{weights}' not found; pass the path of a saved state_dict"


def load_state_dict_file(model: nn.Module, path: str, source: ModelSource) -> None:
    """Load a state_dict (or a {"state_dict"/"model": ...} checkpoint) from a local file into `model`.

    Raises:
        ModelSourceError: missing file, unsafe or corrupt file, or weights that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(pretrained_hint(source, path))
    obj = safe_torch_load(p, "weights file", ModelSourceError)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ModelSourceError(f"weights file '{path}' does not hold a state_dict of tensors")
    bad = non_finite(obj)
    if bad:
        raise ModelSourceError(f"weights file '{path}' has NaN or infinite values in '{bad[0]}'"
                               + (f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else "") + "; it is corrupt or from a diverged run")
    metadata = getattr(obj, "_metadata", None)
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())
        if metadata is not None:
            metadata = OrderedDict((k.removeprefix("module").removeprefix("."), v) for k, v in metadata.items())
    if metadata is not None:  # per-module versions, which some models' loaders need (MNASNet)
        obj = OrderedDict(obj)
        obj._metadata = metadata
    fit_state_dict(model, obj, f"weights file '{path}'", f"model '{source.spec}'")


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating"
    return "bool" if t.dtype == torch.bool else "integer"


def state_dict_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """How `state` fails to fit a model whose own state_dict is `own` (which may be on the meta
    device): missing and unexpected names, other shapes, and another kind of number (a complex or
    integer tensor where the model holds floats: copying would drop its imaginary part or mean
    nothing). Half and double weights fit float ones. Empty when it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    kinds = [f"{k} {state[k].dtype} vs {v.dtype}".replace("torch.", "") for k, v in own.items()
             if k in state and state[k].shape == v.shape and _kind(state[k]) != _kind(v)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape (e.g. {', '.join(wrong[:2])})")
    if kinds:
        parts.append(f"{len(kinds)} of another kind of number (e.g. {', '.join(kinds[:2])})")
    return parts


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str, target: str) -> None:
    """`model.load_state_dict(state)` with a one-line error naming the first mismatches (`state_dict_problems`)."""
    parts = state_dict_problems(model.state_dict(), state)
    if parts:
        raise ModelSourceError(f"{what} does not fit {target}: {'; '.join(parts)}; check the model name and `num_classes`")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        raise ModelSourceError(f"{what} could not be loaded into {target}: {str(e).splitlines()[0]}") from None


def portable_state_dict(model: nn.Module) -> OrderedDict:
    """`model.state_dict()` on the CPU, detached, keeping the per-module version metadata
    (`_metadata`, which `torch.load(weights_only=True)` restores and some models need)."""
    state = model.state_dict()
    out = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", OrderedDict())
    return out

