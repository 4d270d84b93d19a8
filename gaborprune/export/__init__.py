"""Deploy lowering, ONNX export with checks, int8 quantisation, and latency benchmarks."""

from gaborprune.export.lower import FORMS, LayerLowering, LoweringReport, MapBias, SplitConv, fold_batchnorms_, lower, output_groups

__all__ = ["FORMS", "LayerLowering", "LoweringReport", "MapBias", "SplitConv", "fold_batchnorms_", "lower", "output_groups"]
