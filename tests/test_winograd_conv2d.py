"""Dense 3x3 stride-1 convs as Winograd F(2x2, 3x3) (``schedules.winograd_conv2d``), the AVX2
build's kernel for them where it pays: the weight transform, the three kernels' numerics
against PyTorch on every x86 ISA this host runs (odd sizes, asymmetric padding, batch 2, the
epilogues), the plan's choice, the pass's Before/Expected, the GEMM's template and a compiled
model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import (
    ISA_TARGETS,
    ConvBlock,
    assert_matches_torch,
    conv_bias_relu_module,
    torch_conv,
)
from torch import nn
from tvm import relax

import tvm_sparse
from relay_passes.layer_plan import PlanTarget
from relay_passes.pattern_conv2d import RewriteConv2D
from relay_passes.plan_layers import plan_layers
from schedules.dense_gemm import GemmConfig, conv1x1_gemm_primfunc, pack_rows
from schedules.epilogue import Epilogue
from schedules.geometry import ConvGeometry
from schedules.tunable import knob_space, realize
from schedules.winograd_conv2d import (
    POSITIONS,
    WinogradConfig,
    default_winograd_config,
    pack_winograd_weight,
    winograd_fits,
    winograd_gemm_template,
    winograd_input_primfunc,
    winograd_output_primfunc,
    winograd_pays,
    winograd_tiles,
)
from tvm_sparse.frontend import import_model
from tvm_sparse.pipeline import lower, prepare
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.tuning import UntunableKernelWarning, tuning_tasks
from tvm_sparse.tuning.flops import estimate_flops

TOL = 1e-4  # float32, more additions than the direct conv: relative to the largest output


def _geom(c: int, o: int, size: int, stride: int = 1, batch: int = 1) -> ConvGeometry:
    return ConvGeometry(batch, c, size, size, o, (3, 3), (stride, stride), (1, 1, 1, 1))


def test_the_weight_transform_is_g_g_gt_packed_per_position():
    """U[xi] = G g G^T at position xi = 4a + b, each packed as the GEMM's A (``pack_rows``)."""
    w = np.random.default_rng(0).standard_normal((6, 5, 3, 3)).astype("float32")
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    packed = pack_winograd_weight(w, 4)
    assert packed.shape == (POSITIONS * 2, 5, 4) and packed.dtype == np.float32
    for a, b in ((0, 0), (1, 2), (3, 3)):
        u = np.array(
            [[g[a] @ w[o, c].astype("float64") @ g[b] for c in range(5)] for o in range(6)]
        )
        xi = 4 * a + b
        np.testing.assert_allclose(packed[2 * xi : 2 * xi + 2], pack_rows(u, 4), rtol=1e-6)


@pytest.mark.parametrize(
    ("geom", "tiles"),
    [(_geom(8, 8, 14), (7, 7)), (_geom(8, 8, 7), (4, 4)), (_geom(8, 8, 1), (1, 1))],
)
def test_tiles_cover_the_output_with_a_last_half_tile(geom, tiles):
    assert winograd_tiles(geom) == tiles


@pytest.mark.parametrize(
    ("geom", "pays"),
    [
        (_geom(256, 256, 14), True),
        (_geom(512, 512, 7), True),
        (_geom(64, 64, 56), True),
        (_geom(48, 48, 28), True),
        (_geom(128, 128, 7), True),  # C * O * tiles = 2^18
        (_geom(64, 64, 8), False),  # 2^16: three calls cost more
        (_geom(32, 64, 28), False),  # 32 input channels
        (_geom(64, 32, 28), False),  # 32 filters
        (_geom(64, 64, 112), False),  # V and M 26 MB
    ],
)
def test_winograd_pays_on_wide_layers_with_scratch_in_cache(geom, pays):
    assert winograd_pays(geom) is pays


