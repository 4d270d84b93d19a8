"""gaborprune: compress CNNs with learnable Gabor banks.

    import gaborprune as gp
    model, recipe = gp.load_model("resnet20")
    report = gp.convert_model(model, recipe, gp.ConversionSpec(first=2))
    gp.save_recipe("resnet20-gabor.pt", model, recipe)
    gp.prune_model(model, recipe, gp.PruneSpec(threshold=0.05))   # after fine-tuning with sparsity

Names are imported on first use, so `gaborprune --help` does not wait for torch.
"""

from __future__ import annotations

from gaborprune._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "GABOR_PARAMS": "gaborprune.convert",
    "ConversionReport": "gaborprune.convert",
    "ConversionSpec": "gaborprune.convert",
    "GaborConv2d": "gaborprune.convert",
    "fit_gabor": "gaborprune.convert",
    "gabor_kernel": "gaborprune.convert",
    "gaborize_": "gaborprune.convert",
    "GaborPruneError": "gaborprune.errors",
    "ExportConfig": "gaborprune.export.api",
    "export_model": "gaborprune.export.api",
    "describe_onnx": "gaborprune.export.inspect_onnx",
    "evaluate_onnx": "gaborprune.export.inspect_onnx",
    "lower": "gaborprune.export.lower",
    "ModelSource": "gaborprune.models",
    "PrunePlan": "gaborprune.prune",
    "PruneReport": "gaborprune.prune",
    "PruneSpec": "gaborprune.prune",
    "apply_plan_": "gaborprune.prune",
    "prune_model": "gaborprune.prune",
    "TargetSpec": "gaborprune.prune",
    "prune_to_target": "gaborprune.prune",
    "Recipe": "gaborprune.recipe",
    "convert_model": "gaborprune.recipe",
    "load_model": "gaborprune.recipe",
    "read_recipe": "gaborprune.recipe",
    "save_recipe": "gaborprune.recipe",
    "ModelSummary": "gaborprune.summary",
    "summarize": "gaborprune.summary",
    "set_threads": "gaborprune._threads",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
