"""Depthwise convs on the pattern kernel: the per-filter order (``PatternConvConfig.per_filter``)
planned for maps at least ``PER_FILTER_MIN_WIDTH`` wide, its numerics against PyTorch on every
x86 ISA this host runs (odd sizes, stride 2, batch 2, the fused bias + ReLU6), and the guard
against a weight whose filters read several channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS
from torch import nn

import tvm_sparse
from relay_passes.layer_plan import PlanTarget
from relay_passes.plan_layers import plan_layers
from schedules.epilogue import Epilogue
from schedules.pattern_conv2d import (
    PER_FILTER_MIN_WIDTH,
    ConvGeometry,
    PatternConvConfig,
    pattern_conv2d_primfunc,
)
from tvm_sparse.frontend import import_model

TOL = 1e-4  # float32, another summation order: relative to the largest output


class DepthwiseBlock(nn.Module):
    """Depthwise 3x3 (+ bias) + ReLU6, MobileNetV2's piece."""

    def __init__(self, channels: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(self.conv(x))


@pytest.mark.parametrize("width", [PER_FILTER_MIN_WIDTH - 1, PER_FILTER_MIN_WIDTH, 56])
def test_depthwise_takes_the_per_filter_order_on_wide_maps(width):
    model = DepthwiseBlock(16, 2, True).eval()
    mod = import_model(model, (torch.randn(1, 16, width, width),)).mod
    for lanes, registers in ((16, 32), (8, 16)):
        (plan,) = plan_layers(mod, PlanTarget(lanes, registers, 2)).values()
        assert (plan.format, plan.kernel) == ("depthwise", "pattern")
        assert plan.config.per_filter == (width >= PER_FILTER_MIN_WIDTH)


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(2, 24),
    height=st.integers(PER_FILTER_MIN_WIDTH, 40),
    width=st.integers(PER_FILTER_MIN_WIDTH, 40),
    stride=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 2]),
    bias=st.booleans(),
)
def test_per_filter_depthwise_matches_pytorch(target, channels, height, width, stride, batch, bias):
    torch.manual_seed(channels * 100 + width)
    model = DepthwiseBlock(channels, stride, bias).eval()
    x = np.random.default_rng(height).standard_normal((batch, channels, height, width))
    x = (x * 4).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    assert [r.format for r in cm.layers] == ["depthwise"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = cm(x)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


def test_per_filter_refuses_filters_that_read_several_channels():
    geom = ConvGeometry(1, 4, 16, 16, 4, (3, 3), (1, 1), (1, 1, 1, 1))
    full = (tuple(range(9)),)
    cfg = PatternConvConfig(rows=2, vector=16, per_filter=True)
    with pytest.raises(ValueError, match="16 kernels for 4 filters"):
        pattern_conv2d_primfunc(geom, full, 16, 9, Epilogue(), cfg)
