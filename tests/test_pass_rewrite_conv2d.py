"""RewriteConv2D as a specification: Before / Expected modules, compared structurally."""

import numpy as np
import tvm
from kernel_utils import conv_bias_relu_module, packed_gemm_call_module
from tvm import relax

from relay_passes.pattern_conv2d import RewriteConv2D
from schedules.dense_conv2d import DenseConvConfig, dense_conv2d_template
from schedules.dense_gemm import GemmConfig, conv1x1_gemm_template
from schedules.depthwise_conv2d import DepthwiseConfig, depthwise_conv2d_template
from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    pattern_conv2d_template,
)
from schedules.tunable import knobs_of, tunable_block
from tvm_sparse.formats import PatternWeight
from tvm_sparse.testing import random_pattern_weight

X_SHAPE = (1, 8, 10, 10)
# The default configs the pass must choose at 8 lanes / 16 registers / 2 cores, pinned: a change
# to the defaults (``schedules/pattern_conv2d/heuristics.py``) has to change these too.
PER_FILTER = PatternConvConfig(rows=5, vector=8, filters=1, shares=2, prefetch=3)
GROUPS_OF_4 = PatternConvConfig(rows=1, vector=8, filters=4, shares=2, prefetch=3)


def _params(weight, residual):
    """The function's inputs: x, and the residual r when there is one."""
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    if not residual:
        return [x]
    return [x, relax.Var("r", relax.TensorType((1, weight.shape[0], 10, 10), "float32"))]


def _before(weight, bias=None, residual=False, relu=False, groups=1):
    bb = relax.BlockBuilder()
    params = _params(weight, residual)
    x, r = params[0], params[-1]
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1, groups=groups))
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            if residual:
                y = bb.emit(relax.op.add(y, r))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(weight, fmt, config, bias=None, residual=False, relu=False, num_threads=2):
    packed = PatternWeight.from_dense(weight, num_shares=num_threads, keep_zeros=(fmt == "dense"))
    geom = ConvGeometry(1, 8, 10, 10, weight.shape[0], (3, 3), (1, 1), (1, 1, 1, 1))
    epi = Epilogue(bias=bias is not None, residual=residual, activation="relu" if relu else "none")
    name = f"{fmt}_conv2d_{weight.shape[0]}x8x3x3"
    kernel = pattern_conv2d_template(
        geom,
        packed.patterns,
        packed.num_kernels,
        packed.kernel_values.shape[1],
        epi,
        config,
        name,
        packed.filter_group,
        8,
    )
    bb = relax.BlockBuilder()
    params = _params(weight, residual)
    x, r = params[0], params[-1]
    gv = bb.add_func(kernel, name)
    with bb.function("main", params):
        with bb.dataflow():
            args = [
                x,
                relax.const(packed.kernel_ptr),
                relax.const(packed.kernel_channel),
                relax.const(packed.kernel_values),
                relax.const(packed.filter_order),
            ]
            if bias is not None:
                args.append(relax.const(bias[packed.filter_order]))
            if residual:
                args.append(r)
            y = bb.emit(
                relax.call_tir(gv, args, relax.TensorType((1, weight.shape[0], 10, 10), "float32"))
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, **kwargs):
    records = []
    return RewriteConv2D(num_threads=2, records=records, **kwargs)(mod), records


def test_pattern_conv_with_fused_bias_residual_relu():
    w = random_pattern_weight(16, 8, seed=3)
    b = np.arange(16, dtype="float32")
    after, records = _run(_before(w, b, residual=True, relu=True))
    expected = _expected(w, "pattern", PER_FILTER, b, residual=True, relu=True)
    tvm.ir.assert_structural_equal(after, expected)
    assert [r.format for r in records] == ["pattern"]
    assert records[0].epilogue == "bias+residual+relu"


def test_filter_grouped_pattern_conv_computes_groups_together():
    """Connectivity and patterns shared by groups of 4 filters: packed with filter_group 4 and a
    default tile of 4 filters; the record says so."""
    w = random_pattern_weight(16, 8, kernel_keep=0.5, seed=7, filter_group=4)
    after, records = _run(_before(w, relu=True))
    tvm.ir.assert_structural_equal(after, _expected(w, "pattern", GROUPS_OF_4, relu=True))
    assert PatternWeight.from_dense(w, num_shares=2).filter_group == 4
    assert knobs_of(tunable_block(after["pattern_conv2d_16x8x3x3"]))["filters"] == 4
    assert "groups of 4" in records[0].reason


def test_unpruned_conv_goes_to_the_dense_kernel_and_says_why():
    w = np.random.default_rng(0).standard_normal((4, 8, 3, 3)).astype("float32")
    after, records = _run(_before(w, relu=True))
    tvm.ir.assert_structural_equal(after, _expected(w, "dense", GROUPS_OF_4, relu=True))
    assert records[0].format == "dense" and "FLOPs" in records[0].reason


