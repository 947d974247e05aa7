"""Dense 1x1 convs with their filters in the vector lanes (``schedules.dense_conv1x1_lanes``:
pixels broadcast, the AVX2 build's kernel for pointwise convs on >= 384 input channels): when
the plan takes it, numerics against PyTorch on every x86 ISA this host runs (odd maps and
channel counts, a partial last filter tile and pixel tile, stride 2, batch 2, each epilogue),
a compiled model, the pass's Before/Expected, the template and a tuning record's replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS, replay_at_knobs, torch_conv
from torch import nn
from tvm import relax

import tvm_sparse
from relay_passes.layer_plan import PlanTarget
from relay_passes.pattern_conv2d import RewriteConv2D
from relay_passes.plan_layers import plan_layers
from schedules.dense_conv1x1_lanes import (
    conv1x1_lanes_fit,
    conv1x1_lanes_primfunc,
    conv1x1_lanes_template,
    default_conv1x1_lanes_config,
)
from schedules.dense_gemm import GemmConfig, pack_columns
from schedules.epilogue import Epilogue
from schedules.tunable import knob_space, realize
from tvm_sparse.frontend import import_model
from tvm_sparse.targets import resolve_target, runs_here, vector_lanes

TOL = 1e-4  # float32, another summation order: relative to the largest output
AVX2_TILE = GemmConfig(6, 2, 8, filters_in_lanes=True)


def _pack(weight: np.ndarray, width: int) -> np.ndarray:
    """An OIHW 1x1 weight as the kernel's B: (O, C) transposed, packed in ``width`` columns."""
    o, c = weight.shape[:2]
    return pack_columns(np.ascontiguousarray(weight.reshape(o, c).T), width)


@pytest.mark.parametrize(
    ("registers", "channels", "stride", "fits"),
    [(16, 384, 1, True), (16, 2048, 1, True), (16, 383, 1, False), (16, 512, 2, False),
     (32, 2048, 1, False)],
)  # fmt: skip
def test_taken_on_16_registers_at_stride_1_with_many_input_channels(
    registers, channels, stride, fits
):
    assert conv1x1_lanes_fit(registers, channels, stride) is fits


@pytest.mark.parametrize(
    ("stride", "in_dims", "message"),
    [(2, None, "strided 1x1 conv needs its in_dims"), (1, (4, 4), "maps \\(4, 4\\) to itself")],
)
def test_inconsistent_maps_are_refused(stride, in_dims, message):
    with pytest.raises(ValueError, match=message):
        conv1x1_lanes_primfunc(1, 8, 8, (3, 3), stride=stride, in_dims=in_dims)


class Pointwise(nn.Module):
    """A 1x1 conv + bias + ReLU."""

    def __init__(self, c: int, o: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, o, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.mark.parametrize(
    ("channels", "stride", "lanes_on_avx2"), [(384, 1, True), (256, 1, False), (512, 2, False)]
)
def test_the_avx2_plan_puts_the_filters_in_the_lanes_where_they_fit(
    channels, stride, lanes_on_avx2
):
    model = Pointwise(channels, 40, stride).eval()
    mod = import_model(model, (torch.randn(1, channels, 14, 14),)).mod
    (avx2,) = plan_layers(mod, PlanTarget(8, 16, 2)).values()
    (avx512,) = plan_layers(mod, PlanTarget(16, 32, 2)).values()
    assert (avx2.kernel, avx512.kernel) == ("conv_gemm", "conv_gemm")
    assert not avx512.config.filters_in_lanes
    assert avx2.config.filters_in_lanes is lanes_on_avx2
    if lanes_on_avx2:
        assert avx2.config == AVX2_TILE
        assert avx2.packing.shape == (3, channels, 16)  # 40 filters: 3 tiles of 16, zero-padded
        assert avx2.reason.endswith("packed GEMM, filters in vector lanes")


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 40),
    filters=st.integers(1, 45),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    stride=st.sampled_from([1, 2]),
    rows=st.integers(1, 8),
    vectors=st.integers(1, 3),
    epilogue=st.sampled_from(
        [Epilogue(True, True, "relu"), Epilogue(), Epilogue(True, False, "relu6")]
    ),
    cores=st.integers(1, 3),
)
def test_filters_in_lanes_match_pytorch(
    target, batch, channels, filters, height, width, stride, rows, vectors, epilogue, cores
):
    """Pixels past the map in the last tile, filters past the weight in the last filter tile
    (partial vectors), a stride-2 map read in place, pixel chunks split over the cores."""
    tgt = tvm.target.Target(resolve_target(target))
    out_dims = ((height - 1) // stride + 1, (width - 1) // stride + 1)
    rng = np.random.default_rng(channels * 100 + filters)
    x = rng.standard_normal((batch, channels, height, width), "float32")
    w = rng.standard_normal((filters, channels, 1, 1), "float32")
    b = rng.standard_normal(filters, "float32")
    r = rng.standard_normal((batch, filters, *out_dims), "float32")
    cfg = GemmConfig(rows, vectors, vector_lanes(tgt), filters_in_lanes=True)
    func = conv1x1_lanes_primfunc(
        batch, channels, filters, out_dims, epilogue, cfg, cores, "main", stride, (height, width)
    )
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.full((batch, filters, *out_dims), np.nan, "float32"))
    operands = [a for a, used in ((b, epilogue.bias), (r, epilogue.residual)) if used]
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, _pack(w, cfg.width), *operands)], out)
    ref = torch_conv(
        x, w, stride, (0, 0, 0, 0), b if epilogue.bias else None,
        r if epilogue.residual else None, epilogue.activation,
    )  # fmt: skip
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


