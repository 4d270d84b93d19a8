"""gaborprune: compress CNNs with learnable Gabor banks.

    model, recipe = gaborprune.load_model("resnet20")
    report = gaborprune.convert(model, recipe, gaborprune.ConversionSpec(first=2))
    gaborprune.save_recipe("resnet20-gabor.pt", model, recipe)
"""

__version__ = "0.1.0"

from gaborprune.convert import (  # noqa: E402
    GABOR_PARAMS,
    ConversionReport,
    ConversionSpec,
    GaborConv2d,
    fit_gabor,
    gabor_kernel,
    gaborize_,
)
from gaborprune.errors import GaborPruneError  # noqa: E402
from gaborprune.models import ModelSource  # noqa: E402
from gaborprune.recipe import Recipe, load_model, read_recipe, save_recipe  # noqa: E402
from gaborprune.summary import ModelSummary, summarize  # noqa: E402


def convert(model, recipe: Recipe, spec: ConversionSpec) -> ConversionReport:
    """Convert the layers `spec` selects to Gabor banks in place and record it in `recipe`."""
    report = gaborize_(model, spec, recipe.input_shape)
    recipe.record(report)
    return report


__all__ = [
    "GABOR_PARAMS", "ConversionReport", "ConversionSpec", "GaborConv2d", "GaborPruneError", "ModelSource",
    "ModelSummary", "Recipe", "__version__", "convert", "fit_gabor", "gabor_kernel", "gaborize_", "load_model",
    "read_recipe", "save_recipe", "summarize",
]
