"""Tiny models for the tests, importable as `tiny_models:NAME` model sources."""

import torch
import torch.nn.functional as F
from torch import nn

from gaborprune.convert import GaborConv2d


def gabor_net(num_classes: int = 4) -> nn.Module:
    """A Gabor bank + BN, a plain conv + BN, global pooling, a linear head. Input 3x16x16."""
    return nn.Sequential(
        GaborConv2d(3, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


# -- the four topologies pruning must compact exactly (input 3x16x16) --------------------------------
def _bank(i, o, k=3, stride=1, bias=False):
    return GaborConv2d(i, o, k, stride, k // 2, bias=bias)


class Chain(nn.Module):
    """VGG: Gabor bank, BN, ReLU, max-pool, a zero-padded 3x3 conv, flatten into a linear head."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.g1, self.bn1 = _bank(3, 8), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.g1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(torch.flatten(x, 1))


class Folds(nn.Module):
    """Constants that fold: into a 1x1 Gabor bank's bias, a BN's running mean, a linear bias (via mean + cat)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.g1, self.bn1 = _bank(3, 8), nn.BatchNorm2d(8)
        self.g2, self.bn2 = _bank(8, 8, k=1, bias=True), nn.BatchNorm2d(8)
        self.p, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.bn1(self.g1(x))), 2)
        y = F.relu(self.bn2(self.g2(x)))
        z = F.relu(self.bn3(self.p(y)))
        return self.head(torch.cat([z.mean((2, 3)), y.mean((2, 3))], 1))


class Residual(nn.Module):
    """ResNet: two Gabor banks tied by an identity shortcut, then a block with a 1x1 projection."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.g1, self.bn1 = _bank(3, 8), nn.BatchNorm2d(8)
        self.g2, self.bn2 = _bank(8, 8), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.shortcut, self.bn_s = nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.g1(x)))
        x = F.relu(x + self.bn2(self.g2(x)))
        x = F.relu(self.bn3(self.conv3(x)) + self.bn_s(self.shortcut(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, channels, growth=4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 8, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class Dense(nn.Module):
    """DenseNet: a Gabor stem whose channels reach every later layer through concatenations."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem, self.norm0 = _bank(3, 8), nn.BatchNorm2d(8)
        self.pool0 = nn.MaxPool2d(3, 2, 1)
        self.layers = nn.ModuleList([DenseLayer(8), DenseLayer(12)])
        self.norm_t, self.conv_t = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)  # shifts go through pooling to the head
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        features = [self.pool0(F.relu(self.norm0(self.stem(x))))]
        for layer in self.layers:
            features.append(layer(features))
        x = F.avg_pool2d(self.conv_t(F.relu(self.norm_t(torch.cat(features, 1)))), 2)
        return self.head(x.mean((2, 3)))


class Mobile(nn.Module):
    """MobileNet: a Gabor stem, a depthwise 3x3, a pointwise 1x1, an inverted residual block."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(_bank(3, 8, stride=2), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.block = nn.Sequential(
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
            nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
            nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        x = x + self.block(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Untraceable(nn.Module):
    """A Gabor bank behind data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.g, self.bn, self.head = GaborConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.head(torch.relu(self.bn(self.g(x)))).mean((2, 3))


class Steps(nn.Module):
    """Plain convolutions for a recipe of several steps (tests/data/recipe_v1.pt): a stem whose constant
    channels fold into a 1x1 conv's bias, then two residual blocks, the first of whose branches can die whole. Input 3x16x16."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.p, self.bn_p = nn.Conv2d(8, 8, 1, bias=True), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn_p(self.p(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(x + self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))
        return self.head(x.mean((2, 3)))
