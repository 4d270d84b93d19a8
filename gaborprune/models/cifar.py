"""The CIFAR networks of the seed paper: ResNet-20/32/56, VGG-11/13/16/19 with BatchNorm, and the
altered ResNet-20 whose first five convolutions become two larger Gabor layers; and the small
network of the CADA ablation (`cada_net`).

All take Tensor[N, 3, 32, 32] and return logits Tensor[N, num_classes]. ResNet shortcuts that change
shape are 1x1 convolutions with BatchNorm (option B of He et al.), which export as plain ONNX and
keep channel ties explicit for pruning.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gaborprune._validate import check_int
from gaborprune.convert.layer import GaborConv2d
from gaborprune.convert.spec import MAX_KERNEL_SIZE
from gaborprune.errors import ModelSourceError


def _count(value: object, name: str) -> int:
    """A builder argument that counts something (channels, blocks, classes): an int of at least 1."""
    return check_int(value, f"model argument {name}", error=ModelSourceError)


def _kernel(value: object, name: str) -> int:
    """A stem kernel size: odd (padding k // 2 keeps the image size only then) and at most MAX_KERNEL_SIZE."""
    _count(value, name)
    if value % 2 == 0 or value > MAX_KERNEL_SIZE:
        raise ModelSourceError(f"model argument {name} must be an odd kernel size from 1 to {MAX_KERNEL_SIZE}, not {value}")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ModelSourceError(f"model argument {name} must be true or false, not {value!r}")
    return value


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 stem, three stages of n basic blocks at 16, 32, 64 channels.

    With `stem_kernels=(k1, k2)` the stem and the first two blocks (five convolutions) are replaced by
    two convolutions of kernel sizes k1 and k2 at `stem_channels` (the paper's altered ResNet-20),
    which are Gabor banks when `gabor` is true.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        stem_kernels: tuple[int, int] | None = None,
        stem_channels: int = 16,
        gabor: bool = True,
    ) -> None:
        super().__init__()
        _count(num_classes, "num_classes")
        _count(stem_channels, "stem_channels")
        _flag(gabor, "gabor")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), not {depth}")
        n = (depth - 2) // 6
        self.relu = nn.ReLU(inplace=True)
        if stem_kernels is None:
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            first_blocks, in_planes = n, 16
        else:
            if n < 2:
                raise ValueError("the altered stem replaces two blocks; it needs depth >= 14")
            conv = GaborConv2d if gabor else nn.Conv2d
            k1, k2 = (_kernel(k, name) for k, name in zip(stem_kernels, ("k1", "k2")))
            self.conv1 = conv(3, stem_channels, k1, 1, k1 // 2, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.conv2 = conv(stem_channels, stem_channels, k2, 1, k2 // 2, bias=False)
            self.bn2 = nn.BatchNorm2d(stem_channels)
            first_blocks, in_planes = n - 2, stem_channels
        self.layer1 = self._stage(in_planes, 16, first_blocks, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "conv2"):
            x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


_VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 input: conv3x3-BN-ReLU stacks, five max-pools, one linear layer."""

    def __init__(self, depth: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        _count(num_classes, "num_classes")
        if depth not in _VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(_VGG_CONFIGS)}, not {depth}")
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def resnet20_altered(num_classes: int = 10, k1: int = 7, k2: int = 5, channels: int = 16, gabor: bool = True) -> CifarResNet:
    """The paper's altered ResNet-20: stem + first two blocks -> two Gabor layers (k1 x k1, k2 x k2)."""
    _count(channels, "channels")  # checked here so the message names the argument the user gave
    return CifarResNet(20, num_classes, stem_kernels=(k1, k2), stem_channels=channels, gabor=gabor)


class MixerBlock(nn.Module):
    """x + BN(1x1(ReLU(BN(mixer(x))))), then ReLU: `mixer` is the spatial layer the CADA ablation swaps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mixer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.pointwise(F.relu(self.bn1(self.mixer(x))))))


class CADANet(nn.Module):
    """The CADA ablation's small network for 32x32 input: a 3x3 stem, then per stage a stride-2 3x3
    downsampling layer (`stages.i.down.0`, from the second stage on) and `blocks` MixerBlocks
    (`stages.i.blocks.j.mixer`, 3x3 convolutions until converted), global pooling, one linear layer."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1) -> None:
        super().__init__()
        _count(num_classes, "num_classes")
        _count(blocks, "blocks")
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ModelSourceError(f"model argument widths must be a non-empty list of channel counts, e.g. [32,64,128], not {widths!r}")
        for w in widths:
            _count(w, "widths")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages = []
        for i, w in enumerate(widths):
            stage = nn.Module()
            stage.down = (nn.Sequential(nn.Conv2d(widths[i - 1], w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
                          if i else nn.Identity())
            stage.blocks = nn.Sequential(*(MixerBlock(w) for _ in range(blocks)))
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage.blocks(stage.down(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


BUILTINS = {
    "resnet20": lambda num_classes=10: CifarResNet(20, num_classes),
    "resnet32": lambda num_classes=10: CifarResNet(32, num_classes),
    "resnet56": lambda num_classes=10: CifarResNet(56, num_classes),
    "resnet20_altered": resnet20_altered,
    "vgg11": lambda num_classes=10: CifarVGG(11, num_classes),
    "vgg13": lambda num_classes=10: CifarVGG(13, num_classes),
    "vgg16": lambda num_classes=10: CifarVGG(16, num_classes),
    "vgg19": lambda num_classes=10: CifarVGG(19, num_classes),
    "cada_net": CADANet,
}
