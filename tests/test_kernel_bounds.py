"""The kernel-bound model (``tvm_sparse.kernel_bounds``) against counts made by hand, and the
configs it is fed: those ``compile`` builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schedules.pattern_conv2d import (
    ConvGeometry,
    PatternConvConfig,
    default_config,
    tile_defaults,
)
from schedules.pattern_conv2d_lanes import LanesConfig, lanes_default_config
from tvm_sparse.formats.pattern import PatternWeight
from tvm_sparse.kernel_bounds import applied_configs, kernel_bounds, lanes_kernel_bounds
from tvm_sparse.targets import num_cores, resolve_target, vector_lanes, vector_registers
from tvm_sparse.testing import pattern_prune_model_


def _weight(out_ch: int, in_ch: int, taps: tuple[int, ...], kept: np.ndarray) -> np.ndarray:
    """OIHW 3x3 weight: kernel (o, c) holds ``taps`` (flat indices) where ``kept[o, c]``."""
    w = np.zeros((out_ch, in_ch, 9), "float32")
    for t in taps:
        w[:, :, t] = kept
    return w.reshape(out_ch, in_ch, 3, 3)


GEOM = ConvGeometry(1, 1, 16, 16, 1, (3, 3), (1, 1), (1, 1, 1, 1))


def test_one_centre_tap_is_latency_bound_and_every_load_split() -> None:
    """16x16 output, 2 rows x 1 vector of 16 lanes per tile (8 tiles), staged rows of 18
    columns (16 + the taps' reach). Per kernel: 2 FMAs (1 cycle), 2 loads of 64 bytes (rows
    r + 1, column + 1: never on a 16-float line, so both split: 2 x 1.5 x 2 slots), 1
    broadcast, 1 channel index: 8 slots, 8/3 cycles. The tap's FMA latency (4 cycles) wins."""
    w = _weight(1, 1, (4,), np.ones((1, 1), bool))
    b = kernel_bounds(GEOM, PatternConvConfig(rows=2, vector=16), PatternWeight.from_dense(w))
    assert b["fma_per_kernel"] == 2 and b["accumulators"] == 2
    assert b["loads_per_fma"] == 1.0 and b["split_share"] == 1.0
    assert b["load_vs_fma"] == pytest.approx(8 / 3)
    assert b["lanes_used"] == 1.0 and b["imbalance"] == 1.0
    assert b["bound"] == "FMA latency" and b["ceiling"] == pytest.approx(0.25)


def test_taps_in_one_column_share_loads_across_rows() -> None:
    """Taps (0, 1) and (1, 1) over 2 output rows read staged rows 0, 1, 1, 2 of one column:
    3 loads for 4 FMAs. 8-lane vectors compute at half the widest vector's rate."""
    w = _weight(1, 1, (1, 4), np.ones((1, 1), bool))
    b = kernel_bounds(GEOM, PatternConvConfig(rows=2, vector=8), PatternWeight.from_dense(w))
    assert b["fma_per_kernel"] == 8  # 2 taps x 2 rows x 2 vectors
    assert b["loads_per_fma"] == pytest.approx(6 / 8)
    assert b["lanes_used"] == pytest.approx(0.5)


def test_vectors_past_the_last_column_are_not_counted() -> None:
    """A 7-wide output in tiles of 2 x 8-lane vectors: the second vector is never stored."""
    w = _weight(1, 1, (4,), np.ones((1, 1), bool))
    geom = ConvGeometry(1, 1, 7, 7, 1, (3, 3), (1, 1), (1, 1, 1, 1))
    b = kernel_bounds(
        geom, PatternConvConfig(rows=7, vector=8, cols=16), PatternWeight.from_dense(w)
    )
    assert b["vectors"] == 1 and b["fma_per_kernel"] == 7
    assert b["lanes_used"] == pytest.approx(49 / 56 / 2)


def test_unequal_filters_on_two_cores_are_imbalanced() -> None:
    """Two filters, 3 kernels and 1 kernel, one per core (one row tile): the busier core has
    3 of 4 kernels' cycles, 1.5x the mean."""
    kept = np.array([[True, True, True], [True, False, False]])
    w = _weight(2, 3, (0, 4, 5, 8), kept)
    geom = ConvGeometry(1, 3, 16, 16, 2, (3, 3), (1, 1), (1, 1, 1, 1))
    cfg = PatternConvConfig(rows=16, vector=16, shares=2)
    b = kernel_bounds(geom, cfg, PatternWeight.from_dense(w, num_shares=2))
    assert b["imbalance"] == pytest.approx(1.5)


def test_applied_configs_are_the_ones_compile_builds() -> None:
    """Without records: the pass's default config (this machine's x86 tile defaults)."""
    torch.manual_seed(0)
    net = pattern_prune_model_(torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1)))
    x = np.zeros((1, 16, 28, 28), "float32")
    (cfg,) = applied_configs(net.eval(), x, None).values()
    tgt = resolve_target("x86")
    cores = num_cores(tgt)
    geom = ConvGeometry(1, 16, 28, 28, 32, (3, 3), (1, 1), (1, 1, 1, 1))
    packed = PatternWeight.from_dense(net[0].weight.detach().numpy(), num_shares=cores)
    tiles = tile_defaults(geom, vector_registers(tgt), vector_lanes(tgt))
    assert cfg == default_config(geom, filter_group=packed.filter_group, shares=cores, **tiles)