def test_sparse_false_forces_dense():
    # 12 filters: not a whole number of 8-lane vectors, so the per-pixel kernel (16 filters at
    # 8 lanes take the filters-in-lanes kernel: tests/test_pattern_conv_lanes.py)
    w = random_pattern_weight(12, 8, seed=4)
    after, records = _run(_before(w), sparse=False)
    tvm.ir.assert_structural_equal(after, _expected(w, "dense", GROUPS_OF_4))
    assert records[0].format == "dense" and "in vector lanes" not in records[0].reason


def test_grouped_conv_is_left_to_tvm():
    w = np.ones((8, 4, 3, 3), "float32")  # 2 groups of 4 channels
    before = _before(w, groups=2)
    after, records = _run(before)
    tvm.ir.assert_structural_equal(after, before)
    assert records[0].format == "tvm" and "groups=2" in records[0].reason


def test_depthwise_conv_with_fused_bias_relu():
    """A depthwise conv and its bias + ReLU: one call to the depthwise kernel, read in place."""
    w = np.random.default_rng(6).standard_normal((8, 1, 3, 3)).astype("float32")
    b = np.arange(8, dtype="float32")
    after, records = _run(_before(w, b, relu=True, groups=8))
    geom = ConvGeometry(1, 8, 10, 10, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    # the default config at 8 lanes, pinned: 2 vectors a row, 4 rows in flight
    kernel = depthwise_conv2d_template(
        geom,
        Epilogue(bias=True, activation="relu"),
        DepthwiseConfig(4, 8),
        "depthwise_conv2d_8x1x3x3",
    )
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    gv = bb.add_func(kernel, "depthwise_conv2d_8x1x3x3")
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, relax.const(w.reshape(8, 9)), relax.const(b)]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType((1, 8, 10, 10), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert records[0].format == "depthwise" and records[0].epilogue == "bias+relu"


def test_few_channel_conv_with_fused_bias_residual_relu():
    """A dense conv on 3 input channels (a stem) and its bias, residual and ReLU: one call to
    the few-channel dense kernel on the input as it is, the weight packed as the GEMM's A."""
    w = np.random.default_rng(7).standard_normal((8, 3, 3, 3)).astype("float32")
    b = np.arange(8, dtype="float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 10, 10), "float32"))
    r = relax.Var("r", relax.TensorType((1, 8, 10, 10), "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, r)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    after, records = _run(bb.get())
    geom = ConvGeometry(1, 3, 10, 10, 8, (3, 3), (1, 1), (1, 1, 1, 1))
    # the default at 8 lanes / 16 registers, pinned: 4 filters x 3 vectors, 2 output rows a job
    cfg = DenseConvConfig(GemmConfig(4, 3, 8), out_rows=2)
    name = "dense_conv2d_8x3x3x3"
    kernel = dense_conv2d_template(geom, Epilogue(True, True, "relu"), cfg, name)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 10, 10), "float32"))
    r = relax.Var("r", relax.TensorType((1, 8, 10, 10), "float32"))
    gv = bb.add_func(kernel, name)
    with bb.function("main", [x, r]):
        with bb.dataflow():
            packed = w.reshape(2, 4, 27).transpose(0, 2, 1)  # (row tiles, c * kh * kw, rows)
            args = [x, relax.const(np.ascontiguousarray(packed)), relax.const(b), r]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType((1, 8, 10, 10), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert records[0].format == "dense" and records[0].epilogue == "bias+residual+relu"


def test_strided_conv_of_many_filters_is_the_gemm_over_its_gathered_windows():
    """A dense stride-2 3x3 conv of 256 filters (AVX2 registers) and its bias and ReLU: one call
    to the packed GEMM template reading its windows from the input as it is, the weight packed
    as A (O, C * 9)."""
    w = np.random.default_rng(8).standard_normal((256, 8, 3, 3)).astype("float32")
    b = np.linspace(-1, 1, 256, dtype="float32")
    after, records = _run(conv_bias_relu_module(X_SHAPE, w, b, stride=2))
    # the default at 8 lanes / 16 registers, pinned: 4 filters x 3 vectors, K = 72 in one pass
    # (at most 576), 4 k per iteration
    cfg = GemmConfig(4, 3, 8, k_block=0, unroll=4)
    name = "window_gemm_conv2d_256x8x3x3"
    kernel = conv1x1_gemm_template(1, 8, 256, (5, 5), Epilogue(True, False, "relu"), cfg, 2,
                                   name, 2, (10, 10), kernel=(3, 3), padding=(1, 1))  # fmt: skip
    expected = packed_gemm_call_module(X_SHAPE, kernel, name, w, b, (1, 256, 5, 5))
    tvm.ir.assert_structural_equal(after, expected)
    assert records[0].format == "dense" and "gathered windows" in records[0].reason


def test_shared_intermediate_is_not_fused():
    """A conv output with two users keeps its own value: only the conv is rewritten."""
    w = random_pattern_weight(8, 8, seed=5)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            z = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(relax.op.add(z, y))
        bb.emit_func_output(out)
    after, records = _run(bb.get())
    assert records[0].epilogue == ""
    calls = [b.value for b in after["main"].body.blocks[0].bindings]
    assert any(getattr(c.op, "name", "") == "relax.nn.relu" for c in calls)
