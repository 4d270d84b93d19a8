"""Conversion of the early convolutions of torchvision classification models.

Requirement: conversion must work on the early convolutions of every torchvision classification
model, grouped and depthwise ones included (MobileNet, ShuffleNet, RegNet, ResNeXt, ConvNeXt,
EfficientNet, DenseNet, VGG, ResNet, ...).

`test_family_representative` (fast) takes one model per family, converts its first K convolutions
in execution order (K chosen so that a grouped or depthwise convolution is among them where the
family has one) and checks, against oracles that do not trust the converted layer:

(a) each selected layer is now a GaborConv2d with the hyper-parameters of the convolution it
    replaced, and the reported fit error is finite, below 1 (better than a zero kernel) and equal to
    ||w - g|| / ||w|| recomputed from a copy of the original weights;
(b) the converted model computes exactly what the ORIGINAL architecture computes once each
    converted layer's materialised kernels (`layer.weight`, and bias) are written into a deep copy
    taken before conversion: same logits, and same activations at every converted layer (the
    latter matters where a block's output is scaled down, e.g. ConvNeXt's layer scale of 1e-6);
(c) a recipe saved to disk rebuilds the model by replay, with an identical state_dict and output.

Conv biases are randomised first: torchvision initialises them to zero, which would hide a lost bias.

`test_every_classifier` (slow) sweeps all of `torchvision_classifiers()` (80 models): converts the
first two convolutions, checks (a) and runs a forward pass at the recipe's input shape. No model is
skipped. Building the big models and one forward pass at their full input size (up to 600x600 for
efficientnet_b7) dominate; on two quiet cores the whole test suite, this sweep included, took 5.5
minutes, the slowest models being regnet_y_128gf and vit_h_14 (about 20-30 s each).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gaborprune
from gaborprune import ConversionReport, ConversionSpec, GaborConv2d
from gaborprune.models import torchvision_classifiers

NUM_CLASSES = 10

#: name -> (convolutions to convert, whether a grouped/depthwise one must be among them, input side).
#: K reaches the first grouped convolution in execution order (RegNet runs its projection shortcut
#: and a 1x1 before the grouped 3x3, MaxViT its stem and two 1x1s before the depthwise one). The
#: side is the smallest convenient one the model accepts: ViT and MaxViT insist on 224.
FAMILIES: dict[str, tuple[int, bool, int]] = {
    "resnet18": (3, False, 64),
    "resnext50_32x4d": (3, True, 64),
    "vgg11_bn": (3, False, 64),
    "densenet121": (3, False, 64),
    "mobilenet_v2": (3, True, 64),
    "mobilenet_v3_small": (3, True, 64),
    "shufflenet_v2_x0_5": (3, True, 64),
    "regnet_x_400mf": (4, True, 64),
    "regnet_y_400mf": (4, True, 64),
    "convnext_tiny": (3, True, 64),
    "efficientnet_b0": (3, True, 64),
    "efficientnet_v2_s": (3, False, 64),
    "mnasnet0_5": (3, True, 64),
    "squeezenet1_0": (3, False, 64),
    "googlenet": (3, False, 64),
    "inception_v3": (3, False, 96),
    "alexnet": (3, False, 64),
    "vit_b_16": (3, False, 224),
    "swin_t": (3, False, 64),
    "maxvit_t": (5, True, 224),
}


# -- helpers ---------------------------------------------------------------------------------------
def build(name: str, side: int | None = None):
    """(model, recipe) for torchvision model `name`, seeded; input side overridden when given."""
    torch.manual_seed(0)
    shape = (3, side, side) if side else None
    return gaborprune.load_model(f"torchvision:{name}", num_classes=NUM_CLASSES, input_shape=shape)


@torch.no_grad()
def randomise_conv_biases(model: nn.Module) -> None:
    """torchvision initialises conv biases to zero, which would hide a bias that gets lost."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.normal_(0.0, 0.1)


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal up to `tol` times the magnitude of `expected`."""
    scale = float(expected.abs().max().clamp_min(1e-6))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


@torch.no_grad()
def write_materialised_weights(original: nn.Module, converted: nn.Module, names: list[str]) -> None:
    """The oracle: put each Gabor layer's computed kernels (and bias) into the plain copy."""
    for name in names:
        gabor, conv = converted.get_submodule(name), original.get_submodule(name)
        conv.weight.copy_(gabor.weight)
        if gabor.bias is not None:
            conv.bias.copy_(gabor.bias)


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, output of each named module on its first call) in eval mode."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.setdefault(n, out.clone()))
        for n in names
    ]
    try:
        return model.eval()(x), seen
    finally:
        for h in hooks:
            h.remove()


