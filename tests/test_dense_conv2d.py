"""Dense k x k convs on few input channels (a CNN's stem) on their own kernel
(``schedules.dense_conv2d``: a packed GEMM over phase-split input rows): the plan, numerics
against PyTorch on every x86 ISA this host runs (odd sizes, 3x3 / 5x5 / 7x7, strides 1-3,
asymmetric and no padding, batch 2, bias + ReLU), every tile of the search space with a
residual, and the template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS, torch_conv
from torch import nn

import tvm_sparse
from relay_passes.conv_plan import FEW_CHANNELS
from relay_passes.layer_plan import PlanTarget
from relay_passes.plan_layers import plan_layers
from schedules.dense_conv2d import (
    DenseConvConfig,
    default_dense_conv_config,
    dense_conv2d_primfunc,
    dense_conv2d_template,
    pack_dense_conv,
)
from schedules.dense_gemm import GemmConfig
from schedules.epilogue import Epilogue
from schedules.geometry import ConvGeometry
from schedules.tunable import knob_space, realize
from tvm_sparse.frontend import import_model
from tvm_sparse.targets import resolve_target, vector_lanes

TOL = 1e-4  # float32, another summation order: relative to the largest output


class Stem(nn.Module):
    """Conv (+ bias) + ReLU on an image."""

    def __init__(self, c: int, o: int, kernel: int, stride: int, pad: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, o, kernel, stride, pad, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.mark.parametrize("channels", [3, FEW_CHANNELS, FEW_CHANNELS + 1])
def test_few_channel_dense_convs_take_the_dense_conv_kernel(channels):
    model = Stem(channels, 32, 7, 2, 3, True).eval()
    mod = import_model(model, (torch.randn(1, channels, 64, 64),)).mod
    for lanes, registers, tile in ((16, 32, (8, 3)), (8, 16, (4, 3))):
        (plan,) = plan_layers(mod, PlanTarget(lanes, registers, 2)).values()
        if channels > FEW_CHANNELS:  # more channels: the lanes / pattern kernels, as before
            assert plan.kernel in ("lanes", "pattern")
            continue
        assert (plan.format, plan.kernel) == ("dense", "dense_conv")
        assert plan.config == DenseConvConfig(GemmConfig(*tile, lanes), out_rows=2)
        assert plan.packing.shape == (32 // tile[0], channels * 49, tile[0])
        assert plan.flops_kept == plan.flops_dense == 2 * 32 * 32 * 32 * channels * 49


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, FEW_CHANNELS),
    filters=st.sampled_from([5, 16, 24]),
    height=st.integers(7, 40),
    width=st.integers(7, 70),
    kernel=st.sampled_from([3, 5, 7]),
    stride=st.sampled_from([1, 2, 3]),
    same=st.booleans(),
    batch=st.sampled_from([1, 2]),
    bias=st.booleans(),
)
def test_dense_conv_matches_pytorch(
    target, channels, filters, height, width, kernel, stride, same, batch, bias
):
    torch.manual_seed(channels * 100 + width)
    model = Stem(channels, filters, kernel, stride, kernel // 2 if same else 0, bias).eval()
    x = np.random.default_rng(height).standard_normal((batch, channels, height, width))
    x = (x * 4).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    assert [(r.format, r.epilogue) for r in cm.layers] == [
        ("dense", "bias+relu" if bias else "relu")
    ]
    assert "phase-split input rows" in cm.layers[0].reason
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = cm(x)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize(("rows", "vectors", "out_rows"), [(8, 3, 2), (1, 4, 1), (4, 1, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_tile_of_the_space_matches_pytorch(target, rows, vectors, out_rows, stride):
    """A 7x7 conv, 3 channels -> 12 filters (a partial row tile), asymmetric padding, 21 rows
    of 53 columns (partial vectors; the last job's rows past the map), bias + residual + ReLU,
    at tiles the tuner may pick."""
    tgt = tvm.target.Target(resolve_target(target))
    lanes, packed = vector_lanes(tgt), 8
    padding = (3, 2, 1, 3)  # top, left, bottom, right
    geom = ConvGeometry(2, 3, 21, 53, 12, (7, 7), (stride, stride), padding)
    rng = np.random.default_rng(rows * 10 + stride)
    x = rng.standard_normal((2, 3, 21, 53), "float32")
    w, b = rng.standard_normal((12, 3, 7, 7), "float32"), rng.standard_normal(12, "float32")
    out_shape = (2, 12, geom.out_height, geom.out_width)
    r = rng.standard_normal(out_shape, "float32")
    cfg = DenseConvConfig(GemmConfig(packed, vectors, lanes), out_rows, tile_rows=rows)
    func = dense_conv2d_primfunc(geom, Epilogue(True, True, "relu"), cfg)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_dense_conv(w, packed), b, r)], out)
    ref = torch_conv(x, w, stride, padding, b, r, "relu")
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


def test_template_default_is_the_hand_kernel_and_its_space_is_pinned():
    stem = ConvGeometry(1, 3, 224, 224, 64, (7, 7), (2, 2), (3, 3, 3, 3))
    cfg = default_dense_conv_config(stem, 16, 32)
    assert cfg == DenseConvConfig(GemmConfig(8, 3, 16), out_rows=2)
    func = dense_conv2d_template(stem, Epilogue(True), cfg, "s")
    expected = dense_conv2d_primfunc(stem, Epilogue(True), cfg, "s")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {
        "rows": [8, 1, 2, 4],
        "vectors": [3, 1, 2, 4],
        "out_rows": [2, 1, 3, 4],
    }
    one_row = ConvGeometry(1, 3, 7, 20, 8, (7, 7), (1, 1), (0, 0, 0, 0))
    cfg = default_dense_conv_config(one_row, 8, 16)
    assert cfg == DenseConvConfig(GemmConfig(4, 3, 8), out_rows=1)
    assert knob_space(dense_conv2d_template(one_row, Epilogue(), cfg, "t"))["out_rows"] == [1]


def test_tile_rows_must_divide_the_packed_rows():
    geom = ConvGeometry(1, 3, 16, 16, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="tile_rows=3 does not divide the packed rows 8"):
        dense_conv2d_primfunc(geom, cfg=DenseConvConfig(tile_rows=3))
