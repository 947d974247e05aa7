"""Default pattern conv configs per layer and target, with the measurements that chose them."""

from __future__ import annotations

import math

from ..buffers import STACK_BYTES
from ..geometry import ConvGeometry
from .config import PatternConvConfig
from .tiling import folded_rows, staged_width

# Output rows of at least this many vectors default to the lane-segmented layout (no split
# loads; ``PatternConvConfig.segmented``, ``segment_min_vectors``). Measured here (AVX-512,
# A/B in one process, kernels of 8 patterns on 28 % of the kernels, against the phase
# layout): per filter 56-wide maps (4 vectors) 1.10-1.19x, 28-wide (2) 1.15-1.30x, 14-wide
# (1) 1.19-1.30x, 7-wide at 8 lanes 1.24x from a stride-2 layer but 0.89-0.90x at stride 1,
# 112-wide 1.00-1.02x against the staged-shift segmented layout; 4 filters together: 56-wide
# 1.03-1.08x, 28-wide 1.02-1.25x, 14-wide 1.10x at stride 2 but 0.74x at stride 1, 7-wide
# 0.45-0.61x. Without 16-lane vectors (AVX2 code on this machine, per filter): 4-7 vectors
# 1.05-1.39x, 2 vectors 0.95-0.98x, 1 (stride 2) 1.15x; NEON unmeasured.
SEGMENT_MIN_VECTORS = {
    "per filter": 1,
    "per filter, 8 lanes, stride 1": math.inf,
    "filters together": 2,
    "other": 4,
}