class Bottleneck(nn.Module):
    """ResNet's bottleneck ends, smaller: 1x1 convs on 7x7 maps, a residual, a stride-2 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(400, 72, 1)
        self.expand = nn.Conv2d(72, 400, 1)
        self.project = nn.Conv2d(400, 50, 1)
        self.down = nn.Conv2d(50, 24, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.expand(torch.relu(self.reduce(x))) + x)
        return self.down(torch.relu(self.project(y)))


@pytest.mark.parametrize("target", ISA_TARGETS[:1])
def test_compiled_avx2_model_matches_pytorch(target):
    torch.manual_seed(0)
    model = Bottleneck().eval()
    x = np.random.default_rng(1).standard_normal((2, 400, 7, 7)).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    lanes = ["filters in vector lanes" in r.reason for r in cm.layers]
    assert lanes == [True, False, True, False]
    epilogues = ["bias+relu", "bias+residual+relu", "bias+relu", "bias"]
    assert [r.epilogue for r in cm.layers] == epilogues
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(cm(x) - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


def test_pass_rewrites_a_pointwise_conv_to_one_filters_in_lanes_call():
    """Before: a 1x1 conv + bias + ReLU, 384 -> 16 channels on 7x7 (8 lanes, 16 registers, 2
    cores). Expected: one call to the filters-in-lanes kernel, pinned (6 pixels x 2 vectors),
    on the input as it is and the weight transposed, packed 16 filters a tile."""
    w = np.random.default_rng(7).standard_normal((16, 384, 1, 1)).astype("float32")
    b = np.arange(16, dtype="float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 384, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
            y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    after = RewriteConv2D(num_threads=2)(bb.get())
    name = "dense_conv1x1_16x384"
    kernel = conv1x1_lanes_template(1, 384, 16, (7, 7), Epilogue(True, False, "relu"),
                                    AVX2_TILE, 2, name)  # fmt: skip
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 384, 7, 7), "float32"))
    gv = bb.add_func(kernel, name)
    with bb.function("main", [x]):
        with bb.dataflow():
            packed = w.reshape(1, 16, 384).transpose(0, 2, 1)  # (filter tiles, c, 16 filters)
            args = [x, relax.const(np.ascontiguousarray(packed)), relax.const(b)]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType((1, 16, 7, 7), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_template_realizes_the_kernel_and_its_space_is_pinned():
    cfg = default_conv1x1_lanes_config(8)
    func = conv1x1_lanes_template(1, 512, 64, (7, 7), Epilogue(True), cfg, 2, "f")
    expected = conv1x1_lanes_primfunc(1, 512, 64, (7, 7), Epilogue(True), cfg, 2, "f")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"rows": [6, 1, 2, 3, 4, 5, 7, 8]}


def test_a_tuning_record_replays_to_the_kernel_at_its_knobs():
    """A MetaSchedule trace on the template with 5 pixels a tile realizes the kernel at 5;
    the realized kernel matches PyTorch."""
    epilogue = Epilogue(True, False, "relu")
    func = conv1x1_lanes_template(1, 24, 20, (5, 5), epilogue, AVX2_TILE, 2, "f")
    target = resolve_target("x86-avx2")
    tuned = replay_at_knobs(func, target, {"rows": 5})
    expected = conv1x1_lanes_primfunc(1, 24, 20, (5, 5), epilogue, AVX2_TILE, 2, "f", tile_rows=5)
    assert str(tuned.body) == str(expected.body)
    if runs_here(target):
        rng = np.random.default_rng(5)
        x = rng.standard_normal((1, 24, 5, 5), "float32")
        w, b = rng.standard_normal((20, 24, 1, 1), "float32"), rng.standard_normal(20, "float32")
        lib = tvm.compile(tvm.IRModule({"main": tuned.with_attr("global_symbol", "main")}), target)
        out = tvm.runtime.tensor(np.zeros((1, 20, 5, 5), "float32"))
        lib["main"](*[tvm.runtime.tensor(a) for a in (x, _pack(w, 16), b)], out)
        ref = torch_conv(x, w, 1, (0, 0, 0, 0), b, None, "relu")
        np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))
