"""The generated pattern conv kernel against PyTorch's conv2d, over generated layers.

Tolerance: float32 sums of up to C*KH*KW products in a different order: rtol 1e-4, atol 1e-4.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import run_pattern_conv, torch_conv

from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    folded_rows,
    staged_width,
)
from tvm_sparse.formats import PatternWeight
from tvm_sparse.testing import random_pattern_weight

TOL = {"rtol": 1e-4, "atol": 1e-4}


def assert_epilogue_matches_torch(x, weight, stride, pad, cfg, activation, rng) -> None:
    """Run the kernel with a random bias and residual and ``activation`` fused (every epilogue
    term) and compare it with PyTorch."""
    bias = rng.standard_normal(weight.shape[0]).astype("float32")
    residual = rng.standard_normal(torch_conv(x, weight, stride, pad).shape).astype("float32")
    epi = Epilogue(bias=True, residual=True, activation=activation)
    got = run_pattern_conv(x, weight, stride, pad, epi, bias, residual, cfg)
    ref = torch_conv(x, weight, stride, pad, bias, residual, activation)
    np.testing.assert_allclose(got, ref, **TOL)


@st.composite
def conv_layers(draw):
    kernel = draw(st.sampled_from([1, 3, 3, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    pad = kernel // 2
    return dict(
        batch=draw(st.integers(1, 2)),
        in_ch=draw(st.integers(1, 12)),
        out_ch=draw(st.integers(1, 12)),
        height=draw(st.integers(max(kernel - 2 * pad, 1), 13)),
        width=draw(st.integers(max(kernel - 2 * pad, 1), 19)),
        kernel=kernel,
        stride=stride,
        pad=pad,
        num_patterns=draw(st.integers(1, 12)),
        keep=draw(st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0])),
        taps=draw(st.sampled_from([1, 2, 4, 9])),
        activation=draw(st.sampled_from(["none", "relu", "relu6"])),
        bias=draw(st.booleans()),
        residual=draw(st.booleans()),
        rows=draw(st.sampled_from([None, 1, 3])),
        dense=draw(st.booleans()),
        filters=draw(st.sampled_from([1, 2, 4])),
        filter_group=draw(st.sampled_from([1, 2, 4])),
        col_vectors=draw(st.sampled_from([0, 1, 2])),
        shifted=draw(st.booleans()),
        segmented=draw(st.booleans()),
        vector=draw(st.sampled_from([4, 8, 16])),
        channel_block=draw(st.sampled_from([0, 0, 2, 5])),
        shares=draw(st.sampled_from([1, 2, 3])),
        prefetch=draw(st.sampled_from([0, 1, 6])),
        fold=draw(st.sampled_from([1, 2, 4])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_layers())
def test_generated_layers_match_torch(layer):
    rng = np.random.default_rng(layer["seed"])
    k = layer["kernel"]
    weight = random_pattern_weight(
        layer["out_ch"],
        layer["in_ch"],
        k,
        layer["num_patterns"],
        layer["keep"],
        taps=min(layer["taps"], k * k),
        seed=layer["seed"],
        filter_group=layer["filter_group"],
    )
    x = rng.standard_normal((layer["batch"], layer["in_ch"], layer["height"], layer["width"]))
    x = x.astype("float32")
    pad = (layer["pad"],) * 4
    bias = rng.standard_normal(layer["out_ch"]).astype("float32") if layer["bias"] else None
    ref_plain = torch_conv(x, weight, layer["stride"], pad)
    residual = rng.standard_normal(ref_plain.shape).astype("float32") if layer["residual"] else None
    epi = Epilogue(
        bias=bias is not None, residual=residual is not None, activation=layer["activation"]
    )
    # Filters computed together: a divisor of the packing's filter group (filters found to
    # share their kernels: a dense packing, or the weight's groups of filters).
    group = PatternWeight.from_dense(weight, keep_zeros=layer["dense"]).filter_group
    filters = max(f for f in (1, 2, 4) if f <= layer["filters"] and group % f == 0)
    cfg = None
    if layer["rows"]:
        cfg = PatternConvConfig(
            rows=layer["rows"], vector=layer["vector"], filters=filters,
            cols=layer["col_vectors"] * layer["vector"], shifted=layer["shifted"],
            segmented=layer["segmented"],
            channel_block=layer["channel_block"], shares=layer["shares"],
            prefetch=layer["prefetch"], fold=layer["fold"],
        )  # fmt: skip
    got = run_pattern_conv(
        x, weight, layer["stride"], pad, epi, bias, residual, cfg, keep_zeros=layer["dense"]
    )
    ref = torch_conv(x, weight, layer["stride"], pad, bias, residual, layer["activation"])
    np.testing.assert_allclose(got, ref, **TOL)


@pytest.mark.parametrize("block", [0, 16, 32])
def test_channel_block_order_matches_torch(block):
    """Input channels outermost (partial sums between blocks), several images, a filter with no
    kernel, every epilogue term: same result as the registers-only order and as PyTorch."""
    rng = np.random.default_rng(3)
    weight = random_pattern_weight(12, 40, 3, num_patterns=6, kernel_keep=0.3, seed=3)
    weight[5] = 0.0
    x = rng.standard_normal((2, 40, 9, 10)).astype("float32")
    cfg = PatternConvConfig(rows=4, vector=8, channel_block=block, shares=3)
    assert_epilogue_matches_torch(x, weight, 1, (1, 1, 1, 1), cfg, "relu", rng)


@pytest.mark.parametrize("keep_zeros", [False, True])
def test_dense_weight_and_all_zero_filters(keep_zeros):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 5, 3, 3)).astype("float32")
    weight[2] = 0.0  # a filter with no kernel left
    weight[4, :3] = 0.0  # connectivity pruning inside a filter
    x = rng.standard_normal((1, 5, 9, 11)).astype("float32")
    got = run_pattern_conv(x, weight, 1, (1, 1, 1, 1), keep_zeros=keep_zeros)
    np.testing.assert_allclose(got, torch_conv(x, weight, 1, (1, 1, 1, 1)), **TOL)
    assert np.all(got[0, 2] == 0.0)


def test_asymmetric_padding_and_7x7_stem():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3, 7, 7)).astype("float32")
    x = rng.standard_normal((1, 3, 17, 15)).astype("float32")
    for pad in [(3, 3, 3, 3), (0, 1, 2, 3)]:
        got = run_pattern_conv(x, weight, 2, pad, keep_zeros=True)
        np.testing.assert_allclose(got, torch_conv(x, weight, 2, pad), **TOL)


@pytest.mark.parametrize("filters", [1, 2, 4])
def test_filter_groups_share_loads_and_match_torch(filters):
    """Connectivity and patterns drawn per group of 4 filters: the packing finds the groups and
    the kernel computes ``filters`` of a group from one input load (stride 1 and 2, batch 2,
    every epilogue term)."""
    rng = np.random.default_rng(5)
    weight = random_pattern_weight(16, 24, 3, num_patterns=5, kernel_keep=0.3, seed=5,
                                   filter_group=4)  # fmt: skip
    assert PatternWeight.from_dense(weight, num_shares=2).filter_group == 4
    for stride in (1, 2):
        x = rng.standard_normal((2, 24, 11, 13)).astype("float32")
        cfg = PatternConvConfig(rows=3, vector=8, filters=filters)
        assert_epilogue_matches_torch(x, weight, stride, (1, 1, 1, 1), cfg, "relu6", rng)


def test_filters_together_must_divide_the_filter_group():
    weight = random_pattern_weight(8, 6, 3, kernel_keep=0.5, seed=1, filter_group=2)
    x = np.zeros((1, 6, 5, 5), "float32")
    with pytest.raises(ValueError, match="not a divisor of the filter group 2"):
        run_pattern_conv(x, weight, 1, (1, 1, 1, 1), config=PatternConvConfig(filters=4))


@pytest.mark.parametrize(
    ("size", "stride", "pad", "fold"),
    [
        (7, 1, (1, 1, 1, 1), 2),
        (3, 1, (1, 1, 1, 1), 4),
        (5, 1, (1, 1, 1, 1), 2),
        (6, 1, (2, 1, 0, 1), 2),
        (7, 1, (0, 0, 0, 0), 2),
        (14, 2, (1, 1, 1, 1), 2),
        (13, 2, (1, 1, 1, 1), 2),
        (6, 2, (1, 1, 1, 1), 4),
    ],
)
def test_folded_rows_match_torch(size, stride, pad, fold):
    """Several short output rows per vector (rows staged ``vector // fold`` wide by row and
    column phase of the stride, the right padding read from the next row's left padding):
    stride 1 and 2, even and odd sizes, uneven and no padding, a partial last tile, every
    epilogue term, groups of 4 filters."""
    rng = np.random.default_rng(size)
    weight = random_pattern_weight(8, 12, 3, num_patterns=4, kernel_keep=0.5, seed=size,
                                   filter_group=4)  # fmt: skip
    x = rng.standard_normal((2, 12, size, size)).astype("float32")
    geom = ConvGeometry(2, 12, size, size, 8, (3, 3), (stride, stride), pad)
    cfg = PatternConvConfig(rows=2, vector=16, filters=4, fold=fold, prefetch=3)
    assert folded_rows(geom, cfg) == fold
    assert_epilogue_matches_torch(x, weight, stride, pad, cfg, "relu", rng)


@pytest.mark.parametrize(
    ("size", "stride", "pad", "width"),
    [
        (28, 1, (1, 1, 1, 1), 32),  # 34 columns -> 32: two whole lines per row
        (14, 2, (1, 1, 1, 1), 16),  # stride 2: 17 -> 16 per phase, one line per row
        (13, 2, (1, 1, 1, 1), 16),  # odd size
        (12, 1, (0, 0, 2, 2), 16),  # padding only on the right: the last column's reach
        (30, 2, (1, 0, 1, 2), 16),  # uneven padding, stride 2
    ],
)
@pytest.mark.parametrize("group", [1, 4])
def test_compact_rows_match_torch(size, stride, pad, width, group):
    """Whole-row tiles stage rows of the columns valid outputs read, rounded up to a cache line
    (spare lanes read the next row and are not stored): fewer columns than the vectors' reach,
    a partial last tile of rows, every epilogue term."""
    rng = np.random.default_rng(size + group)
    weight = random_pattern_weight(8, 6, 3, num_patterns=4, kernel_keep=0.6, seed=size,
                                   filter_group=group)  # fmt: skip
    x = rng.standard_normal((2, 6, size, size)).astype("float32")
    geom = ConvGeometry(2, 6, size, size, 8, (3, 3), (stride, stride), pad)
    wide = -(-geom.out_width // 16) * 16
    assert staged_width(geom, wide) == width < wide + 2 // stride
    cfg = PatternConvConfig(rows=3, vector=16, filters=group, prefetch=2)
    assert_epilogue_matches_torch(x, weight, stride, pad, cfg, "relu6", rng)


def test_fold_does_not_apply_where_rows_do_not_fit():
    """Rows wider than ``vector // fold`` (8x8 at stride 1: 10 staged columns; 16x16 at
    stride 2: 9 columns in phase 0) or a tile of several vectors per row: fold 1."""
    cfg = PatternConvConfig(vector=16, fold=2)
    assert folded_rows(ConvGeometry(1, 4, 8, 8, 4, (3, 3), (1, 1), (1, 1, 1, 1)), cfg) == 1
    assert folded_rows(ConvGeometry(1, 4, 16, 16, 4, (3, 3), (2, 2), (1, 1, 1, 1)), cfg) == 1
    wide = PatternConvConfig(vector=16, fold=2, cols=32)
    assert folded_rows(ConvGeometry(1, 4, 7, 7, 4, (3, 3), (1, 1), (1, 1, 1, 1)), wide) == 1