def default_config(
    geom: ConvGeometry,
    filter_group: int = 1,
    vector: int = 8,
    accumulators: int = 12,
    shares: int = 2,
    fold_vector: int = 0,
) -> PatternConvConfig:
    """Largest register tile (filters x rows x width) within ``accumulators`` vector registers.

    Each accumulator row (one per filter and output row) must stay under 1 KiB so TVM keeps it
    on the stack (where LLVM promotes it to registers). ``tile_defaults`` gives vector /
    accumulators per target; ``shares``: the cores the filters were balanced over.
    ``fold_vector``: a wider vector that narrow maps may fill several rows at a time (``fold``),
    used when filters are computed together (else too few accumulators hide the FMA latency).
    """
    fold = 1
    if fold_vector and filter_group > 1:
        for f in (8, 4, 2):  # the largest fold that applies: fewest lanes wasted
            if folded_rows(geom, PatternConvConfig(vector=fold_vector, fold=f)) == f:
                fold, vector = f, fold_vector
                break
    vecs_per_row = 1 if fold > 1 else math.ceil(geom.out_width / vector)
    out_rows = math.ceil(geom.out_height / fold)  # accumulator rows the map needs
    budget = max(1, accumulators)
    cols = 0
    # Rows of enough vectors: the lane-segmented layout, whole rows per tile.
    # (Filters computed together: a row of each must fit the accumulators.)
    together = math.gcd(filter_group, 4) if budget >= 14 else 1
    least = segment_min_vectors(geom, together, vector, max(vector, fold_vector))
    segmented = least <= vecs_per_row <= budget // together and fold == 1
    segmented = segmented and vecs_per_row * vector * 4 <= STACK_BYTES
    if not segmented and (
        (vecs_per_row >= 4 and geom.out_width >= 64) or vecs_per_row * vector * 4 > STACK_BYTES
    ):
        # Wide maps: tall, narrow tiles (2 vectors wide) reuse each input row across more
        # output rows and keep the rows a tile reads in L1 (measured 74 -> 106 GFLOP/s at 224^2).
        vecs_per_row, cols = 2, 2 * vector
    filters = 1
    if filter_group > 1:
        # Measured here (AVX-512, 4 filters of 4 taps): 16 accumulators beat 8, 12 and 24.
        budget = 16 if budget >= 14 else budget
        if geom.kernel[0] * geom.kernel[1] > 9:
            # Large kernels (a 7x7 stem: 4 x 49 weights per input channel): 8 accumulators,
            # 1.44 -> 1.06 ms on ResNet's 64x3x7x7 s2 stem, ONNX Runtime's speed here.
            budget = min(budget, 8)
        for f in (4, 2):
            if filter_group % f == 0 and geom.out_channels % f == 0 and f * vecs_per_row <= budget:
                filters = f
                break
    rows = max(1, min(out_rows, budget // (filters * vecs_per_row)))
    # Prefer tiles that divide the output evenly (no wasted rows in the last tile); with stride
    # 2 down to half the rows (each output row reads two input rows: 256x128 s2 on 28x28, 2
    # rows of 14 instead of 4, 0.136 -> 0.117 ms).
    for r in range(rows, 0, -1):
        if out_rows % r == 0 and (r * 2 > rows or (geom.stride[0] > 1 and r * 2 == rows)):
            rows = r
            break
    return PatternConvConfig(
        rows=rows,
        vector=vector,
        filters=filters,
        cols=cols,
        shares=max(1, shares),
        # Segmented rows: prefetching 3 / 6 kernels ahead 0.95-1.05x per filter (56 to 14
        # wide), not worth its instructions.
        prefetch=0 if segmented else _prefetch_distance(geom, rows, fold, vecs_per_row * vector),
        fold=fold,
        segmented=segmented,
    )


def segment_min_vectors(geom: ConvGeometry, together: int, vector: int, lanes: int) -> float:
    """Vectors per output row from which the default stages rows lane-segmented
    (``SEGMENT_MIN_VECTORS``; ``together``: filters computed together, ``lanes``: the target's
    widest vector)."""
    if lanes < 16:
        return SEGMENT_MIN_VECTORS["other"]
    if together > 1:
        return SEGMENT_MIN_VECTORS["filters together"]
    if vector < 16 and geom.stride[1] == 1:
        return SEGMENT_MIN_VECTORS["per filter, 8 lanes, stride 1"]
    return SEGMENT_MIN_VECTORS["per filter"]


def _prefetch_distance(geom: ConvGeometry, rows: int, fold: int, cols: int) -> int:
    """Kernels ahead to prefetch (0: none). Measured here (each core staging its own rows,
    A/B in one process): 3 ahead beats 6 by 0-8 % (filter groups), none is 4-25 % slower on
    stride-1 layers; strided unfolded tiles read two planes of (rows - 1) * 2 + 3 rows, and
    prefetching them costs more than it hides (7-10 % slower with filter groups; per-filter
    stride-2 tiles of 7 rows: 0.26 -> 0.31 ms prefetched, a 7x7 stem likewise). Also none
    where a tile's rows span more than 24 cache lines (each kernel would issue that many
    prefetches beside its ~32 loads): no stride-1 layer of ResNet / VGG gets such tiles."""
    if geom.stride[1] > 1 and fold == 1:
        return 0
    return 3 if _tile_lines(geom, rows, fold, cols) <= 24 else 0


def _tile_lines(geom: ConvGeometry, rows: int, fold: int, cols: int) -> int:
    """Cache lines of one channel's staged input rows that a tile of ``rows`` reads."""
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    if fold > 1:
        return sh * sw * math.ceil((rows * fold + (kh - 1) // sh) * cols / fold / 16)
    # Whole rows are staged compact (``staged_width``); part-row tiles read cols + the reach.
    span = staged_width(geom, cols) if cols >= geom.out_width else cols + (kw - 1) // sw
    return sw * math.ceil(((rows - 1) * sh + kh) * span / 16)


def tile_defaults(geom: ConvGeometry, registers: int, lanes: int) -> dict:
    """Vector width and accumulator budget for a target (``registers``: 16 AVX2, 32 AVX-512
    or NEON; ``lanes``: fp32 lanes of the widest vector). Measured here on AVX-512: 16-lane
    tiles of up to 16 accumulators win when an output row is >= 12 wide (per-filter 56x56
    layers: 4 rows x 4 vectors, 9-17 % faster than the 2 rows 14 allowed once rounded to a
    divisor of 56), 8-lane tiles of up to 28 accumulators on 7-wide rows (a 16-lane vector
    would be half empty)."""
    if lanes >= 16 and geom.out_width >= 12:
        return {"vector": 16, "accumulators": 16}
    vector = min(lanes, 8)
    return {"vector": vector, "accumulators": registers - 4, "fold_vector": lanes}