def check_report(report: ConversionReport, model: nn.Module, original: nn.Module) -> None:
    """(a): the layers are Gabor banks shaped like their convolutions in `original`, with an honest fit error."""
    for entry in report.layers:
        layer = model.get_submodule(entry.name)
        assert isinstance(layer, GaborConv2d), f"{entry.name} is a {type(layer).__name__}"
        assert entry.fit_rel_error is not None and math.isfinite(entry.fit_rel_error), entry
        assert entry.fit_rel_error < 1.0, f"{entry.name}: fit no better than a zero kernel ({entry.fit_rel_error})"
        conv = original.get_submodule(entry.name)
        assert isinstance(conv, nn.Conv2d)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            assert getattr(layer, attr) == getattr(conv, attr), f"{entry.name}.{attr}"
        assert (layer.bias is None) == (conv.bias is None), entry.name
        assert entry.groups == conv.groups
        with torch.no_grad():
            expected = float((conv.weight - layer.weight).norm() / conv.weight.norm())
        assert entry.fit_rel_error == pytest.approx(expected, rel=1e-3, abs=1e-6), entry.name


# -- fast: one model per family --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_representative(name: str, tmp_path) -> None:
    first, grouped, side = FAMILIES[name]
    model, recipe = build(name, side)
    randomise_conv_biases(model)
    original = copy.deepcopy(model)
    first = min(first, count_convs(original))  # ViT and Swin have one convolution; asking for more is refused

    report = gaborprune.gaborize_(model, ConversionSpec(first=first, fit_steps=20), recipe.input_shape)
    recipe = recipe.with_step(report.step)

    # (a)
    assert len(report.layers) == first
    check_report(report, model, original)
    if grouped:
        assert any(entry.groups > 1 for entry in report.layers), f"no grouped conv among {report.layer_names}"

    # (b)
    names = report.layer_names
    write_materialised_weights(original, model, names)
    x = torch.randn(2, *recipe.input_shape, generator=torch.Generator().manual_seed(1))
    got, got_layers = run(model, x, names)
    want, want_layers = run(original, x, names)
    assert got.shape == (2, NUM_CLASSES)
    scaled_close(got, want)
    assert set(got_layers) == set(names)
    for n in names:
        scaled_close(got_layers[n], want_layers[n])

    # (c)
    path = gaborprune.save_recipe(tmp_path / f"{name}.pt", model, recipe)
    rebuilt, rebuilt_recipe = gaborprune.load_model(str(path))
    assert rebuilt_recipe.steps == recipe.steps
    assert tuple(rebuilt_recipe.input_shape) == tuple(recipe.input_shape)
    assert all(isinstance(rebuilt.get_submodule(n), GaborConv2d) for n in names)
    theirs = rebuilt.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key
    scaled_close(run(rebuilt, x, [])[0], got, tol=1e-6)


# -- slow: every classifier ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_classifiers())
def test_every_classifier(name: str) -> None:
    model, recipe = build(name)
    convs = count_convs(model)
    original = copy.deepcopy(model)
    report = gaborprune.gaborize_(model, ConversionSpec(first=min(2, convs), fit_steps=5), recipe.input_shape)

    assert len(report.layers) == min(2, convs)
    check_report(report, model, original)
    logits, _ = run(model, torch.randn(1, *recipe.input_shape), [])
    assert logits.shape == (1, NUM_CLASSES)