def _run(geom: ConvGeometry, epilogue: Epilogue, target: str, rng) -> tuple:
    """The three kernels built for ``target`` and run one after another: (out, reference)."""
    tgt = tvm.target.Target(resolve_target(target))
    lanes, registers = vector_lanes(tgt), vector_registers(tgt)
    cfg = default_winograd_config(geom, lanes, registers)
    n, c, o = geom.batch, geom.in_channels, geom.out_channels
    x = rng.standard_normal((n, c, geom.height, geom.width), "float32")
    w = rng.standard_normal((o, c, 3, 3), "float32")
    out_shape = (n, o, geom.out_height, geom.out_width)
    b, r = rng.standard_normal(o, "float32"), rng.standard_normal(out_shape, "float32")

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)

    tiles = winograd_tiles(geom)
    v = tvm.runtime.tensor(np.full((n * POSITIONS, c, *tiles), np.nan, "float32"))
    m = tvm.runtime.tensor(np.full((n * POSITIONS, o, *tiles), np.nan, "float32"))
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"))
    build(winograd_input_primfunc(geom, lanes, "i"))(tvm.runtime.tensor(x), v)
    gemm = build(realize(winograd_gemm_template(geom, cfg, 2, "g")))
    gemm(v, tvm.runtime.tensor(pack_winograd_weight(w, cfg.gemm.rows)), m)
    operands = [b] * epilogue.bias + [r] * epilogue.residual
    build(winograd_output_primfunc(geom, epilogue, lanes, "o"))(
        m, *[tvm.runtime.tensor(a) for a in operands], out
    )
    ref = torch_conv(
        x, w, 1, geom.padding, b if epilogue.bias else None, r if epilogue.residual else None,
        epilogue.activation,
    )  # fmt: skip
    return out.numpy(), ref


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 20),
    filters=st.sampled_from([1, 5, 8, 13]),
    height=st.integers(1, 19),
    width=st.integers(1, 37),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    epilogue=st.sampled_from(
        [Epilogue(), Epilogue(True, False, "relu"), Epilogue(True, True, "relu6")]
    ),
)
def test_winograd_matches_pytorch(target, batch, channels, filters, height, width, padding,
                                  epilogue):  # fmt: skip
    """Odd outputs (a last half tile down and across), tile rows past the lanes (width up to
    37: 19 tiles), asymmetric padding, partial row tiles (filters not a multiple of 4)."""
    top, left, bottom, right = padding
    if height + top + bottom < 3 or width + left + right < 3:
        return
    geom = ConvGeometry(batch, channels, height, width, filters, (3, 3), (1, 1), padding)
    out, ref = _run(geom, epilogue, target, np.random.default_rng(height * 37 + width))
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize("size", [14, 7])
def test_winograd_matches_pytorch_on_resnet_widths(target, size):
    """512 input channels: the GEMM over K in two passes on AVX2; 7x7: tiles past the map."""
    geom = _geom(512 if size == 7 else 96, 64, size)
    out, ref = _run(geom, Epilogue(True, True, "relu"), target, np.random.default_rng(size))
    np.testing.assert_allclose(out, ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


@pytest.mark.parametrize(
    ("c", "size", "stride", "avx2"),
    [(64, 28, 1, "winograd"), (64, 28, 2, "dense_conv"), (32, 28, 1, "dense_conv"),
     (64, 8, 1, "lanes")],
)  # fmt: skip
def test_the_avx2_plan_takes_winograd_where_it_pays(c, size, stride, avx2):
    """AVX2: dense 3x3 stride-1 convs where ``winograd_pays``, else the direct kernels; AVX-512
    keeps the filters-in-lanes kernel."""
    mod = import_model(ConvBlock(c, c, stride).eval(), (torch.randn(1, c, size, size),)).mod
    (plan,) = plan_layers(mod, PlanTarget(8, 16, 2)).values()
    (avx512,) = plan_layers(mod, PlanTarget(16, 32, 2)).values()
    assert (plan.format, plan.kernel, avx512.kernel) == ("dense", avx2, "lanes")
    if avx2 == "winograd":
        assert plan.config == default_winograd_config(_geom(c, c, size), 8, 16)
        assert plan.packing.shape == (POSITIONS * c // 4, c, 4)
        assert plan.flops_kept == plan.flops_dense == 2 * c * c * 9 * size * size
        assert "Winograd" in plan.reason
    assert winograd_fits(plan.geometry) is (stride == 1)


def test_pass_rewrites_a_dense_conv_to_the_three_winograd_calls():
    """Before: conv2d + bias + ReLU, 64 -> 48 channels on 14x14 (8 lanes, 16 registers, 2
    cores). Expected: the input transform, the batched GEMM (16 weights, pinned 4 x 2 tile with
    the last tile column rows-in-lanes: 49 = 3 x 16 + 1) and the output transform with the
    epilogue's bias and ReLU."""
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((48, 64, 3, 3), "float32"), np.arange(48, dtype="float32")
    x_type = relax.TensorType((1, 64, 14, 14), "float32")
    after = RewriteConv2D(num_threads=2)(conv_bias_relu_module((1, 64, 14, 14), w, b))

    geom = ConvGeometry(1, 64, 14, 14, 48, (3, 3), (1, 1), (1, 1, 1, 1))
    cfg = WinogradConfig(GemmConfig(4, 2, 8, cross=1, unroll=4), 8)
    names = [f"winograd_conv2d_48x64x3x3_{part}" for part in ("input", "gemm", "output")]
    bb = relax.BlockBuilder()
    x = relax.Var("x", x_type)
    k_in = bb.add_func(winograd_input_primfunc(geom, 8, names[0]), names[0])
    k_gemm = bb.add_func(winograd_gemm_template(geom, cfg, 2, names[1]), names[1])
    k_out = bb.add_func(
        winograd_output_primfunc(geom, Epilogue(True, False, "relu"), 8, names[2]), names[2]
    )
    with bb.function("main", [x]):
        with bb.dataflow():
            v = bb.emit(relax.call_tir(k_in, [x], relax.TensorType((16, 64, 7, 7), "float32")))
            packed = relax.const(pack_winograd_weight(w, 4))
            m_type = relax.TensorType((16, 48, 7, 7), "float32")
            m = bb.emit(relax.call_tir(k_gemm, [v, packed], m_type))
            y = bb.emit(relax.call_tir(k_out, [m, relax.const(b)], relax.TensorType(
                (1, 48, 14, 14), "float32")))  # fmt: skip
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


def test_the_gemm_template_is_the_1x1_gemm_with_16_weights():
    geom = _geom(512, 512, 7)
    cfg = default_winograd_config(geom, 8, 16)
    assert cfg.gemm == GemmConfig(4, 3, 8, k_block=256, unroll=4)
    func = winograd_gemm_template(geom, cfg, 2, "g")
    expected = conv1x1_gemm_primfunc(
        16, 512, 512, 16, Epilogue(), cfg.gemm, 2, "g", (4, 4), weights=POSITIONS
    )
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"rows": [4, 1, 2], "vectors": [3, 1, 2, 4]}


class BasicBlock(nn.Module):
    """ResNet's basic block at 64 channels on 14x14: both 3x3 convs on Winograd, the second
    with the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(64, 64, 3, 1, 1), nn.Conv2d(64, 64, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


@pytest.mark.parametrize("target", ISA_TARGETS[:1])
def test_compiled_avx2_model_matches_pytorch(target):
    torch.manual_seed(0)
    model = BasicBlock().eval()
    x = np.random.default_rng(1).standard_normal((1, 64, 14, 14)).astype("float32")
    cm = tvm_sparse.compile(model, (x,), target=target)
    assert [r.epilogue for r in cm.layers] == ["bias+relu", "bias+residual+relu"]
    assert all("Winograd" in r.reason for r in cm.layers)
    assert_matches_torch(cm, model, x, TOL)


def test_tuning_takes_the_gemm_as_a_task_with_the_convs_useful_flops():
    """The GEMM template is a task carrying the direct conv's FLOPs (the report's FLOPs kept);
    the transforms are final kernels, no tasks; nothing is left out of tuning."""
    x = np.random.default_rng(0).standard_normal((1, 64, 28, 28)).astype("float32")
    tgt = resolve_target("x86-avx2")
    prepared, layers, _ = prepare(ConvBlock(64, 64).eval(), (x,), tgt, True)
    mod = lower(prepared, tgt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunableKernelWarning)
        tasks = tuning_tasks(mod, tgt)
    (layer,) = layers
    assert [t.task_name for t in tasks] == ["winograd_conv2d_64x64x3x3_gemm"]
    assert estimate_flops(tasks[0].dispatched[0]) == layer.flops_kept == 2 * 64 * 64 * 9 * 28 * 28