def test_segmented_rows_load_each_staged_row_once_and_never_split() -> None:
    """64-wide output as 4 vectors of 16 segmented lanes, one row per tile: taps (1, 0),
    (1, 1), (1, 2) read segmented vectors j + dx in 0..5, the last two lane shifts of staged
    vectors 0 and 1: 4 aligned loads for 12 FMAs (the phase layout: 12 loads, all split: its
    staged rows of 66 columns start off a line)."""
    w = _weight(1, 1, (3, 4, 5), np.ones((1, 1), bool))
    geom = ConvGeometry(1, 1, 4, 64, 1, (3, 3), (1, 1), (1, 1, 1, 1))
    packed = PatternWeight.from_dense(w)
    seg = kernel_bounds(geom, PatternConvConfig(rows=1, vector=16, segmented=True), packed)
    assert seg["fma_per_kernel"] == 12
    assert seg["loads_per_fma"] == pytest.approx(4 / 12) and seg["split_share"] == 0.0
    assert seg["shuffles_per_fma"] == pytest.approx(2 / 12)
    phase = kernel_bounds(geom, PatternConvConfig(rows=1, vector=16), packed)
    assert phase["loads_per_fma"] == 1.0 and phase["split_share"] == 1.0


def test_lanes_kernel_on_a_stride_2_map_is_one_broadcast_per_fma() -> None:
    """Filters in lanes, 7x7 output of a 14x14 stride-2 input, tiles of 2 rows x 7 pixels,
    taps (0, 0), (0, 1), (1, 0), (1, 1): the tile reads rows 0-3 x columns 0-13, 56 distinct
    pixels for 56 FMAs; with 4 weight vectors (1.5 slots each) and the channel index 63 slots,
    21 cycles, under the FMAs' 28. The 4th row tile skips its row past the map: no lane idle."""
    w = _weight(16, 1, (0, 1, 3, 4), np.ones((16, 1), bool))
    geom = ConvGeometry(1, 1, 14, 14, 16, (3, 3), (2, 2), (1, 1, 1, 1))
    packed = PatternWeight.from_dense(w, num_shares=2)
    b = lanes_kernel_bounds(geom, LanesConfig(rows=2, cols=7, shares=2), packed)
    assert b["fma_per_kernel"] == 56 and b["accumulators"] == 14
    assert b["loads_per_fma"] == 1.0 and b["load_vs_fma"] == pytest.approx(21 / 28)
    assert b["lanes_used"] == 1.0 and b["imbalance"] == 1.0
    assert b["bound"] == "FMA" and b["ceiling"] == 1.0
    # 8 columns on the 7-wide map: the 8th of each tile row computes past the map.
    wide = lanes_kernel_bounds(geom, LanesConfig(rows=2, cols=8, shares=2), packed)
    assert wide["lanes_used"] == pytest.approx(7 / 8)
    # Prefetching: the next kernel's channel and 6 lines (5 rows of 14 floats, contiguous).
    pf = lanes_kernel_bounds(geom, LanesConfig(rows=2, cols=7, shares=2, prefetch=4), packed)
    assert pf["load_vs_fma"] == pytest.approx(70 / 3 / 28)


def test_lanes_kernel_taps_in_one_column_share_broadcasts() -> None:
    """Taps (0, 1) and (1, 1) over 2 rows x 8 pixels at stride 1 read input rows 0-2 of 8
    columns: 24 broadcasts for 32 FMAs."""
    w = _weight(16, 1, (1, 4), np.ones((16, 1), bool))
    geom = ConvGeometry(1, 1, 16, 16, 16, (3, 3), (1, 1), (1, 1, 1, 1))
    b = lanes_kernel_bounds(geom, LanesConfig(rows=2, cols=8), PatternWeight.from_dense(w))
    assert b["fma_per_kernel"] == 32 and b["loads_per_fma"] == pytest.approx(24 / 32)
    assert b["lanes_used"] == 1.0


@pytest.mark.skipif(vector_lanes(resolve_target("x86")) < 16, reason="no AVX-512 here")
def test_applied_configs_of_the_lanes_kernel() -> None:
    """Filters pruned per group of 16 on AVX-512 build the lanes kernel: its default config."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1))
    net = pattern_prune_model_(conv, filter_group=16)
    (cfg,) = applied_configs(net.eval(), np.zeros((1, 16, 28, 28), "float32"), None).values()
    geom = ConvGeometry(1, 16, 28, 28, 32, (3, 3), (1, 1), (1, 1, 1, 1))
    packed = PatternWeight.from_dense(net[0].weight.detach().numpy())
    tgt = resolve_target("x86")
    want = lanes_default_config(
        geom, vector_registers(tgt), num_cores(tgt), packed.num_kernels / 32
    )
    assert cfg == want
