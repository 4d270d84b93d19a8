"""Recipes: the project's checkpoint format.

A recipe is a plain dict of strings, numbers, lists and tensors, so it loads with
`torch.load(weights_only=True)` and nothing in it can run code:

    {"format": "gaborprune.recipe", "version": 1, "gaborprune_version": "0.1.0",
     "source": {"spec", "num_classes", "kwargs"}, "input_shape": [C, H, W],
     "conversions": [{"spec": {...}, "layers": [names]}],   # replayed in order
     "prune_plans": [{"kernels", "channels", "spec", "after_conversions"}],  # replayed after that many conversions
     "metadata": {...},                                     # metrics, history
     "state_dict": {name: Tensor}}

The architecture is rebuilt by replay (build the source, re-apply each conversion and the prune
plan), then the state_dict is loaded strictly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaborprune import __version__
from gaborprune._io import safe_torch_load, write_atomic
from gaborprune.convert.spec import ConversionReport, ConversionSpec, gaborize_
from gaborprune.errors import ModelSourceError, RecipeError
from gaborprune.models import ModelSource, fit_state_dict, load_state_dict_file, portable_state_dict

FORMAT = "gaborprune.recipe"
VERSION = 1


@dataclass
class Recipe:
    """Everything needed to rebuild a model except its weights."""

    source: ModelSource
    input_shape: tuple[int, int, int]
    conversions: list[dict[str, Any]] = field(default_factory=list)
    prune_plans: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """The architecture by replay, with fresh (not trained) weights."""
        from gaborprune.prune.plan import PrunePlan, apply_plan_

        model = self.source.build()
        plans = sorted(self.prune_plans, key=lambda p: p.get("after_conversions", 0))  # stable: keeps their order
        for k, record in enumerate([*self.conversions, None]):
            while plans and plans[0].get("after_conversions", 0) <= k:
                apply_plan_(model, PrunePlan.from_dict(plans.pop(0)))
            if record is not None:
                gaborize_(model, ConversionSpec.from_dict(record["spec"]), layers=record["layers"], init="none")
        return model

    def record(self, report: ConversionReport) -> None:
        """Append a conversion that was just applied to the model."""
        self.conversions.append({"spec": report.spec.to_dict(), "layers": report.layer_names})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "gaborprune_version": __version__,
            "source": self.source.to_dict(),
            "input_shape": list(self.input_shape),
            "conversions": self.conversions,
            "prune_plans": self.prune_plans,
            "metadata": self.metadata,
        }


def convert_model(model: nn.Module, recipe: Recipe, spec: ConversionSpec) -> ConversionReport:
    """Convert the layers `spec` selects to Gabor banks in place and record it in `recipe`."""
    report = gaborize_(model, spec, recipe.input_shape)
    recipe.record(report)
    return report


def save_recipe(path: str | os.PathLike, model: nn.Module, recipe: Recipe, *, force: bool = False) -> Path:
    """Write `model`'s weights with `recipe`, atomically; refuses to overwrite unless `force`."""
    return save_payload(path, model, recipe, force=force)


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw, validated contents of a recipe file (plain data and tensors). Raises RecipeError."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"recipe file '{p}' not found")
    if not p.is_file():
        raise RecipeError(f"recipe path '{p}' is not a file")
    obj = safe_torch_load(p, "recipe", RecipeError)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise RecipeError(f"'{p}' is a plain state_dict, not a recipe; pass it as --weights with its model name")
        raise RecipeError(f"'{p}' is not a gaborprune recipe")
    if obj.get("version", 0) > VERSION:
        raise RecipeError(f"recipe '{p}' has format version {obj['version']}, newer than this gaborprune reads ({VERSION}); upgrade gaborprune")
    missing = [k for k in ("source", "input_shape", "conversions", "state_dict") if k not in obj]
    if missing:
        raise RecipeError(f"recipe '{p}' is incomplete (missing {', '.join(missing)}); it may be corrupt")
    return obj


def read_recipe(path: str | os.PathLike) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """Read a recipe file safely: (recipe, state_dict). Raises RecipeError."""
    obj = read_payload(path)
    try:
        recipe = Recipe(
            ModelSource.from_dict(obj["source"]), tuple(obj["input_shape"]), list(obj["conversions"]),
            list(obj.get("prune_plans") or []), dict(obj.get("metadata") or {}),
        )
    except (KeyError, TypeError) as e:
        raise RecipeError(f"recipe '{path}' is malformed ({e}); it may be corrupt") from None
    return recipe, obj["state_dict"]


def save_payload(path: str | os.PathLike, model: nn.Module, recipe: Recipe, extra: dict[str, Any] | None = None, *, force: bool = False) -> Path:
    """Write a recipe with extra top-level entries (plain data and tensors), atomically."""
    payload = recipe.to_dict() | (extra or {})
    payload["state_dict"] = portable_state_dict(model)
    return write_atomic(path, lambda tmp: torch.save(payload, tmp), force)


def is_recipe_path(spec: str) -> bool:
    return spec.endswith((".pt", ".pth")) or os.path.isfile(spec)


def load_model(
    spec: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    model_args: dict[str, Any] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> tuple[nn.Module, Recipe]:
    """Build a model from any model source, with its weights, and the recipe that describes it.

    Args:
        spec: a built-in name, `torchvision:NAME`, `package.module:factory`, or a recipe file.
        num_classes: classifier size (not for recipes, which fix it).
        weights: a local state_dict file for a fresh source.
        model_args: extra builder keyword arguments (e.g. {"k1": 9} for resnet20_altered).
        input_shape: (C, H, W) override.

    Returns:
        (model in train mode on the CPU, its recipe).
    """
    if is_recipe_path(spec):
        if num_classes is not None or weights is not None or model_args:
            raise ModelSourceError(f"'{spec}' is a recipe, which fixes its classes, weights and model arguments; drop --num-classes/--weights/--model-arg")
        recipe, state = read_recipe(spec)
        model = recipe.build()
        fit_state_dict(model, state, f"the state_dict in '{spec}'", "its own architecture (corrupt recipe?)")
        if input_shape is not None:
            recipe.input_shape = input_shape
        return model, recipe
    source = ModelSource(spec, num_classes, dict(model_args or {}))
    model = source.build()
    if weights is not None:
        load_state_dict_file(model, weights, source)
    return model, Recipe(source, input_shape or source.input_shape(model))
