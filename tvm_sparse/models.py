"""Reference PyTorch CNNs (no torchvision): ResNet-18/50, VGG-16 (optionally with BN), MobileNetV2.

All models take NCHW float32 images and return (N, num_classes) logits. ``width`` (ResNet, VGG)
scales every channel count linearly (64 = the published model); ``width_mult`` (MobileNetV2) follows
the paper's rounding to multiples of 8. At the default sizes the parameter counts equal the
well-known ones (11.69M, 25.56M, 138.36M, 3.50M). All are ``torch.export``-able in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "MobileNetV2",
    "ResNet",
    "VGG",
    "mobilenet_v2",
    "resnet18",
    "resnet50",
    "vgg16",
    "vgg16_bn",
]


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out), unit BN, N(0, 0.01) linears (the torchvision recipe)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding for odd k) followed by BatchNorm."""
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


# ----------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs + identity (or 1x1 conv + BN downsample) shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = _conv_bn(planes, cout, 3)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in torchvision v1.5), 1x1 expand (x4) + shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = _conv_bn(planes, cout, 1)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """7x7/2 stem conv + BN + ReLU + 3x3/2 maxpool, four stages, global avg pool, fc."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)
        for m in self.modules():  # torchvision keeps the default Linear init for ResNet's fc
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]); 11,689,512 parameters at the defaults."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


def resnet50(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-50 (Bottleneck x [3, 4, 6, 3]); 25,557,032 parameters at the defaults."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width)


# -------------------------------------------------------------------------------------------- VGG

_VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


class VGG(nn.Module):
    """13 3x3 convs (+ optional BN) with 5 2x2 maxpools, then a 3-layer MLP classifier.

    The input must be ``image_size`` x ``image_size`` (a multiple of 32): the classifier flattens
    the (C, image_size/32, image_size/32) feature map directly (torchvision's 224 -> 7x7 case).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width: int = 64,
        classifier_width: int = 4096,
        image_size: int = 224,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = int(v) * width // 64
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=False))
            cin = cout
        self.features = nn.Sequential(*layers)
        side = image_size // 32
        self.classifier = nn.Sequential(
            nn.Linear(cin * side * side, classifier_width),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(inplace=False),
            nn.Dropout(0.5),
            nn.Linear(classifier_width, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(
    num_classes: int = 1000,
    width: int = 64,
    classifier_width: int = 4096,
    image_size: int = 224,
    batch_norm: bool = False,
) -> VGG:
    """VGG-16 (configuration D); 138,357,544 parameters at the defaults (138,365,992 with BN)."""
    return VGG(num_classes, width, classifier_width, image_size, batch_norm)


def vgg16_bn(
    num_classes: int = 1000, width: int = 64, classifier_width: int = 4096, image_size: int = 224
) -> VGG:
    """VGG-16 with BatchNorm after every conv."""
    return VGG(num_classes, width, classifier_width, image_size, batch_norm=True)


# ------------------------------------------------------------------------------------ MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never dropping more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear project; residual if shape kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=False)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=False)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2: 3x3/2 stem, 17 inverted residual blocks, 1x1 to 1280, avg pool, classifier."""

    # (expand ratio t, channels c, repeats n, first stride s) per stage
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [*_conv_bn(3, cin, 3, 2), nn.ReLU6(inplace=False)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2; 3,504,872 parameters at the defaults."""
    return MobileNetV2(num_classes, width_mult)
