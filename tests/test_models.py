"""Reference models: published parameter counts, output shapes, torch.export in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tvm_sparse import models


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (models.resnet18, 11_689_512),
        (models.resnet50, 25_557_032),
        (models.vgg16, 138_357_544),
        (models.vgg16_bn, 138_365_992),
        (models.mobilenet_v2, 3_504_872),
    ],
)
def test_full_size_parameter_counts(build, expected: int) -> None:
    """Counted on the meta device: no memory allocated, nothing run."""
    with torch.device("meta"):
        model = build()
    assert _num_params(model) == expected


TINY = {
    "resnet18": lambda: models.resnet18(num_classes=10, width=8),
    "resnet50": lambda: models.resnet50(num_classes=10, width=8),
    "vgg16": lambda: models.vgg16(num_classes=10, width=8, classifier_width=32, image_size=32),
    "vgg16_bn": lambda: models.vgg16_bn(
        num_classes=10, width=8, classifier_width=32, image_size=32
    ),
    "mobilenet_v2": lambda: models.mobilenet_v2(num_classes=10, width_mult=0.25),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward_and_export(name: str) -> None:
    torch.manual_seed(0)
    model = TINY[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), y)


def test_width_scales_channels() -> None:
    small, big = models.resnet18(width=8), models.resnet18(width=16)
    assert small.conv1.out_channels == 8 and small.fc.in_features == 64
    assert big.conv1.out_channels == 16 and big.fc.in_features == 128
    assert models.resnet50(width=8).fc.in_features == 8 * 8 * 4
    convs = [m for m in models.vgg16(width=16, image_size=32).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[-1].out_channels == 128
    assert all(c.kernel_size == (3, 3) for c in convs)


def test_full_size_shapes_on_meta() -> None:
    """Full-size architectures produce (N, 1000) logits at 224x224 (shape-only, meta tensors)."""
    with torch.device("meta"):
        for build in (models.resnet18, models.resnet50, models.vgg16, models.mobilenet_v2):
            y = build().eval()(torch.empty(1, 3, 224, 224))
            assert tuple(y.shape) == (1, 1000)


def test_mobilenet_v2_structure() -> None:
    model = models.mobilenet_v2()
    depthwise = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
    ]
    assert len(depthwise) == 17
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_vgg_rejects_bad_image_size() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        models.vgg16(image_size=100)
