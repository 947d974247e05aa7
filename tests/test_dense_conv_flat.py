"""Dense k x k convs on the flat-rows GEMM (``schedules.dense_conv2d``, ``DenseConvConfig.flat``:
B's columns run over a job's output rows back to back), the AVX2 build's kernel for dense 3x3
convs with outputs >= 28 wide that Winograd does not take (stride 2, few channels): the plan
and its defaults, the row pieces the stores split into, numerics against PyTorch on every x86
ISA this host runs (odd sizes, 3x3 / 5x5, strides 1-2, asymmetric padding, batch 2, partial
row tiles, filter chunks, bias + residual + ReLU), a compiled model, the pass's
Before/Expected and the template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import (
    ISA_TARGETS,
    ConvBlock,
    conv_bias_relu_module,
    packed_gemm_call_module,
    replay_at_knobs,
    torch_conv,
)
from torch import nn

import tvm_sparse
from relay_passes.layer_plan import PlanTarget
from relay_passes.pattern_conv2d import RewriteConv2D
from relay_passes.plan_layers import plan_layers
from schedules.dense_conv2d import (
    DenseConvConfig,
    _row_pieces,
    default_flat_conv_config,
    dense_conv2d_primfunc,
    dense_conv2d_template,
    flat_rows_fit,
    pack_dense_conv,
)
from schedules.dense_gemm import GemmConfig
from schedules.epilogue import Epilogue
from schedules.geometry import ConvGeometry
from schedules.tunable import knob_space, realize
from tvm_sparse.frontend import import_model
from tvm_sparse.targets import resolve_target, runs_here, vector_lanes

TOL = 1e-4  # float32, another summation order: relative to the largest output
AVX2_TILE = GemmConfig(4, 3, 8)


def _geom(size: int, stride: int = 1, kernel: int = 3, channels: int = 64) -> ConvGeometry:
    pad = kernel // 2
    return ConvGeometry(1, channels, size, size, channels, (kernel, kernel), (stride, stride),
                        (pad,) * 4)  # fmt: skip


@pytest.mark.parametrize(
    ("geom", "fits"),
    [
        (_geom(56), True),  # 2 of 58 columns past the output
        (_geom(28), True),  # 2 of 30
        (_geom(14), False),  # 2 of 16
        (_geom(28, stride=2), True),  # 14 wide: 1 of 15
        (_geom(14, stride=2), False),  # 7 wide: 1 of 8
        (_geom(56, kernel=5), True),  # 4 of 60
        (_geom(50, kernel=5), False),  # 4 of 54
    ],
)
def test_flat_rows_fit_where_little_of_a_row_is_wasted(geom, fits):
    assert flat_rows_fit(geom) is fits


@pytest.mark.parametrize(
    ("out_h", "cores", "out_rows", "chunks"),
    [(56, 2, 4, 1), (28, 2, 7, 1), (14, 2, 7, 1), (30, 2, 5, 1), (29, 2, 4, 2), (28, 3, 4, 3)],
)
def test_default_job_rows_divide_over_the_cores(out_h, cores, out_rows, chunks):
    cfg = default_flat_conv_config(_geom(out_h), 8, 16, cores)
    assert cfg == DenseConvConfig(AVX2_TILE, out_rows=out_rows, flat=True, chunks=chunks)


def test_row_pieces_split_a_vector_at_row_ends_and_drop_the_extra_columns():
    # rows of 30 flat columns, 28 of them output: columns 20-35 are row 0's 20-27 (lanes 0-7;
    # 28-29 dropped) and row 1's 0-5 (lanes 10-15)
    assert _row_pieces(20, 16, 30, 28) == [(0, 20, 0, 8), (1, 0, 10, 6)]
    assert _row_pieces(0, 8, 30, 28) == [(0, 0, 0, 8)]
    assert _row_pieces(28, 2, 30, 28) == []


@pytest.mark.parametrize(
    ("size", "stride", "kernel"), [(28, 1, "dense_conv"), (28, 2, "dense_conv"), (14, 1, "lanes")]
)
def test_the_avx2_plan_takes_the_flat_rows_where_they_fit(size, stride, kernel):
    mod = import_model(ConvBlock(16, 32, stride).eval(), (torch.randn(1, 16, size, size),)).mod
    (avx2,) = plan_layers(mod, PlanTarget(8, 16, 2)).values()
    (avx512,) = plan_layers(mod, PlanTarget(16, 32, 2)).values()
    assert (avx2.format, avx2.kernel, avx512.kernel) == ("dense", kernel, "lanes")
    if kernel == "dense_conv":
        assert avx2.config.flat and avx2.config.gemm == AVX2_TILE
        assert avx2.packing.shape == (8, 16 * 9, 4)
        assert "back to back" in avx2.reason


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(5, 12),
    filters=st.sampled_from([5, 8, 20]),
    height=st.integers(5, 23),
    width=st.integers(5, 40),
    kernel=st.sampled_from([3, 5]),
    stride=st.sampled_from([1, 2]),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    out_rows=st.integers(1, 5),
    chunks=st.integers(1, 3),
    vectors=st.integers(1, 3),
    tile_rows=st.sampled_from([1, 2, 4]),
)
def test_flat_rows_match_pytorch(
    target, channels, filters, height, width, kernel, stride, padding, out_rows, chunks,
    vectors, tile_rows,
):  # fmt: skip
    """Batch 2, bias + residual + ReLU; the last row job past the map, the last row tile
    partial (filters not a multiple of 4), partial vectors at the end of a job's rows."""
    tgt = tvm.target.Target(resolve_target(target))
    geom = ConvGeometry(2, channels, height, width, filters, (kernel, kernel), (stride,) * 2,
                        padding)  # fmt: skip
    if geom.out_height < 1 or geom.out_width < 1:
        return
    rng = np.random.default_rng(channels * 100 + width)
    x = rng.standard_normal((2, channels, height, width), "float32")
    w = rng.standard_normal((filters, channels, kernel, kernel), "float32")
    b = rng.standard_normal(filters, "float32")
    out_shape = (2, filters, geom.out_height, geom.out_width)
    r = rng.standard_normal(out_shape, "float32")
    gemm = GemmConfig(4, vectors, vector_lanes(tgt))
    cfg = DenseConvConfig(gemm, out_rows, tile_rows, flat=True, chunks=chunks)
    func = dense_conv2d_primfunc(geom, Epilogue(True, True, "relu"), cfg)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_dense_conv(w, 4), b, r)], out)
    ref = torch_conv(x, w, stride, padding, b, r, "relu")
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


