"""Gabor banks: the kernel function, the layer, initial fits, and conversion of trained networks."""

from gaborprune.convert.fit import GaborParams, fit_gabor, random_gabor
from gaborprune.convert.kernel import GABOR_PARAMS, gabor_kernel, kernel_grid
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import ConversionReport, ConversionSpec, ConversionStep, LayerConversion, gaborize_, select_layers

__all__ = [
    "GABOR_PARAMS", "ConversionReport", "ConversionSpec", "ConversionStep", "GaborConv2d", "GaborParams", "LayerConversion",
    "fit_gabor", "gabor_kernel", "gaborize_", "kernel_grid", "random_gabor", "select_layers",
]
