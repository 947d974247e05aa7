"""Pattern conv with filters in vector lanes: for layers whose filters share kernels in groups of
a vector's lanes (connectivity and patterns pruned per group of 16 filters on AVX-512; dense
convs, one full pattern: ``relay_passes.conv_plan._lanes_format``).

Modules as in ``schedules.pattern_conv2d``: ``config`` (the knobs), ``heuristics`` (defaults
and their measurements), ``tiling`` (tile geometry), ``emit`` (the TIR), ``template`` (the
MetaSchedule template and search space).

Each accumulator vector holds one output pixel of the group's ``lanes`` filters; a kernel (one
input channel, one pattern) loads its taps' weights as one vector per tap (the group's filters
side by side, ``lane_values``), and every input pixel the tile's taps read is loaded once as a
scalar broadcast and multiplied into each accumulator that reads it::

    parallel for share h (its own filter groups, or a contiguous run of the (row tile, filter
                          group, column tile) jobs: ``share_split``):
        for job (tile, g) of the share:
            acc[r, x, :] = 0                                   # rows x cols vectors
            for pattern p:                                     # one code path per pattern
                for k in kernel_ptr[g * lanes, p] .. kernel_ptr[g * lanes, p + 1]:
                    w_t = kernel_values[k', t, :]              # the group's filters
                    for each input pixel (iy, ix) the tile reads (unrolled):
                        b = broadcast(data[n, c, iy, ix])
                        acc[r, x, :] += w_t * b  for every (r, x, t) reading it
            out[filter_order[g * lanes + f], y0 + r, x0 + x] = epilogue(acc[r, x, f])

Every tile reads the input in place: the tiles clear of the padding through one code path,
each row tile and column tile reading padding through its own (compile-time positions, a
code path per combination), which skips the padding's loads and FMAs and those of output
rows past the map. Against staging the padded rows of those row tiles (the kernel's earlier
form), where a share copied 80-170 KB of rows for 0.05-0.1 ms of work: 1.28x on ResNet-18's
stride-2 layer on 14x14, 1.26x on its 7x7 map, 1.04-1.15x on 14- to 56-wide maps (back-to-back
runs of both builds on the AVX-512 VM; the staging alone, left out by a diagnostic build:
1.05-1.11x).

Every lane computes an output (no lanes past a row's end, no lane shifts, no transposed
staging: the ``pattern_conv2d`` kernel's costs on 7 * 2^k-wide maps); each broadcast feeds up
to taps FMAs. The output is transposed in registers (``transposed``: 24 shuffles per 8-pixel
row of 16 filters), each filter's row stored as a whole vector where the next column tile
rewrites what it writes past the tile (``overlap_width``). Measured on the AVX-512 VM
in-core (every load an L1 hit, staging and stores excluded): 410-510 useful GFLOP/s on
ResNet-18's 3x3 layers, 85-100 % of the FMA peak, against ~340 for 4 filters together.
"""

from .config import LanesConfig
from .emit import pattern_conv2d_lanes_primfunc, transposed
from .heuristics import (
    DENSE_ROWS,
    LINE_FLOATS,
    PREFETCH_ABOVE_BYTES,
    SHARED_INPUT_BYTES,
    STORE_BOUND_KERNELS,
    TILE_FMAS,
    lanes_default_config,
    most_accumulators,
    share_split,
)
from .template import PATTERN_CONV2D_LANES, pattern_conv2d_lanes_template
from .tiling import inside_tiles, lines_read, overlap_width, row_width, tile_readers

__all__ = [
    "DENSE_ROWS",
    "LINE_FLOATS",
    "PATTERN_CONV2D_LANES",
    "PREFETCH_ABOVE_BYTES",
    "SHARED_INPUT_BYTES",
    "STORE_BOUND_KERNELS",
    "TILE_FMAS",
    "LanesConfig",
    "inside_tiles",
    "lanes_default_config",
    "lines_read",
    "most_accumulators",
    "overlap_width",
    "pattern_conv2d_lanes_primfunc",
    "pattern_conv2d_lanes_template",
    "row_width",
    "share_split",
    "tile_readers",
    "transposed",
]