class Residual(nn.Module):
    """Two 3x3 convs (the second stride 2) with a residual: ResNet's basic block, smaller."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 24, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x) + x))


@pytest.mark.parametrize("target", ISA_TARGETS[:1])
def test_compiled_avx2_model_matches_pytorch(target):
    torch.manual_seed(0)
    model = Residual().eval()
    x = np.random.default_rng(1).standard_normal((1, 16, 29, 28)).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    assert [r.epilogue for r in cm.layers] == ["bias+residual+relu", "bias"]
    assert all("back to back" in r.reason for r in cm.layers)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(cm(x) - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


def test_pass_rewrites_a_dense_conv_to_one_flat_rows_call():
    """Before: conv2d + bias + ReLU on 16 channels of 28x28 (8 lanes, 16 registers, 2 cores).
    Expected: one call to the flat-rows kernel, pinned (4 filters x 3 vectors, 7 rows a job),
    on the input as it is and the weight packed as the GEMM's A."""
    w = np.random.default_rng(7).standard_normal((8, 16, 3, 3)).astype("float32")
    b = np.arange(8, dtype="float32")
    after = RewriteConv2D(num_threads=2)(conv_bias_relu_module((1, 16, 28, 28), w, b))
    geom = ConvGeometry(1, 16, 28, 28, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    cfg = DenseConvConfig(AVX2_TILE, out_rows=7, flat=True)
    name = "dense_conv2d_8x16x3x3"
    kernel = dense_conv2d_template(geom, Epilogue(True, False, "relu"), cfg, name)
    expected = packed_gemm_call_module((1, 16, 28, 28), kernel, name, w, b, (1, 8, 28, 28))
    tvm.ir.assert_structural_equal(after, expected)


def test_template_realizes_the_flat_kernel_and_its_space_is_pinned():
    geom = _geom(28)
    cfg = default_flat_conv_config(geom, 8, 16, 2)
    func = dense_conv2d_template(geom, Epilogue(True), cfg, "f")
    expected = dense_conv2d_primfunc(geom, Epilogue(True), cfg, "f")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {
        "rows": [4, 1, 2],
        "vectors": [3, 1, 2, 4],
        "out_rows": [7, 1, 2, 3, 4, 14],
    }


def test_a_tuning_record_replays_to_the_flat_kernel_at_its_knobs():
    """A MetaSchedule trace on the template with non-default knobs (7 rows a job, 2 vectors, 2
    filters a tile) realizes the flat kernel at those knobs: ``flat`` and ``chunks`` ride in the
    template's params, not its knobs. The realized kernel matches PyTorch."""
    geom = ConvGeometry(1, 16, 14, 28, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    cfg = DenseConvConfig(AVX2_TILE, out_rows=2, flat=True, chunks=2)
    func = dense_conv2d_template(geom, Epilogue(True), cfg, "f")
    target = resolve_target("x86-avx2")
    tuned = replay_at_knobs(func, target, {"rows": 2, "vectors": 2, "out_rows": 7})
    at_knobs = DenseConvConfig(GemmConfig(4, 2, 8), 7, 2, flat=True, chunks=2)
    expected = dense_conv2d_primfunc(geom, Epilogue(True), at_knobs, "f")
    assert str(tuned.body) == str(expected.body)
    if runs_here(target):
        rng = np.random.default_rng(5)
        x = rng.standard_normal((1, 16, 14, 28), "float32")
        w, b = rng.standard_normal((8, 16, 3, 3), "float32"), rng.standard_normal(8, "float32")
        lib = tvm.compile(tvm.IRModule({"main": tuned.with_attr("global_symbol", "main")}), target)
        out = tvm.runtime.tensor(np.zeros((1, 8, 14, 28), "float32"))
        lib["main"](*[tvm.runtime.tensor(a) for a in (x, pack_dense_conv(w, 4), b)], out)
        ref = torch_conv(x, w, 1, (1, 1, 1, 1), b)
        np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))
