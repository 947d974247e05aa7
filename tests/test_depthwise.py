"""Depthwise convs on their own kernel (``schedules.depthwise_conv2d``, read in place): the plan,
numerics against PyTorch on every x86 ISA this host runs (odd sizes, 3x3 and 5x5, stride 2,
no padding, batch 2, the fused bias + ReLU6), every tile of the search space with a residual,
the prefetches of a strided conv on a large map, the template, and the guard against a conv
that is not one filter per channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS, prefetch_lines
from torch import nn

import tvm_sparse
from relay_passes.layer_plan import PlanTarget
from relay_passes.plan_layers import plan_layers
from schedules.depthwise_conv2d import (
    PREFETCH_MIN_INPUT_BYTES,
    DepthwiseConfig,
    default_depthwise_config,
    depthwise_conv2d_primfunc,
    depthwise_conv2d_template,
    pack_depthwise,
)
from schedules.epilogue import Epilogue
from schedules.geometry import ConvGeometry
from schedules.tunable import knob_space, realize
from tvm_sparse.frontend import import_model
from tvm_sparse.targets import resolve_target, vector_lanes

TOL = 1e-4  # float32, another summation order: relative to the largest output


class DepthwiseBlock(nn.Module):
    """Depthwise conv (+ bias) + ReLU6, MobileNetV2's piece."""

    def __init__(self, channels: int, kernel: int, stride: int, pad: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride, pad, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(self.conv(x))


def test_depthwise_convs_take_the_depthwise_kernel():
    model = DepthwiseBlock(16, 3, 2, 1, True).eval()
    mod = import_model(model, (torch.randn(1, 16, 56, 56),)).mod
    for lanes, registers, rows in ((16, 32, 4), (8, 16, 2)):  # 28 columns: 2 / 4 vectors a row
        (plan,) = plan_layers(mod, PlanTarget(lanes, registers, 2)).values()
        assert (plan.format, plan.kernel) == ("depthwise", "depthwise")
        assert plan.config == DepthwiseConfig(rows, lanes)
        assert plan.packing.shape == (16, 9)


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(2, 24),  # (one channel: an ordinary conv)
    height=st.integers(5, 40),
    width=st.integers(5, 40),
    kernel=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    same=st.booleans(),
    batch=st.sampled_from([1, 2]),
    bias=st.booleans(),
)
def test_depthwise_matches_pytorch(
    target, channels, height, width, kernel, stride, same, batch, bias
):
    torch.manual_seed(channels * 100 + width)
    model = DepthwiseBlock(channels, kernel, stride, kernel // 2 if same else 0, bias).eval()
    x = np.random.default_rng(height).standard_normal((batch, channels, height, width))
    x = (x * 4).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    assert [(r.format, r.epilogue) for r in cm.layers] == [
        ("depthwise", "bias+relu6" if bias else "relu6")
    ]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = cm(x)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_tile_of_the_space_matches_pytorch(target, rows, stride):
    """19 rows of 37 columns (partial vectors, border rows, a remainder of rows past the last
    tile), bias + residual + ReLU, at tiles the tuner may pick."""
    tgt = tvm.target.Target(resolve_target(target))
    geom = ConvGeometry(2, 5, 19, 37, 5, (3, 3), (stride, stride), (1, 1, 1, 1))
    rng = np.random.default_rng(rows * 10 + stride)
    x = rng.standard_normal((2, 5, 19, 37), "float32")
    w, b = rng.standard_normal((5, 1, 3, 3), "float32"), rng.standard_normal(5, "float32")
    out_shape = (2, 5, geom.out_height, geom.out_width)
    r = rng.standard_normal(out_shape, "float32")
    cfg = DepthwiseConfig(rows, vector_lanes(tgt))
    func = depthwise_conv2d_primfunc(geom, Epilogue(True, True, "relu"), cfg)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_depthwise(w), b, r)], out)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, stride, 1,
                                      groups=5)  # fmt: skip
    ref = np.maximum(conv.numpy() + b[:, None, None] + r, 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


@pytest.mark.parametrize("target", ISA_TARGETS)
def test_a_strided_conv_on_a_large_map_prefetches_its_rows_ahead(target):
    """12 channels of 160x160 (1.2 MB an image, over ``PREFETCH_MIN_INPUT_BYTES``), stride 2,
    batch 2: each output row prefetches the two input rows it reads first, 4 KiB on (20
    lines), and its output row 2 KiB on, owned (5 lines), into the next channel and image;
    bias + residual + ReLU as PyTorch. Stride 1, or a smaller map: no prefetch."""
    tgt = tvm.target.Target(resolve_target(target))
    geom = ConvGeometry(2, 12, 160, 160, 12, (3, 3), (2, 2), (1, 1, 1, 1))
    assert PREFETCH_MIN_INPUT_BYTES < 12 * 160 * 160 * 4
    cfg = default_depthwise_config(geom, vector_lanes(tgt))
    func = depthwise_conv2d_primfunc(geom, Epilogue(True, True, "relu"), cfg)
    lines = prefetch_lines(func)
    reads = [line for line in lines if line.endswith(", 0, 3, 1)")]
    writes = [line for line in lines if line.endswith(", 1, 3, 1)")]
    assert (len(reads), len(writes), len(lines)) == (20 * cfg.rows, 5 * cfg.rows, 25 * cfg.rows)
    assert all("T.min(" in line for line in lines)  # clamped to the map's end
    for other in (ConvGeometry(2, 12, 160, 160, 12, (3, 3), (1, 1), (1, 1, 1, 1)),
                  ConvGeometry(2, 8, 160, 160, 8, (3, 3), (2, 2), (1, 1, 1, 1))):  # fmt: skip
        assert not prefetch_lines(depthwise_conv2d_primfunc(other, Epilogue(True), cfg))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 12, 160, 160), "float32")
    w, b = rng.standard_normal((12, 1, 3, 3), "float32"), rng.standard_normal(12, "float32")
    r = rng.standard_normal((2, 12, 80, 80), "float32")
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.zeros((2, 12, 80, 80), "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_depthwise(w), b, r)], out)
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, 2, 1,
                                      groups=12)  # fmt: skip
    ref = np.maximum(conv.numpy() + b[:, None, None] + r, 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


def test_template_default_is_the_hand_kernel_and_its_space_is_pinned():
    geom = ConvGeometry(1, 32, 112, 112, 32, (3, 3), (2, 2), (1, 1, 1, 1))
    cfg = default_depthwise_config(geom, 16)
    assert cfg == DepthwiseConfig(2, 16)  # 56 columns: 4 vectors a row, 8 in flight
    func = depthwise_conv2d_template(geom, Epilogue(True), cfg, "d")
    expected = depthwise_conv2d_primfunc(geom, Epilogue(True), cfg, "d")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"rows": [2, 1, 3, 4, 5, 6, 7, 8]}
    tiny = ConvGeometry(1, 8, 3, 3, 8, (3, 3), (1, 1), (0, 0, 0, 0))  # one output row
    assert knob_space(depthwise_conv2d_template(tiny, Epilogue(), DepthwiseConfig(1, 8), "t")) == {
        "rows": [1]
    }


def test_a_conv_that_is_not_one_filter_per_channel_is_refused():
    geom = ConvGeometry(1, 4, 16, 16, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="8 filters for 4 channels"):
        depthwise_conv2d_primfunc(geom)
