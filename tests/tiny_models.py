"""Tiny models for the tests, importable as `tiny_models:NAME` model sources."""

from torch import nn

from gaborprune.convert import GaborConv2d


def gabor_net(num_classes: int = 4) -> nn.Module:
    """A Gabor bank + BN, a plain conv + BN, global pooling, a linear head. Input 3x16x16."""
    return nn.Sequential(
        GaborConv2d(3, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
