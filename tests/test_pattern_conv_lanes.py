"""The filters-in-lanes pattern conv kernel (``schedules.pattern_conv2d_lanes``): its weight
layout, its numerics against PyTorch over tile shapes, strides, paddings and epilogues, its
template, and RewriteConv2D choosing it for filter groups of the target's 16 lanes.

Tolerance: float32 sums of up to C*KH*KW products in a different order: rtol 1e-4, atol 1e-4.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from kernel_utils import torch_conv
from tvm import relax

import tvm_sparse
from relay_passes.pattern_conv2d import RewriteConv2D
from schedules.pattern_conv2d import ConvGeometry, Epilogue
from schedules.pattern_conv2d_lanes import (
    DENSE_ROWS,
    SHARED_INPUT_BYTES,
    LanesConfig,
    inside_tiles,
    lanes_default_config,
    lines_read,
    overlap_width,
    pattern_conv2d_lanes_primfunc,
    pattern_conv2d_lanes_template,
    share_split,
)
from schedules.tunable import kernel_name, knob_space, realize, tunable_block
from tvm_sparse.formats import PatternWeight
from tvm_sparse.targets import resolve_target, runs_here, vector_lanes
from tvm_sparse.testing import (
    pattern_conv_kernel,
    pattern_prune_model_,
    random_pattern_weight,
    randomize_batchnorm_,
)

TOL = {"rtol": 1e-4, "atol": 1e-4}
AVX512 = vector_lanes(resolve_target("x86")) == 16
LANES = [8, pytest.param(16, marks=pytest.mark.skipif(not AVX512, reason="no AVX-512 here"))]


def test_lane_values_put_each_groups_filters_side_by_side() -> None:
    w = random_pattern_weight(32, 12, kernel_keep=0.4, seed=2, filter_group=16)
    packed = PatternWeight.from_dense(w, num_shares=2)
    assert packed.filter_group == 16
    lanes = packed.lane_values(16)
    assert lanes.shape == (packed.num_kernels // 16, packed.kernel_values.shape[1], 16)
    for i0 in (0, 16):
        first = int(packed.kernel_ptr[i0, 0])
        for k in range(first, int(packed.kernel_ptr[i0, -1])):  # the leader's kernels
            span = int(packed.kernel_ptr[i0, -1]) - first
            members = packed.kernel_values[k + span * np.arange(16)]  # (filter, tap)
            np.testing.assert_array_equal(lanes[first // 16 + k - first], members.T)
    with pytest.raises(ValueError, match="not by 16 lanes"):
        PatternWeight.from_dense(random_pattern_weight(16, 8, filter_group=4)).lane_values(16)


# (out, in, height, width, kernel, stride, padding, config, epilogue, batch, keep, taps)
# fmt: off
CASES = [
    (16, 8, 12, 12, 3, 1, (1, 1, 1, 1), None, Epilogue(), 1, 0.3, 4),
    (32, 6, 13, 11, 3, 1, (1, 1, 1, 1), LanesConfig(3, 5, prefetch=2), Epilogue(True, True, "relu"),
     2, 0.5, 4),
    (16, 5, 13, 13, 3, 2, (1, 1, 1, 1), LanesConfig(2, 4, prefetch=4),
     Epilogue(True, activation="relu6"), 1, 0.5, 4),
    (16, 4, 9, 10, 3, 2, (0, 1, 1, 0), LanesConfig(1, 1), Epilogue(False, True), 1, 0.6, 4),
    (16, 4, 7, 7, 3, 1, (1, 1, 1, 1), LanesConfig(8, 8), Epilogue(True), 1, 0.5, 2),  # rows > map
    (16, 3, 10, 21, 3, 1, (1, 1, 1, 1), LanesConfig(2, 8), Epilogue(), 1, 1.0, 9),  # full taps
    (16, 6, 11, 9, 5, 2, (2, 2, 2, 2), LanesConfig(2, 3, prefetch=1), Epilogue(True, False, "relu"),
     1, 0.4, 9),
    (16, 4, 8, 8, 1, 1, (0, 0, 0, 0), LanesConfig(4, 4), Epilogue(True), 1, 0.5, 1),  # 1x1
    (16, 4, 8, 8, 3, 1, (1, 1, 1, 1), None, Epilogue(True), 1, 0.0, 4),  # every kernel pruned
    (64, 5, 9, 9, 3, 2, (1, 1, 1, 1), LanesConfig(2, 4, shares=4, prefetch=2),
     Epilogue(True, True, "relu"), 2, 0.5, 4),  # 4 cores, each its own groups
    (48, 5, 9, 9, 3, 1, (1, 1, 1, 1), LanesConfig(2, 4, shares=2), Epilogue(True), 1, 0.5, 4),
    (48, 5, 12, 14, 3, 1, (1, 1, 1, 1), LanesConfig(3, 7, shares=2), Epilogue(True, True, "relu"),
     1, 0.5, 4),  # runs of jobs holding whole rows of column tiles: 8-wide stores of 7 columns
]
# fmt: on


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_torch(case, lanes) -> None:
    o, c, h, w, k, stride, pad, cfg, epi, batch, keep, taps = case
    cfg = cfg if cfg is None or cfg.cols <= lanes else replace(cfg, cols=lanes)
    weight = random_pattern_weight(o, c, k, 8, keep, taps, seed=o + c + h, filter_group=lanes)
    rng = np.random.default_rng(h * w)
    x = rng.standard_normal((batch, c, h, w)).astype("float32")
    geom = ConvGeometry(batch, c, h, w, o, (k, k), (stride, stride), pad)
    bias = rng.standard_normal(o).astype("float32")
    residual = rng.standard_normal(torch_conv(x, weight, stride, pad).shape).astype("float32")
    run, packed = pattern_conv_kernel(geom, weight, epi, cfg, lanes=lanes)
    assert packed.filter_group % lanes == 0
    got = run(x, bias if epi.bias else None, residual if epi.residual else None).numpy()
    ref = torch_conv(x, weight, stride, pad, bias if epi.bias else None,
                     residual if epi.residual else None, epi.activation)  # fmt: skip
    np.testing.assert_allclose(got, ref, **TOL)


def test_cores_take_whole_filter_groups_unless_the_input_is_big() -> None:
    small = ConvGeometry(1, 256, 14, 14, 512, (3, 3), (2, 2), (1, 1, 1, 1))
    assert share_split(small, 32, 4, 2) == (2, 1)  # each core its own output planes
    assert share_split(small, 3, 4, 2) == (1, 2)  # groups that do not divide: runs of jobs
    assert share_split(small, 1, 1, 4) == (1, 1)  # one job: one share
    big = ConvGeometry(1, 64, 224, 224, 64, (3, 3), (1, 1), (1, 1, 1, 1))
    assert big.in_channels * big.height * big.width * 4 > SHARED_INPUT_BYTES
    assert share_split(big, 4, 28 * 28, 2) == (1, 2)  # each core reads only its rows


def test_default_tiles_fill_the_registers_and_divide_the_map() -> None:
    def cfg(size, stride=1):
        geom = ConvGeometry(1, 64, size, size, 64, (3, 3), (stride, stride), (1, 1, 1, 1))
        return lanes_default_config(geom, registers=32)

    assert cfg(56) == LanesConfig(rows=3, cols=8)  # 8 columns divide 56: 24 accumulators
    assert cfg(28) == cfg(14) == LanesConfig(rows=3, cols=7)  # 7 * 2^k maps: 7 columns
    assert cfg(56, stride=2) == LanesConfig(rows=3, cols=7, prefetch=4)  # 28 wide out
    assert cfg(7) == LanesConfig(rows=3, cols=7)  # 3 rows of 7 do not divide 7: still 3
    assert cfg(2).rows == 2  # never more rows than the map
    # Dense 3x3 convs (every kernel full): at most DENSE_ROWS rows, any map, any stride.
    for size, stride in ((56, 1), (28, 1), (56, 2), (14, 2), (7, 1)):
        geom = ConvGeometry(1, 64, size, size, 64, (3, 3), (stride, stride), (1, 1, 1, 1))
        dense = lanes_default_config(geom, registers=32, kernels_per_filter=64.0, dense=True)
        assert dense == replace(lanes_default_config(geom, 32, 2, 64.0), rows=DENSE_ROWS)
    # A 7x7 stem: 8 accumulators of 49 unrolled taps (bigger tiles outgrow the i-cache).
    stem = ConvGeometry(1, 3, 224, 224, 64, (7, 7), (2, 2), (3, 3, 3, 3))
    assert lanes_default_config(stem, kernels_per_filter=3.0) == LanesConfig(1, 8, prefetch=4)
    # ... and its search space stays within 2 x 8 (a 3x3 layer's: up to 8 x 16).
    small = replace(stem, height=40, width=40, out_channels=16)
    full = tuple(range(49))
    stem_cfg = lanes_default_config(small, kernels_per_filter=3.0)
    template = pattern_conv2d_lanes_template(small, (full,), 48, 49, 16, Epilogue(), stem_cfg, "s")
    space = knob_space(template)
    assert sorted(space["rows"]) == [1, 2] and sorted(space["cols"]) == list(range(4, 9))
    layer = ConvGeometry(1, 8, 20, 20, 16, (3, 3), (1, 1), (1, 1, 1, 1))
    pats, cfg3 = ((0, 1, 4, 5),), lanes_default_config(layer)
    space = knob_space(pattern_conv2d_lanes_template(layer, pats, 32, 4, 16, Epilogue(), cfg3, "k"))
    assert max(space["rows"]) == 8 and max(space["cols"]) == 16
    # ~1 kernel a filter (VGG's 3-channel layer): one row of a cache line's 16 columns.
    first = ConvGeometry(1, 3, 224, 224, 64, (3, 3), (1, 1), (1, 1, 1, 1))
    assert lanes_default_config(first, kernels_per_filter=0.5) == LanesConfig(rows=1, cols=16)
    assert lanes_default_config(first, kernels_per_filter=2.0) == LanesConfig(rows=3, cols=8)


def test_rows_are_stored_wide_only_where_the_next_job_rewrites_the_extra_pixels() -> None:
    assert overlap_width(cols=7, tiles_x=4, per_share=160) == 8  # a 28-wide map
    assert overlap_width(cols=5, tiles_x=3, per_share=30) == 8
    assert overlap_width(cols=3, tiles_x=2, per_share=6) == 4
    assert overlap_width(cols=8, tiles_x=7, per_share=70) == 8  # already a power of two
    assert overlap_width(cols=7, tiles_x=1, per_share=10) == 7  # no next column tile
    assert overlap_width(cols=7, tiles_x=2, per_share=15) == 7  # a share ends mid-row


def test_prefetch_where_a_groups_input_rows_outgrow_l1() -> None:
    def ahead(chans, size, keep=0.28, stride=1):
        geom = ConvGeometry(1, chans, size, size, 64, (3, 3), (stride, stride), (1, 1, 1, 1))
        return lanes_default_config(geom, kernels_per_filter=chans * keep).prefetch

    assert ahead(128, 28) == ahead(256, 14) == ahead(64, 56) == 0  # ResNet-18: 18 KiB
    assert ahead(512, 28) == ahead(512, 7) == ahead(64, 224) == 4  # 36-64 KiB
    assert ahead(512, 28, keep=0.05) == 0
    assert ahead(64, 56, stride=2) == 4


@pytest.mark.parametrize(
    "reach, span, pitch, skipped",
    [
        (5, 15, 14, {0}),
        (5, 15, 15, set()),
        (4, 17, 56, set()),
        (4, 9, 7, {0, 8}),
        (3, 40, 224, {39}),
    ],
)
def test_prefetches_touch_every_line_the_window_reads(reach, span, pitch, skipped) -> None:
    """Whatever the window's alignment, each 64-byte line it reads holds a prefetched element,
    and narrow rows sharing lines are not prefetched twice a row."""
    read = [dy * pitch + dx for dy in range(reach) for dx in range(span) if dx not in skipped]
    points = [dy * pitch + dx for dy, dx in lines_read(reach, span, pitch, skipped)]
    for base in range(16):  # the window's first element at each float of a line
        assert {(base + at) // 16 for at in read} == {(base + at) // 16 for at in points}
    assert len(points) <= 2 * reach * max(1, -(-span // 16))
    if pitch < 16:  # rows narrower than a line: about one prefetch a line
        assert len(points) <= -(-(reach * pitch) // 16) + 2


def test_template_default_is_the_hand_kernel() -> None:
    """Before: the template (its body the scalar analysis variant); Expected: the vectorized
    kernel at the default config."""
    geom = ConvGeometry(1, 8, 12, 12, 16, (3, 3), (1, 1), (1, 1, 1, 1))
    pats, cfg = ((0, 1, 4, 5), (1, 4, 7, 8)), LanesConfig(3, 6)
    template = pattern_conv2d_lanes_template(geom, pats, 32, 4, 16, Epilogue(True), cfg, "k")
    expected = pattern_conv2d_lanes_primfunc(geom, pats, 32, 4, 16, Epilogue(True), cfg, "k")
    realized = realize(template).without_attr("tvm_sparse.params")
    tvm.ir.assert_structural_equal(realized, expected)


def _conv_module(weight: np.ndarray, size: int = 10) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, weight.shape[1], size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def test_pass_puts_groups_of_16_filters_in_avx512_lanes() -> None:
    """Before: conv2d + relu with connectivity and patterns shared by groups of 16 filters;
    Expected at 16 lanes: the lanes kernel on ``lane_values``; at 8 lanes (AVX2) the lanes
    kernel too, a group as two vectors' worth of filters."""
    w = random_pattern_weight(32, 8, kernel_keep=0.5, seed=5, filter_group=16)
    packed = PatternWeight.from_dense(w, num_shares=2)
    geom = ConvGeometry(1, 8, 10, 10, 32, (3, 3), (1, 1), (1, 1, 1, 1))
    epi = Epilogue(activation="relu")
    name = "pattern_conv2d_32x8x3x3"
    cfg = LanesConfig(rows=3, cols=8, shares=2, prefetch=0)  # the default here, pinned
    kernel = pattern_conv2d_lanes_template(
        geom, packed.patterns, packed.num_kernels, 4, 16, epi, cfg, name
    )
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 10, 10), "float32"))
    gv = bb.add_func(kernel, name)
    consts = (packed.kernel_ptr, packed.kernel_channel, packed.lane_values(16),
              packed.filter_order)  # fmt: skip
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, *(relax.const(a) for a in consts)]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType((1, 32, 10, 10), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    records = []
    after = RewriteConv2D(num_threads=2, records=records, registers=32, lanes=16)(_conv_module(w))
    tvm.ir.assert_structural_equal(after, bb.get())
    assert "in vector lanes" in records[0].reason
    avx2 = RewriteConv2D(num_threads=2, registers=16, lanes=8)(_conv_module(w))
    block = tunable_block(avx2[name])
    assert kernel_name(block) == "pattern_conv2d_lanes"


@pytest.mark.skipif(not runs_here(resolve_target("x86-avx2")), reason="no AVX2 here")
def test_avx2_build_puts_groups_of_8_filters_in_lanes() -> None:
    """Pattern-pruned per group of 8 filters and a dense 3x3 conv, built for AVX2: both on the
    lanes kernel at 8 lanes (a dense 1x1 conv stays on the GEMM), numerics vs PyTorch."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(24, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 1),
    )  # fmt: skip
    net = pattern_prune_model_(net, kernel_keep=0.4, filter_group=8).eval()
    with torch.no_grad():
        net[2].weight.normal_()  # the second 3x3 conv unpruned
    x = np.random.default_rng(3).standard_normal((1, 8, 13, 13)).astype("float32")
    cm = tvm_sparse.compile(net, (x,), target="x86-avx2")
    assert [r.format for r in cm.layers] == ["pattern", "dense", "dense"]
    assert ["in vector lanes" in r.reason for r in cm.layers] == [True, True, False]
    with torch.no_grad():
        np.testing.assert_allclose(cm(x), net(torch.from_numpy(x)).numpy(), **TOL)


@pytest.mark.skipif(not AVX512, reason="the lanes kernel is chosen on AVX-512 targets only")
def test_compiled_model_with_filter_groups_of_16_matches_pytorch() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
    )  # fmt: skip
    net = pattern_prune_model_(net, kernel_keep=0.4, filter_group=16).eval()
    x = np.random.default_rng(0).standard_normal((1, 16, 14, 14)).astype("float32")
    cm = tvm_sparse.compile(net, (x,))
    assert sum("in vector lanes" in r.reason for r in cm.layers) == 2
    with torch.no_grad():
        np.testing.assert_allclose(cm(x), net(torch.from_numpy(x)).numpy(), **TOL)


@pytest.mark.parametrize(
    "kernel, size, expected",
    [
        (3, 10, "pattern_conv2d_lanes"),
        (1, 6, "pattern_conv2d"),  # 8 columns out
        (1, 10, "pattern_conv2d"),  # 12 columns out
        (7, 10, "pattern_conv2d_lanes"),
    ],
)
def test_dense_convs_take_the_lanes_kernel_where_it_is_faster(kernel, size, expected) -> None:
    """A dense weight (every kernel, one full pattern) of 32 filters at 16 lanes: in lanes but
    1x1 convs (padded here, so no GEMM: the per-pixel kernel)."""
    w = np.random.default_rng(kernel).standard_normal((32, 8, kernel, kernel)).astype("float32")
    records = []
    rewrite = RewriteConv2D(num_threads=2, records=records, registers=32, lanes=16)
    after = rewrite(_conv_module(w, size))
    assert records[0].format == "dense"
    assert kernel_name(tunable_block(after[f"dense_conv2d_32x8x{kernel}x{kernel}"])) == expected
    assert ("in vector lanes" in records[0].reason) == (expected == "pattern_conv2d_lanes")


@pytest.mark.skipif(not AVX512, reason="the lanes kernel is chosen on AVX-512 targets only")
@pytest.mark.parametrize("sparse", [True, False])
def test_compiled_dense_model_in_lanes_matches_pytorch(sparse) -> None:
    """Unpruned: the 7x7 stem on the few-channel dense kernel, the 3x3 conv on the lanes
    kernel, the stride-2 1x1 conv (ResNet's shortcut to a 7x7 map) on the GEMM, whether the
    weights are read for sparsity or not."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=2, padding=3), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 48, 1, stride=2),
    )  # fmt: skip
    net = randomize_batchnorm_(net).eval()
    x = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype("float32")
    cm = tvm_sparse.compile(net, (x,), sparse=sparse)
    assert [r.format for r in cm.layers] == ["dense"] * 3
    kernels = [r.reason.split("; ")[-1] for r in cm.layers]
    assert kernels == [
        "3 input channels: GEMM over phase-split input rows",
        "filters computed in vector lanes",
        "packed GEMM",
    ]
    with torch.no_grad():
        np.testing.assert_allclose(cm(x), net(torch.from_numpy(x)).numpy(), **TOL)


def test_only_tiles_reading_padding_leave_the_input_in_place() -> None:
    # ResNet-18's 56x56 3x3 pad 1 layer, 2-row tiles: the first / last row tile read padding rows.
    assert inside_tiles(2, 4, 1, 56, 28) == range(1, 27)
    # Stride 2 on 56x56 (28x28 out): only the top reads padding (row 55 is the last read).
    assert inside_tiles(4, 5, 1, 56, 14) == range(1, 14)
    # 7-wide columns on a 7x7 map: the one column tile reads both padding columns.
    assert inside_tiles(7, 9, 1, 7, 1) == range(1, 1)
    # A tail tile past the map's end reads past it too.
    assert inside_tiles(8, 10, 1, 21, 3) == range(1, 2)
