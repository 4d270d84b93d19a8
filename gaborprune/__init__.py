"""gaborprune: compress CNNs with learnable Gabor banks.

    import gaborprune as gp
    model, recipe = gp.load_model("resnet20")
    report = gp.gaborize_(model, gp.ConversionSpec(first=2), recipe.input_shape)   # verbs ending in _ change the model
    recipe = recipe.with_step(report.step)                                        # the recipe records it
    gp.save_recipe("resnet20-gabor.pt", model, recipe)
    report = gp.prune_model_(model, recipe.input_shape, gp.PruneSpec(threshold=0.02))   # after fine-tuning with sparsity
    recipe = recipe.with_step(report.step)

Names are imported on first use, so `gaborprune --help` does not wait for torch.
"""

from __future__ import annotations

from gaborprune._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "GABOR_PARAMS": "gaborprune.convert",
    "ConversionReport": "gaborprune.convert",
    "ConversionSpec": "gaborprune.convert",
    "ConversionStep": "gaborprune.convert",
    "GaborConv2d": "gaborprune.convert",
    "fit_gabor": "gaborprune.convert",
    "gabor_kernel": "gaborprune.convert",
    "gaborize_": "gaborprune.convert",
    "GaborPruneError": "gaborprune.errors",
    "PruneError": "gaborprune.errors",
    "RecipeError": "gaborprune.errors",
    "ExportConfig": "gaborprune.export.api",
    "export_model": "gaborprune.export.api",
    "describe_onnx": "gaborprune.export.inspect_onnx",
    "evaluate_onnx": "gaborprune.export.inspect_onnx",
    "lower": "gaborprune.export.lower",
    "ModelSource": "gaborprune.models",
    "recalibrate_norms_": "gaborprune.norms",
    "PrunePlan": "gaborprune.prune",
    "PruneReport": "gaborprune.prune",
    "PruneSpec": "gaborprune.prune",
    "PruneStep": "gaborprune.prune",
    "apply_plan_": "gaborprune.prune",
    "prune_model_": "gaborprune.prune",
    "taylor_scores": "gaborprune.prune.importance",
    "TargetReport": "gaborprune.search",
    "TargetSpec": "gaborprune.search",
    "prune_to_target_": "gaborprune.search",
    "Recipe": "gaborprune.recipe",
    "load_model": "gaborprune.recipe",
    "read_recipe": "gaborprune.recipe",
    "save_recipe": "gaborprune.recipe",
    "ModelSummary": "gaborprune.summary",
    "summarize": "gaborprune.summary",
    "set_threads": "gaborprune._threads",
    "FinetuneStep": "gaborprune.train.config",
    "TrainConfig": "gaborprune.train.config",
    "finetune_": "gaborprune.train.loop",
    "Pressure": "gaborprune.train.pressure",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
