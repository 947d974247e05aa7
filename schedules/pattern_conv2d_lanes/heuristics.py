"""Default filters-in-lanes configs and parallel split, with the measurements that chose them."""

from __future__ import annotations

import math

from ..buffers import LINE_FLOATS
from ..geometry import ConvGeometry
from .config import LanesConfig

STORE_BOUND_KERNELS = 2.0  # kernels per filter under this: tiles of one cache-line-wide row


TILE_FMAS = 400  # a kernel's FMAs in one code path (taps x accumulators), at most


def most_accumulators(geom: ConvGeometry) -> int:
    """The accumulators a tile may hold within ``TILE_FMAS`` unrolled FMAs per kernel (at the
    kernel's every tap). Dense 7x7 stem (3 x 224 x 224, stride 2, on the AVX-512 VM, 2
    threads): 1 x 8 tiles 0.72 ms, 2 x 4 0.75, 2 x 8 0.83, 3 x 8 1.22, 1 x 16 1.46, the
    per-pixel kernel 0.97: a 49-tap tile unrolls past the instruction cache from ~16
    accumulators. 3x3 layers stay within the registers' 24."""
    (kh, kw) = geom.kernel
    return max(1, TILE_FMAS // (kh * kw))


DENSE_ROWS = 2  # rows of a dense 3x3 conv's tile, at most (``lanes_default_config``)


def lanes_default_config(
    geom: ConvGeometry,
    registers: int = 32,
    shares: int = 2,
    kernels_per_filter: float | None = None,
    dense: bool = False,
) -> LanesConfig:
    """Columns dividing the output width (8, else 7: ResNet's 7 * 2^k maps), and the most rows
    within ``registers - 8`` accumulators and ``most_accumulators`` (the rest of the registers
    hold the taps' weights and broadcasts;
    rows past the map cost nothing: their FMAs are skipped); the prefetch distance from
    ``kernels_per_filter`` (``_prefetch_ahead``; None: not known). 3 rows instead of the 2
    that divided every height: 1.00-1.05x on ResNet-18's 3x3 layers, 1.03-1.06x on VGG-16's
    (A/B on the AVX-512 VM; 4 rows of 7: 0.72-1.05x).

    Under ``STORE_BOUND_KERNELS`` kernels per filter the epilogue outweighs the FMAs: tiles of
    one row of 16 columns (a cache line of each filter's row per store, where 16 divide the
    width). VGG-16's 3-channel first layer (~0.5 kernels a filter, 12.8 MB of output): 1.35x
    against 2 x 8 tiles, whose two column tiles write each line in halves (A/B on the AVX-512
    VM); on layers of 16 kernels a filter and more, 16 columns take 2.1-2.6x the time (a
    1 KiB accumulator row leaves the registers).

    ``dense`` 3x3 convs (every kernel full, 9 taps) take at most ``DENSE_ROWS`` rows. Kernels
    alone on AMD Zen 5 (AVX-512, 2 threads, medians of 5 interleaved rounds), 2 x 7 against
    the 3 x 7 / 3 x 8 default: ResNet's stride-2 layers 1.15-1.45x (128x128 on 56x56 0.69 ->
    0.49 ms, 256x256 on 28 0.71 -> 0.51, 512x512 on 14 0.60 -> 0.52), stride 1 1.0-1.2x
    (128x128 on 28x28 0.56 -> 0.46 ms); pruned to 4-tap patterns per group of 16 the 3-row
    tiles stay as fast or faster (0.95-1.1x), so only dense kernels are capped."""
    out_h, out_w = geom.out_height, geom.out_width
    unrolled = most_accumulators(geom)
    store_bound = kernels_per_filter is not None and kernels_per_filter < STORE_BOUND_KERNELS
    if store_bound and out_w % LINE_FLOATS == 0 and unrolled >= LINE_FLOATS:
        return LanesConfig(rows=1, cols=LINE_FLOATS, shares=max(1, shares))
    cols = next((c for c in (8, 7) if out_w % c == 0), min(8, out_w))
    rows = max(1, min(out_h, min(registers - 8, unrolled) // cols))
    if dense and geom.kernel == (3, 3):
        rows = min(rows, DENSE_ROWS)
    prefetch = _prefetch_ahead(geom, rows, kernels_per_filter or 0.0)
    return LanesConfig(rows=rows, cols=cols, shares=max(1, shares), prefetch=prefetch)


PREFETCH_ABOVE_BYTES = 24 * 1024  # a group's input rows past this: prefetch (``_prefetch_ahead``)


def _prefetch_ahead(geom: ConvGeometry, rows: int, kernels_per_filter: float) -> int:
    """Kernels ahead to prefetch: 4 on strided layers and where a group's input rows outgrow
    24 KiB (its kernels x the rows a row tile reads x the cache lines of an input row: what
    its column tiles share in L1), else 0. Measured on the AVX-512 VM (A/B in one process):
    4 ahead 1.05-1.24x on VGG-16's layers (32-64 KiB), 1.04x on ResNet-18's 512x512 on 7x7
    (36 KiB), 1.03-1.10x on its stride-2 layers (23 KiB: 5 rows a tile); 0.98-1.02x on its
    other stride-1 layers (18 KiB)."""
    (kh, _), (sh, _) = geom.kernel, geom.stride
    lines = math.ceil(geom.width * 4 / 64)
    group_bytes = kernels_per_filter * ((rows - 1) * sh + kh) * lines * 64
    return 4 if sh > 1 or group_bytes > PREFETCH_ABOVE_BYTES else 0


SHARED_INPUT_BYTES = 4 << 20  # inputs up to this: shares split by filter groups (``share_split``)


def share_split(geom: ConvGeometry, groups: int, tiles: int, shares: int) -> tuple[int, int]:
    """(group shares, job shares) of the parallel loop over ``groups`` filter groups x
    ``tiles`` output tiles: the groups split evenly over the cores where they divide and the
    input is at most ``SHARED_INPUT_BYTES`` (the packing balances contiguous group shares:
    ``balanced_filter_order``), else each core a contiguous run of the (row tile, group,
    column tile) jobs.

    Split by row tiles, both cores write the cache line where each output plane's halves meet,
    and a store to a line the other core holds stalls the store stream: 0.012 of the 0.019 ms
    left outside the kernel loops of ResNet-18's stride-2 layer on 14x14 (512 planes of 49
    pixels). Split by groups, each core reads the whole input instead of its rows: 0.95x on
    VGG-16's 64x64 on 224x224 (12.8 MB of input), where the planes are big and few. A/B on the
    AVX-512 VM: 1.09-1.14x on 7x7 outputs, 1.12x on VGG's 512x512 on 14x14, 1.03-1.06x on its
    28x28 and 56x56 layers, 1.00-1.03x on ResNet's 28x28 and 56x56 ones. (The
    ``pattern_conv2d`` kernel keeps runs of jobs: each core would stage every input row, 0.72-
    1.00x on ResNet-18's layers at 4 filters a group.)"""
    shares = max(1, min(shares, groups * tiles))
    input_bytes = geom.in_channels * geom.height * geom.width * 4
    if groups % shares == 0 and input_bytes <= SHARED_INPUT_BYTES:
        return shares, 1
    return 1, shares
