"""Pattern-sparse conv2d (NCHW, OIHW weight packed as ``PatternWeight``): TIR kernel generator.

The kernel is generated per layer with the layer's patterns baked in: each pattern is one code
path whose tap offsets ``(dy, dx)`` are compile-time constants, so the inner loop loads one input
channel index and the pattern's weights per kernel, then does ``taps x rows`` vector FMAs over an
output tile of ``rows x padded width``. A dense conv is the same kernel with one full pattern.

Structure (per image)::

    parallel for share h (one per core: a contiguous run of the (row tile, column tile, packed
                          filter) jobs, the split TVM's static schedule would make):
        pad[h, c, phase, Y, q] = the zero-padded input rows the share's tiles read, all
                                 channels, columns split by stride phase (contiguous loads)
        for job (tile, i) of the share:
            acc[rows, width] = 0
            for pattern p:                   # unrolled in Python: one code path per pattern
                for k in kernel_ptr[i, p] .. kernel_ptr[i, p + 1]:
                    c = kernel_channel[k]; w_t = kernel_values[k, t]
                    for r (unrolled), x (vectorized):    # s: stride
                        acc[r, x] += sum_t w_t * pad[h, c, dx_t % s, (y0+r)*s + dy_t, x + dx_t // s]
            out[filter_order[i], y0 + r, :W] = act(acc + bias[i] (+ residual))

Each core stages the rows it reads itself (the two tiles at a share boundary read a few rows
both stage): its reads stay in its own L2, and there is one parallel region per call, no
barrier between staging and compute. Staged over channels by all cores instead, half of each
core's reads came from the other core's cache: 4-20 % slower on ResNet-18's layers here.

Filters whose kernel lists are identical (same channels, same pattern per channel: a dense conv,
or connectivity + patterns pruned per group of filters) are packed in aligned groups; the kernel
then computes ``filters`` of them together, so each input vector load feeds that many FMAs
(PatDNN's load-redundancy elimination across filters).

Staged rows are as wide as the columns valid outputs read, rounded up to a cache line, where
that is less than the vectors' reach (whole-row tiles): the spare lanes of a row's last vector
read the next row and are never stored (``staged_width``).

Rows of enough vectors (``segment_min_vectors``) are staged lane-segmented (``segmented``; the
dimension-lifted transposition of Henretty et al., PACT 2011, for stencils): lane l of vector j
computes output column ``S * l + j`` (S vectors per row), and lane l of segmented vector q of
an input row holds column ``S * l + q``, so tap dx of vector j reads vector ``j + dx``: for q <
S one aligned load of the staged vector, shared by every vector and tap with the same ``j +
dx``, and past those (q = S + i is vector i moved one lane down) a lane shift of a loaded one
in registers (a 3-wide kernel: S loads and 2 shifts per input row, not 3 S loads of which 2 S
split across cache lines). Each staged vector is one shuffle of the input row's vectors (and
zeros for the padding), so staging is a transposition that takes no more memory than the
input; the accumulators are transposed back likewise before the epilogue.

A layer may read its input already staged and write its output in the next layer's staged
layout (``StagedLayout``, ``staged_input`` / ``staged_output``; paired by
``relay_passes.staged_layout``): the consumer then stages nothing, and the producer's
epilogue writes each staged vector as one shuffle of its finished accumulators instead of
transposing them back to NCHW.

Memory: a tile's input rows over all channels outgrow L1 (64 KiB at 128 channels of 28x28), and
a job reads its kernels' channels in an order no hardware prefetcher follows, so the kernel
prefetches the rows of the kernel ``prefetch`` ahead. Narrow outputs (<= 7 columns at 16 lanes)
``fold`` several output rows into one vector: rows are staged ``vector // fold`` wide, by phase
of the stride, and the right padding is read from the next row's left padding.

The schedule knobs (``PatternConvConfig``): rows and columns per tile, vector width, filters
computed together (grouped packings), the input staging layout, the loop order, prefetch
distance and fold. The order above keeps a filter's whole reduction in registers;
``channel_block`` > 0 puts the reduction over input channels outside instead, in blocks of that
many channels, so every filter of a parallel share reads the block's input rows while they are
in L1 (partial sums kept in a buffer between blocks). Each (filter, pattern) run is sorted by
channel, so a block's kernels are the next ones of the run: a per-run cursor walks them and the
packed layout is the same for both orders.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows
from .epilogue import activation
from .tunable import PARAMS_ATTR, Knobs, TunableKernel, default_knobs, register, template

EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6")
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
# TVM keeps a CPU allocation inside a parallel loop on the stack (not the workspace heap, where
# LLVM cannot prove it unaliased and keep it in registers) only when it is below this size.
STACK_BYTES = 1024


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape facts of an NCHW conv2d with an OIHW weight (symmetric padding allowed)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return (self.height + top + bottom - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.kernel[1]) // self.stride[1] + 1


@dataclass(frozen=True)
class Epilogue:
    """What is fused after the conv: per-filter bias, residual add, activation (in that order)."""

    bias: bool = False
    residual: bool = False
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.activation not in EPILOGUE_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")


@dataclass(frozen=True)
class PatternConvConfig:
    """Schedule knobs: output rows per tile, vector lanes along the output width, and filters
    computed together (a divisor of the packing's filter group: filters with the same kernel
    list, so each input vector load feeds ``filters`` FMAs)."""

    rows: int = 2
    vector: int = 8
    filters: int = 1
    # Output columns per tile (a multiple of ``vector``); 0: the whole row. Narrower tiles keep
    # the input rows a tile reads (over all channels) closer to L1.
    cols: int = 0
    # Input staged as one copy per tap column dx, pre-shifted so every vector load is aligned
    # (costs kw x the staging memory); otherwise one copy per stride phase, loads unaligned.
    shifted: bool = False
    # Lane-segmented staging (whole-row tiles, not folded; ``Tiling.segment``): vector lane l
    # computes output column ``S * l + j`` (S vectors per row, j the vector), and the input is
    # staged transposed to match, staged vector q < S of a row holding column ``S * l + q`` in
    # lane l. Every tap reads one aligned staged vector, shared by the vectors and taps that
    # read it, or one lane shift of it in registers (columns past S * l + S - 1): S loads per
    # input row of a 3-wide kernel, not 3 S of which 2 S split; the output is transposed back
    # in registers.
    segmented: bool = False
    # Loop order: 0 keeps each filter's reduction in registers; > 0 runs the input channels
    # outermost in blocks of this many, over ``shares`` parallel shares of the filters.
    channel_block: int = 0
    # Parallel shares (one per core). Registers-only order: contiguous runs of the jobs, each
    # staging the input rows it reads; channel-blocked: shares of the filters.
    shares: int = 2
    # Software prefetch: while computing kernel k, fetch the input rows of kernel k + prefetch
    # into L1 (0: off). A tile's input rows over all channels outgrow L1 (128 channels x 4
    # rows x 128 B = 64 KiB at 28x28), and a job reads its channels in an order no hardware
    # prefetcher follows: measured here, 4-8 kernels ahead cut 0.19 -> 0.165 ms (128x128 @ 28).
    prefetch: int = 0
    # Output rows per vector: the input is staged with rows of ``vector // fold`` columns (the
    # right border's zero column is the next row's left one), so one vector covers ``fold``
    # short output rows: a 7x7 map fills 16-lane vectors two rows at a time instead of 8-lane
    # vectors one row at a time. Applies where the rows fit (``folded_rows``), with whole rows
    # per tile, the phase staging and the registers-only order; else 1.
    fold: int = 1


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


def staged_width(geom: ConvGeometry, wide: int) -> int:
    """Columns of a staged input row (one stride phase) when tiles cover whole output rows of
    ``wide`` columns (padded to vectors): ``wide`` plus the taps' reach, or, where fewer, the
    columns valid outputs read rounded up to a cache line (16 floats). Then rows start on a
    line and a tile's rows span fewer lines (28x28: 32 columns, not 34; 14x14 stride 2: 16,
    not 17, one line per row instead of two); the spare lanes of a row's last vector read the
    next row and are not stored. (Tiles of part of a row keep the full width: rows of a
    multiple of 8 lines would put a tile's lines in a few cache sets, 16 % slower at 112x112.)
    """
    (_, kw), sw, left = geom.kernel, geom.stride[1], geom.padding[1]
    need = 0
    for phase in range(sw):
        last = _phase_columns(geom.width, left, phase, sw)[1]
        need = max(need, geom.out_width + _phase_reach(kw, sw, phase), last + 1)
    return min(wide + (kw - 1) // sw, -(-need // 16) * 16)


def folded_rows(geom: ConvGeometry, cfg: PatternConvConfig) -> int:
    """The fold ``cfg`` gets on ``geom``: ``cfg.fold`` where it applies, else 1.

    Folded, the input is staged by row and column phase of the stride, in rows of ``S = vector
    // fold`` columns, so output row y + 1 starts S lanes after row y. Each phase's row must
    hold its input columns (``< S``), and the columns a valid output lane reads past S (in the
    next staged row) must land in that row's left padding (zeros), standing for the right one.
    """
    fold = cfg.fold
    if fold <= 1 or cfg.vector % fold or cfg.shifted or cfg.segmented or cfg.channel_block > 0:
        return 1
    if cfg.cols not in (0, cfg.vector):
        return 1
    sw, kw, left = geom.stride[1], geom.kernel[1], geom.padding[1]
    row = cfg.vector // fold
    if row < geom.out_width:
        return 1
    for phase in range(sw):
        first, last = _phase_columns(geom.width, left, phase, sw)
        if last >= row:  # the phase's input columns do not fit in a row
            return 1
        reach = _phase_reach(kw, sw, phase)
        if reach >= 0 and geom.out_width - 1 + reach - row >= first:
            return 1  # a valid lane would read the next row's data, not its padding
    return fold


def _phase_reach(kw: int, stride: int, phase: int) -> int:
    """Furthest staged column offset (dx // stride) of a stride phase's taps; -1 if it has none."""
    return max((dx // stride for dx in range(phase, kw, stride)), default=-1)


def _phase_columns(width: int, left: int, phase: int, stride: int) -> tuple[int, int]:
    """First and last column q of a stride phase's staged row that hold input data (padded
    column q * stride + phase is input column q * stride + phase - left)."""
    return max(0, -((phase - left) // stride)), (width - 1 + left - phase) // stride


@dataclass(frozen=True)
class Tiling:
    """How a config tiles a layer's output and stages its input (derived, not knobs)."""

    fold: int  # output rows per accumulator row (``folded_rows``)
    tiles: int  # row tiles
    cols: int  # output columns per tile (a multiple of the vector)
    col_tiles: int  # column tiles
    row_phases: int  # row phases staged as separate planes (folded: the row stride)
    planes: int  # staged planes: row phases x (column phases of the stride, or tap columns)
    plane_rows: int  # staged rows per plane
    row_w: int  # columns of a staged row
    rows_in: int  # staged rows a tile reads (folded: per plane)
    tile_row: int  # staged rows from a row tile's first to the next one's
    row_step: int  # staged rows from an accumulator row's first to the next one's
    segment: int = 0  # vectors per row of the lane-segmented layout (0: another layout)
    # Segmented: a staged vector after a row's S, lane i holding column S * vec + i, where
    # valid output lanes read past the row's last lane (False: none do, zeros stand in).
    lane_tail: bool = False


def tiling(geom: ConvGeometry, cfg: PatternConvConfig) -> Tiling:
    """The tiling and staging layout ``cfg`` gets on ``geom``."""
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    out_h, out_w = geom.out_height, geom.out_width
    rows, vec = cfg.rows, cfg.vector
    fold = folded_rows(geom, cfg)
    tiles = math.ceil(out_h / (rows * fold))
    cols = vec if fold > 1 else cfg.cols or math.ceil(out_w / vec) * vec
    if cols % vec:
        raise ValueError(f"cols={cols} is not a multiple of vector={vec}")
    col_tiles = math.ceil(out_w / cols)
    wide = col_tiles * cols  # padded output width the vector loops cover
    pad_h = (tiles * rows * fold - 1) * sh + kh
    pad_q = wide + (kw - 1) // sw
    staged_h = pad_h
    # Lane-segmented: whole-row tiles only (segmented configs never fold), not shifted.
    segment = cols // vec if cfg.segmented and not cfg.shifted and col_tiles == 1 else 0
    lane_tail = False
    if segment:  # per stride phase, S transposed rows of ``vec`` lanes (and the tail)
        lane_tail = out_w - 1 + (kw - 1) // sw >= segment * vec
        pad_q = (segment + lane_tail) * vec
    elif not cfg.shifted and fold == 1 and col_tiles == 1 and staged_width(geom, wide) < pad_q:
        # Compact rows: the last vectors' spare lanes read into the next row (one more row
        # staged so the last plane's stay in bounds).
        pad_q, staged_h = staged_width(geom, wide), pad_h + 1
    if fold > 1:  # rows of vec // fold columns; the last vectors read a few rows past pad_h
        pad_q = vec // fold
        staged_h = (math.ceil(pad_h / sh) + math.ceil((vec + kw) / pad_q) + 1) * sh
    row_phases = sh if fold > 1 else 1
    return Tiling(
        fold=fold,
        tiles=tiles,
        cols=cols,
        col_tiles=col_tiles,
        row_phases=row_phases,
        planes=row_phases * (kw if cfg.shifted else sw),
        plane_rows=staged_h // row_phases,
        row_w=wide if cfg.shifted else pad_q,
        rows_in=rows * fold + (kh - 1) // sh if fold > 1 else (rows - 1) * sh + kh,
        tile_row=rows * fold if fold > 1 else rows * sh,
        row_step=fold if fold > 1 else sh,
        segment=segment,
        lane_tail=lane_tail,
    )


@dataclass(frozen=True)
class StagedLayout:
    """A stride-1 layer's input in its lane-segmented staged layout, as the producing layer
    writes it so the consumer stages nothing (``relay_passes.staged_layout``): a tensor (N, C,
    1, rows, row_w), row ``top + y`` holding input row y and the padding rows zero; staged
    vector q < S of a row holds padded column ``S * l + q`` in lane l, the tail vector (if any)
    column ``S * vector + i`` in lane i, 0 wherever the column is padding."""

    vector: int
    segment: int  # S: vectors per output row
    tail: bool
    rows: int  # top padding + height + bottom padding
    width: int  # the map's columns
    top: int
    left: int

    @property
    def row_w(self) -> int:
        return (self.segment + self.tail) * self.vector

    def shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels, 1, self.rows, self.row_w)

    def index(self, column):
        """Where padded column ``column`` (an int or a TIR expression) sits in a staged row."""
        seg, vec = self.segment, self.vector
        if isinstance(column, int):
            return column % seg * vec + column // seg if column < seg * vec else column
        return tvm.tirx.Select(column < seg * vec, column % seg * vec + column // seg, column)

    def columns(self) -> list[int]:
        """The padded column each position of a staged row holds."""
        main = [self.segment * lane + q for q in range(self.segment) for lane in range(self.vector)]
        return main + [self.segment * self.vector + i for i in range(self.vector * self.tail)]


def staged_layout(geom: ConvGeometry, cfg: PatternConvConfig) -> StagedLayout | None:
    """The layout in which ``cfg`` reads ``geom``'s input straight from its producer (no
    staging), or None: lane-segmented whole-row tiles of a stride-1 layer, one staged plane,
    registers-only loop order, and tiles that cover the rows exactly."""
    tl = tiling(geom, cfg)
    top, left, bottom, _ = geom.padding
    rows = geom.height + top + bottom
    if not tl.segment or geom.stride != (1, 1) or tl.planes != 1 or cfg.channel_block:
        return None
    if tl.plane_rows > rows:
        return None
    return StagedLayout(cfg.vector, tl.segment, tl.lane_tail, rows, geom.width, top, left)


def prefetch_lines(
    geom: ConvGeometry, cfg: PatternConvConfig, tl: Tiling
) -> tuple[list[tuple[int, int]], bool]:
    """The cache lines of one staged plane that prefetching a tile's rows touches: (row, column)
    offsets from the tile's first staged row; and whether the columns count from the tile's
    first column (part-row tiles) rather than the row's start (whole rows: one range)."""
    span = tl.cols + (0 if cfg.shifted else (geom.kernel[1] - 1) // geom.stride[1])
    if span >= tl.row_w or tl.segment:
        return [(0, j * 16) for j in range(math.ceil(tl.rows_in * tl.row_w / 16) + 1)], False
    per_row = math.ceil(span / 16) + 1
    return [(r, j * 16) for r in range(tl.rows_in) for j in range(per_row)], True


def tap_offset(
    geom: ConvGeometry, tl: Tiling, shifted: bool, dy: int, dx: int
) -> tuple[int, int, int]:
    """Where tap (dy, dx) reads for an accumulator row: (staged plane, rows below the row's
    first staged row, columns right of the output column)."""
    sh, sw = geom.stride
    if tl.fold > 1:  # plane (row phase, column phase)
        return dy % sh * sw + dx % sw, dy // sh, dx // sw
    if shifted:  # one pre-shifted copy per tap column
        return dx, dy, 0
    return dx % sw, dy, dx // sw  # (segmented: staged vectors, ``segmented_vector``)


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


def pattern_conv2d_primfunc(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    epilogue: Epilogue = Epilogue(),
    config: PatternConvConfig | None = None,
    name: str = "pattern_conv2d",
    filter_group: int = 1,
    staged_input: StagedLayout | None = None,
    staged_output: StagedLayout | None = None,
) -> tirx.PrimFunc:
    """Build the TIR kernel for one layer's geometry, pattern library and epilogue.

    Arguments, in order: data (N, C, H, W), kernel_ptr (O, P+1) i32, kernel_channel (K,) i32,
    kernel_values (K, max_taps) f32, filter_order (O,) i32, [bias (O,) f32 in packed order],
    [residual (N, O, Ho, Wo)], out (N, O, Ho, Wo).

    ``filter_group`` > 1 says the packed filters come in aligned groups of that size whose
    members have the same kernels (channels and patterns, in the same order; see
    ``PatternWeight.filter_group``): then ``config.filters`` (a divisor) are computed together.

    ``staged_input``: data arrives in that staged layout (shape ``StagedLayout.shape``), read as
    is where ``config`` has that layout (``staged_layout``), else staged from it.
    ``staged_output``: out is written in that layout (the consumer's), padding included.
    """
    cfg = config or default_config(geom, filter_group=filter_group)
    n_img, chans, height, width = geom.batch, geom.in_channels, geom.height, geom.width
    filters, kw = geom.out_channels, geom.kernel[1]
    group = cfg.filters
    if filter_group % group or filters % group:
        raise ValueError(
            f"{group} filters per job: not a divisor of the filter group {filter_group} "
            f"and of {filters} filters"
        )
    tl = tiling(geom, cfg)
    # Staged input read in place: the config's own layout (else staged from it like NCHW).
    in_place = staged_input is not None and staged_input == staged_layout(geom, cfg)
    if staged_input is not None and tl.segment:  # (else staged from it: a gather)
        same = (tl.segment, tl.lane_tail, tl.planes) == (staged_input.segment, staged_input.tail, 1)
        if not same or cfg.vector != staged_input.vector:
            raise ValueError(f"{cfg} cannot read the staged input {staged_input}")
    if staged_output is not None and epilogue.residual:
        raise ValueError("a staged output takes no residual (it is read in NCHW)")
    out_h, out_w = geom.out_height, geom.out_width
    rows, vec, fold, cols = cfg.rows, cfg.vector, tl.fold, tl.cols
    tiles, col_tiles, tile_row = tl.tiles, tl.col_tiles, tl.tile_row
    num_p = len(patterns)
    # Per pattern, where each tap reads: (plane, staged row offset, column offset).
    taps = [[tap_offset(geom, tl, cfg.shifted, *divmod(t, kw)) for t in pat] for pat in patterns]

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        data_shape = (n_img, chans, height, width)
        if staged_input is not None:
            data_shape = staged_input.shape(n_img, chans)
        data = T.arg("data", T.buffer(data_shape, "float32"))
        kptr = T.arg("kernel_ptr", T.buffer((filters, num_p + 1), "int32"))
        kchan = T.arg("kernel_channel", T.buffer((max(num_kernels, 1),), "int32"))
        kval = T.arg("kernel_values", T.buffer((max(num_kernels, 1), max_taps), "float32"))
        order = T.arg("filter_order", T.buffer((filters,), "int32"))
        bias = T.arg("bias", T.buffer((filters,), "float32")) if epilogue.bias else None
        out_shape = (n_img, filters, out_h, out_w)
        resid = T.arg("residual", T.buffer(out_shape, "float32")) if epilogue.residual else None
        if staged_output is not None:
            out_shape = staged_output.shape(n_img, filters)
        out = T.arg("out", T.buffer(out_shape, "float32"))

        def stage(pad, slot, n, c, first, count) -> None:
            """Stage rows first .. first + count of channel c's planes into pad[slot, c]."""
            span = (first, count)
            if staged_input is not None:
                _stage_rows_from_staged(pad, (slot, c), data, n, span, staged_input, tl.segment)
            elif tl.segment:
                _stage_rows_segmented(pad, (slot, c), data, geom, n, span, vec, tl)
            else:
                _stage_rows(pad, (slot, c), data, geom, n, span, tl.row_phases, cfg.shifted)

        zero = tvm.tirx.const(0.0, "float32")

        lines, from_tile_column = prefetch_lines(geom, cfg, tl)

        def prefetch_rows(pad, n, c, y, x0) -> None:
            """Prefetch the cache lines of channel c's input rows y .. y + rows_in of a tile."""
            for plane in range(tl.planes):
                for r, x in lines:
                    col = x0 + x if from_tile_column else x
                    addr = tvm.tirx.address_of(pad[n, c, plane, y + r, col])
                    T.evaluate(tvm.tirx.call_intrin("void", "tirx.prefetch", addr, 0, 3, 1))

        def add_kernel(acc, pad, n, row0, x0, k, p: int, span=0) -> None:
            """acc[f][r] += kernel k's taps (pattern p) for the filters of ``acc``, reading
            pad[n] from staged row ``row0``; filter f's copy of the kernel is ``f * span``
            kernels later (grouped filters)."""
            c = T.Bind(kchan[k])
            if cfg.prefetch:
                ahead = T.Bind(kchan[tvm.tirx.min(k + cfg.prefetch, max(num_kernels, 1) - 1)])
                prefetch_rows(pad, n, ahead, row0, x0)
            w = [
                [T.Bind(kval[k + f * span, t]) for t in range(len(taps[p]))]
                for f in range(len(acc))
            ]
            if tl.segment:
                _add_kernel_segmented(acc, pad, (n, c), row0, taps[p], w, tl, vec)
                return
            for r in range(rows):
                y0 = row0 + r * tl.row_step  # the first staged row of the tile's row r
                with T.unroll(0, cols // vec) as xo, T.vectorized(0, vec) as xi:
                    x = xo * vec + xi
                    col = x if fold > 1 else x0 + x  # (folded tiles are whole rows: x0 = 0)
                    src = [pad[n, c, plane, y0 + dy, col + dx] for plane, dy, dx in taps[p]]
                    for f in range(len(acc)):
                        total = acc[f][r][x]
                        for t in range(len(src)):
                            total = total + w[f][t] * src[t]
                        T.buffer_store(acc[f][r], total, [x])

        def new_tile(count: int, first=None):
            """``count`` x rows accumulator rows, set to ``first(f, r, x)`` (default 0). Each row
            is < 1 KiB so TVM keeps it on the stack, where LLVM holds it in registers."""
            acc = [accumulator_rows(rows, cols) for _ in range(count)]
            for f in range(count):
                for r in range(rows):
                    with T.unroll(0, cols // vec) as xo, T.vectorized(0, vec) as xi:
                        x = xo * vec + xi
                        value = zero if first is None else first(f, r, x)
                        T.buffer_store(acc[f][r], value, [x])
            return acc

        def store_tile(acc, n, tile, x0, i0) -> None:
            """out[filter_order[i0 + f], tile rows, x0 + ...] = epilogue(acc[f]), in bounds."""

            def finish(f, value, y=None, x=None):
                """epilogue(value) for filter f (residual at ``y``, ``x``)."""
                if bias is not None:
                    value = value + bias[i0 + f]
                if resid is not None:
                    value = value + resid[n, order[i0 + f], y, x]
                return activation(value, epilogue)

            def store(f, y, x, value):
                """out[n, filter f's, y, x] = epilogue(value) (``x`` a column, or a Ramp and
                ``value`` a vector)."""
                if staged_output is not None:
                    lay = staged_output
                    at = [n, order[i0 + f], 0, y + lay.top, lay.index(x + lay.left)]
                    T.buffer_store(out, finish(f, value), at)
                else:
                    T.buffer_store(out, finish(f, value, y, x), [n, order[i0 + f], y, x])

            if staged_output is not None:
                _store_staged_tile(
                    out, staged_output, acc, (n, order, i0), (tile, x0, out_h), tl, vec,
                    finish,
                )  # fmt: skip
                if tl.col_tiles == 1 and fold == 1:
                    return

            # Tiles start at multiples of ``vec``, so a row's last vector holds out_w % vec
            # columns: stored as one shorter vector (no per-element conditions).
            tail = out_w % vec
            for f in range(len(acc)):
                for r in range(rows):
                    if tl.segment:  # lane l of vector j holds column S * l + j: transpose
                        y = tile * rows + r
                        seg = tl.segment
                        vectors = [acc[f][r][tirx.Ramp(j * vec, 1, vec)] for j in range(seg)]
                        with T.If(y < out_h), T.Then():
                            for u in range(math.ceil(out_w / vec)):
                                lanes = range(u * vec, min(out_w, u * vec + vec))
                                index = [x % seg * vec + x // seg for x in lanes]
                                x = u * vec
                                if len(lanes) > 1:
                                    x = tirx.Ramp(x, 1, len(lanes))
                                store(f, y, x, tirx.Shuffle(vectors, index))
                        continue
                    if fold > 1:  # output row j of the fold: lanes j * pad_q ..
                        for j in range(fold):
                            y = (tile * rows + r) * fold + j
                            with T.If(y < out_h), T.Then(), T.vectorized(0, out_w) as x:
                                store(f, y, x, acc[f][r][j * tl.row_w + x])
                        continue
                    y = tile * rows + r
                    with T.If(y < out_h), T.Then(), T.serial(0, cols // vec) as xo:
                        with T.If(x0 + xo * vec + vec <= out_w):
                            with T.Then(), T.vectorized(0, vec) as xi:
                                store(f, y, x0 + xo * vec + xi, acc[f][r][xo * vec + xi])
                            if tail:
                                with T.Else(), T.If(x0 + xo * vec < out_w), T.Then():
                                    with T.vectorized(0, tail) as xi:
                                        store(f, y, x0 + xo * vec + xi, acc[f][r][xo * vec + xi])

        if cfg.channel_block > 0 and group == 1:
            # Every share reads every row: staged once, in parallel over channels.
            pad = T.alloc_buffer((n_img, chans, tl.planes, tl.plane_rows, tl.row_w), "float32")
            with T.parallel(0, n_img * chans) as nc:
                stage(pad, nc // chans, nc // chans, nc % chans, 0, tl.plane_rows)

            def add_tile_kernel(acc, n, tile, x0, k, p) -> None:
                add_kernel(acc, pad, n, tile * tile_row, x0, k, p)

            _channel_blocked(
                geom, cfg, num_p, (tiles, col_tiles, cols), (kptr, kchan, num_kernels),
                (add_tile_kernel, new_tile, store_tile),
            )  # fmt: skip
        else:
            jobs = filters // group
            per_tile = col_tiles * jobs
            total = tiles * per_tile
            shares = max(1, min(cfg.shares, total))
            per_share = math.ceil(total / shares)
            # Staged rows a tile reads (the last tile reads to the end), and a share's most:
            # its jobs span at most per_share // per_tile + 1 (started) row tiles.
            reach = tl.plane_rows - (tiles - 1) * tile_row
            window = min(tl.plane_rows, math.ceil(per_share / per_tile) * tile_row + reach)
            if not in_place:
                pad = T.alloc_buffer((shares, chans, tl.planes, window, tl.row_w), "float32")
            with T.serial(0, n_img) as n, T.parallel(0, shares) as share:
                lo = T.Bind(tvm.tirx.min(share * per_share, total))
                count = T.Bind(tvm.tirx.min(lo + per_share, total) - lo)
                first = 0 if in_place else T.Bind(lo // per_tile * tile_row)  # first staged row
                last_tile = (lo + count - 1) // per_tile
                with T.If(count > 0), T.Then():
                    if not in_place:
                        end = T.Bind(tvm.tirx.min(last_tile * tile_row + reach, tl.plane_rows))
                        with T.serial(0, chans) as c:
                            stage(pad, share, n, c, first, end - first)
                    # (Loops holding the allocations start at 0: see ``_channel_blocked``.)
                    with T.serial(0, count) as j:
                        job = lo + j
                        tile = job // per_tile
                        x0 = job % per_tile // jobs * cols
                        i0 = job % jobs * group
                        acc = new_tile(group)
                        # Grouped filters' kernels are stored one filter after the other.
                        span = T.Bind(kptr[i0 + 1, 0] - kptr[i0, 0]) if group > 1 else 0
                        row0 = tile * tile_row - first
                        source, slot = (data, n) if in_place else (pad, share)
                        for p in range(num_p):
                            with T.serial(kptr[i0, p], kptr[i0, p + 1]) as k:
                                add_kernel(acc, source, slot, row0, x0, k, p, span)
                        store_tile(acc, n, tile, x0, i0)
    # No global symbol: the module that takes the kernel names it (several layers share one).
    return ib.get().without_attr("global_symbol")


def _channel_blocked(geom, cfg, num_p, tiling, index, emit) -> None:
    """The channel-block-outer loop order (``cfg.channel_block`` > 0, one filter per tile).

    parallel for (row tile, column tile, share of the filters):
        for block b of ``channel_block`` input channels:
            for filter i of the share:
                acc = 0 if b == 0 else partial[i, tile]
                for pattern p: while run (i, p)'s next kernel has a channel in block b: add it
                partial[i, tile] = acc, or out = epilogue(acc) after the last block
    """
    tiles, col_tiles, cols = tiling
    kptr, kchan, num_kernels = index
    add_kernel, new_tile, store_tile = emit
    rows, vec, block = cfg.rows, cfg.vector, cfg.channel_block
    filters, n_img = geom.out_channels, geom.batch
    blocks = math.ceil(geom.in_channels / block)
    shares = max(1, min(cfg.shares, filters))
    per_share = math.ceil(filters / shares)
    last_kernel = max(num_kernels, 1) - 1
    partial = T.alloc_buffer((n_img, filters, tiles * rows, col_tiles * cols), "float32")
    per_image = tiles * col_tiles * shares
    with T.parallel(0, n_img * per_image) as job:
        n = job // per_image
        tile = job % per_image // (col_tiles * shares)
        x0 = job % (col_tiles * shares) // shares * cols
        share = job % shares
        # cursor[ii * P + p]: the next kernel of run (filter share * per_share + ii, pattern p).
        cursor = T.alloc_buffer((per_share * num_p,), "int32")
        # Loops start at 0 (a loop from a non-zero start holding these allocations miscompiled).
        with T.serial(0, per_share) as ii:
            i = tvm.tirx.min(share * per_share + ii, filters - 1)
            for p in range(num_p):
                T.buffer_store(cursor, kptr[i, p], [ii * num_p + p])
        with T.serial(0, blocks) as b, T.serial(0, per_share) as ii:
            i = T.Bind(share * per_share + ii)
            with T.If(i < filters), T.Then():
                acc = new_tile(
                    1,
                    lambda _f, r, x: T.Select(
                        b == 0, tvm.tirx.const(0.0, "float32"),
                        partial[n, i, tile * rows + r, x0 + x],
                    ),
                )  # fmt: skip
                limit = (b + 1) * block
                for p in range(num_p):
                    slot = ii * num_p + p
                    nxt = cursor[slot]
                    more = tvm.tirx.all(
                        nxt < kptr[i, p + 1], kchan[tvm.tirx.min(nxt, last_kernel)] < limit
                    )
                    with T.While(more):
                        k = T.Bind(cursor[slot])
                        add_kernel(acc, n, tile, x0, k, p)
                        T.buffer_store(cursor, k + 1, [slot])
                with T.If(b < blocks - 1):
                    with T.Then():
                        for r in range(rows):
                            with T.unroll(0, cols // vec) as xo, T.vectorized(0, vec) as xi:
                                x = xo * vec + xi
                                T.buffer_store(
                                    partial, acc[0][r][x], [n, i, tile * rows + r, x0 + x]
                                )
                    with T.Else():
                        store_tile(acc, n, tile, x0, i)


def _stage_rows(pad, slot, data, geom: ConvGeometry, n, rows, row_phases: int, shifted: bool):
    """Stage ``rows`` = (first, count) rows of image n's channel c into ``pad[slot]`` (slot =
    (lead, c)): row j of plane ``a * P + ph`` is padded input row ``(first + j) * row_phases +
    a``, column ``q * sw + ph`` (P = sw stride phases; ``shifted``: P = kw tap columns, each
    copy pre-shifted by its tap column ph = dx), 0 outside the image.

    Rows are copied or zeroed whole (one condition per row); within a row the border columns
    and the copy have compile-time bounds, so LLVM vectorizes them. ``row_phases`` > 1 splits
    the rows by phase of the row stride too (what a fold needs: consecutive output rows read
    consecutive rows of a plane).
    """
    height, width, (_, sw) = geom.height, geom.width, geom.stride
    (_, kw), (pt, pl, _, _) = geom.kernel, geom.padding
    first, count = rows
    col_phases = kw if shifted else sw
    row_w = int(pad.shape[-1])
    zero = tvm.tirx.const(0.0, "float32")
    for a in range(row_phases):
        for ph in range(col_phases):
            plane = a * col_phases + ph
            with T.serial(0, count) as j:
                y = (first + j) * row_phases + a - pt  # input row
                dst = (*slot, plane, j)
                with T.If(tvm.tirx.any(y < 0, y >= height)):
                    with T.Then(), T.serial(0, row_w) as q:
                        T.buffer_store(pad, zero, [*dst, q])
                    with T.Else():
                        src = (n, slot[1], y)
                        if sw > 1:  # (a strided ramp load is emitted lane by lane)
                            cols = [q * sw + ph - pl for q in range(row_w)]
                            _gather_row(pad, data, dst, src, cols, width)
                        else:
                            _copy_row(pad, data, dst, src, row_w, width, ph - pl)


def _stage_rows_from_staged(
    pad, slot, data, n, rows: tuple, lay: StagedLayout, segmented: bool
) -> None:
    """Stage ``rows`` = (first, count) rows of channel ``slot[1]`` from an input in the staged
    layout ``lay``, for configs that do not read it in place (``staged_layout``): rows copied
    as they are (``segmented``: the same layout), or gathered (stride 1: plane ph, row j,
    column q of ``pad[slot]`` hold padded row first + j, column q + ph); 0 past the layout."""
    first, count = rows
    planes, row_w = int(pad.shape[-3]), int(pad.shape[-1])
    held = len(lay.columns())
    with T.serial(0, count) as j, T.serial(0, planes * row_w) as e:
        y, ph, q = first + j, e // row_w, e % row_w
        inside = tvm.tirx.all(y < lay.rows, q + ph < held)
        at = e if segmented else lay.index(tvm.tirx.min(q + ph, held - 1))
        value = data[n, slot[1], 0, tvm.tirx.min(y, lay.rows - 1), at]
        T.buffer_store(
            pad, T.Select(inside, value, tvm.tirx.const(0.0, "float32")), [*slot, ph, j, q]
        )


def _store_staged_tile(out, lay: StagedLayout, acc, dest, where, tl: Tiling, vec: int, finish):
    """Write filter tile ``acc`` (``dest`` = (n, filter_order, i0), ``where`` = (row tile, x0,
    out_h)) into ``out`` in the staged layout ``lay``; ``finish(f, vector)`` applies the
    epilogue. Whole-row tiles (``vec``-lane accumulators): each staged vector is one shuffle
    of a row's finished accumulators and zeros (the padding lanes). Other tiles (part rows,
    folds) leave the data to the caller's stores and write the padding positions (scalars, by
    the job of the row's first column tile). The tiles with the first / last row also zero
    the padding rows above / below."""
    n, order, i0 = dest
    tile, x0, out_h = where
    rows, fold, lanes = len(acc[0]), tl.fold, lay.vector
    zero = tvm.tirx.const(0.0, "float32")
    columns = [c - lay.left for c in lay.columns()]  # the data column of each position
    seg = tl.segment

    def source(x: int) -> int:  # where column x sits in the row's accumulators
        return x % seg * vec + x // seg if seg else x

    for f in range(len(acc)):
        o = order[i0 + f]
        for r in range(rows):
            for j in range(fold):
                y = (tile * rows + r) * fold + j
                with T.If(tvm.tirx.all(y < out_h, x0 == 0)), T.Then():
                    for first, last in ((0, lay.top), (out_h + lay.top, lay.rows)):
                        edge = y == 0 if first == 0 else y == out_h - 1
                        with T.If(edge), T.Then(), T.serial(first, last) as row:
                            with T.vectorized(0, lay.row_w) as q:
                                T.buffer_store(out, zero, [n, o, 0, row, q])
                    if tl.col_tiles > 1 or fold > 1:  # the caller stores the data
                        for at, x in enumerate(columns):
                            if not 0 <= x < lay.width:
                                T.buffer_store(out, zero, [n, o, 0, y + lay.top, at])
                        continue
                    parts = [
                        finish(f, acc[f][r][tirx.Ramp(v * vec, 1, vec)])
                        for v in range(tl.cols // vec)
                    ]
                    parts.append(tirx.Broadcast(zero, vec))
                    for q in range(0, lay.row_w, lanes):
                        index = [
                            source(x) if 0 <= x < lay.width else tl.cols
                            for x in columns[q : q + lanes]
                        ]
                        at = [n, o, 0, y + lay.top, tirx.Ramp(q, 1, lanes)]
                        T.buffer_store(out, tirx.Shuffle(parts, index), at)


def segmented_vector(tl: Tiling, vec: int, v: int) -> tuple[int, int, list[int]]:
    """Where segmented vector v of a staged row (lane l: the row's column S * l + v, S =
    ``tl.segment``) comes from: (staged vector v % S, moved ``v // S`` lanes down, the lane
    indices of that shuffle of [staged vector, tail]; the tail's lane i holds column S * vec +
    i, zeros where no valid output lane reads past the row: ``Tiling.lane_tail``)."""
    seg = tl.segment
    move, at = divmod(v, seg)
    lanes = [x + move if x + move < vec else vec + seg * (x + move - vec) + at for x in range(vec)]
    return at, move, lanes


def _add_kernel_segmented(
    acc, pad, index: tuple, row0, taps: list, w: list, tl: Tiling, vec: int
) -> None:
    """acc[f][r] += sum_t w[f][t] * (tap t's input) in the lane-segmented layout: output vector
    j, tap dx reads segmented vector j + dx, loaded or (past the S staged) shifted in registers
    (``segmented_vector``); LLVM shares identical loads and shuffles among taps and filters."""
    zero = tirx.Broadcast(tvm.tirx.const(0.0, "float32"), vec)

    def vector(plane, row, v):
        at, move, lanes = segmented_vector(tl, vec, v)
        base = pad[(*index, plane, row, tirx.Ramp(at * vec, 1, vec))]
        if not move:
            return base
        tail = zero
        if tl.lane_tail:
            tail = pad[(*index, plane, row, tirx.Ramp(tl.segment * vec, 1, vec))]
        return tirx.Shuffle([base, tail], lanes)

    for r in range(len(acc[0])):
        y0 = row0 + r * tl.row_step
        for j in range(tl.segment):
            lanes = tirx.Ramp(j * vec, 1, vec)
            src = [vector(plane, y0 + dy, j + dx) for plane, dy, dx in taps]
            for f, weights in enumerate(w):
                total = acc[f][r][lanes]
                for t, value in enumerate(src):
                    total = total + tirx.Broadcast(weights[t], vec) * value
                T.buffer_store(acc[f][r], total, [lanes])


def _stage_rows_segmented(pad, slot, data, geom: ConvGeometry, n, rows, vec: int, tl: Tiling):
    """Stage ``rows`` = (first, count) rows of image n's channel c into ``pad[slot]`` in the
    lane-segmented layout (``PatternConvConfig.segmented``): lane l of row q of plane ph holds
    the phase's staged column ``S * l + q`` (padded input column ``(S * l + q) * sw + ph``), S
    = vectors per output row, q < S, then the tail (``Tiling.lane_tail``). Each staged row is
    one vector shuffle of the input row's vectors, loaded straight from ``data`` (measured here
    against staging each row plain into a scratch row first: 1.00-1.12x, the scratch's stores
    no longer forwarded to loads)."""
    sw, height, top, left = geom.stride[1], geom.height, geom.padding[0], geom.padding[1]
    first, count = rows
    row_w = int(pad.shape[-1])
    seg = tl.segment
    staged = [[seg * lane + q for lane in range(vec)] for q in range(seg)]
    if tl.lane_tail:
        staged.append([seg * vec + lane for lane in range(vec)])
    zero = tirx.Broadcast(tvm.tirx.const(0.0, "float32"), vec)
    with T.serial(0, count) as j:
        y = first + j - top
        with T.If(tvm.tirx.any(y < 0, y >= height)):
            with T.Then():
                for ph in range(sw):
                    for q in range(row_w // vec):
                        T.buffer_store(pad, zero, [*slot, ph, j, tirx.Ramp(q * vec, 1, vec)])
            with T.Else():
                for ph in range(sw):
                    cols = [column * sw + ph - left for vector in staged for column in vector]
                    _gather_row(pad, data, (*slot, ph, j), (n, slot[1], y), cols, geom.width, vec)


def _gather_columns(data, row: tuple, cols: list[int], width: int, vec: int) -> tirx.PrimExpr:
    """The vector of ``data[(*row, x)]`` for x in ``cols``, 0 where x is outside [0, width): a
    shuffle of the row's ``vec``-column vectors it needs (the last one shorter) and a zero."""
    zero = tirx.Broadcast(tvm.tirx.const(0.0, "float32"), vec)
    used = sorted({x // vec for x in cols if 0 <= x < width})
    if not used:
        return tirx.Broadcast(tvm.tirx.const(0.0, "float32"), len(cols))
    sources, start, at = [zero], {}, vec  # start[u]: where vector u begins in the concatenation
    for u in used:
        lanes = min(vec, width - u * vec)
        start[u], at = at, at + lanes
        ramp = tirx.Ramp(u * vec, 1, lanes) if lanes > 1 else u * vec
        sources.append(data[(*row, ramp)])
    return tirx.Shuffle(sources, [start[x // vec] + x % vec if 0 <= x < width else 0 for x in cols])


def _gather_row(
    dst, data, dst_row: tuple, src_row: tuple, cols: list[int], width: int, lanes: int = 16
) -> None:
    """dst[*dst_row, q] = data[*src_row, cols[q]] (0 outside [0, width)) for every q, ``lanes``
    at a time, each a shuffle of the input vectors it reads (``_gather_columns``). Measured here
    on stride-2 phase rows against strided loads (TVM emits those lane by lane): 15 % less
    staging time, 1.03-1.04x on the groups-of-4 layers that stage them."""
    for v in range(0, len(cols), lanes):
        part = cols[v : v + lanes]
        if len(part) == 1:
            x = part[0]
            value = data[(*src_row, x)] if 0 <= x < width else tvm.tirx.const(0.0, "float32")
            T.buffer_store(dst, value, [*dst_row, v])
        else:
            value = _gather_columns(data, src_row, part, width, lanes)
            T.buffer_store(dst, value, [*dst_row, tirx.Ramp(v, 1, len(part))])


def _copy_row(dst, src, dst_row: tuple, src_row: tuple, row_w: int, width: int, shift: int):
    """dst[*dst_row, q] = src[*src_row, q + shift] for q < row_w, 0 where q + shift is outside
    [0, width): the border columns zeroed, the rest copied in explicit 16-lane vectors (LLVM
    does not vectorize the plain loop: the staging buffer may alias the input)."""
    lo = min(row_w, max(0, -shift))
    hi = max(lo, min(row_w, width - shift))
    for q_lo, q_hi in ((0, lo), (hi, row_w)):  # columns left / right
        if q_hi > q_lo:
            with T.serial(q_lo, q_hi) as q:
                T.buffer_store(dst, tvm.tirx.const(0.0, "float32"), [*dst_row, q])
    if hi == lo:
        return
    lanes = 16
    full = (hi - lo) // lanes
    if full:
        with T.serial(0, full) as v, T.vectorized(0, lanes) as e:
            q = lo + v * lanes + e
            T.buffer_store(dst, src[(*src_row, q + shift)], [*dst_row, q])
    if (hi - lo) % lanes:  # the rest as one shorter vector (LLVM splits it into 8 / 4 / 2 / 1)
        with T.vectorized(0, (hi - lo) % lanes) as e:
            q = lo + full * lanes + e
            T.buffer_store(dst, src[(*src_row, q + shift)], [*dst_row, q])


# --- MetaSchedule search space (see schedules/tunable.py) -----------------------------------


def config_knobs(cfg: PatternConvConfig) -> Knobs:
    """A config as the integer knobs a tuning record stores."""
    return {
        "rows": cfg.rows,
        "vector": cfg.vector,
        "filters": cfg.filters,
        "col_vectors": cfg.cols // cfg.vector,
        "shifted": int(cfg.shifted),
        "segmented": int(cfg.segmented),
        "channel_block": cfg.channel_block,
        "shares": cfg.shares,
        "prefetch": cfg.prefetch,
        "fold": cfg.fold,
    }


def knobs_config(knobs: Knobs) -> PatternConvConfig:
    return PatternConvConfig(
        rows=knobs["rows"],
        vector=knobs["vector"],
        filters=knobs["filters"],
        cols=knobs["col_vectors"] * knobs["vector"],
        shifted=bool(knobs["shifted"]),
        segmented=bool(knobs.get("segmented", 0)),
        # Records written before the loop-order knob existed hold neither key.
        channel_block=knobs.get("channel_block", 0),
        shares=knobs.get("shares", 2),
        prefetch=knobs.get("prefetch", 0),
        fold=knobs.get("fold", 1),
    )


def _params(geom, patterns, num_kernels, max_taps, epilogue, name, filter_group, lanes):
    """A layer's kernel parameters (``staged_input`` / ``staged_output``: see
    ``with_staged_layouts``)."""
    return {
        "geom": asdict(geom),
        "patterns": [list(p) for p in patterns],
        "num_kernels": num_kernels,
        "max_taps": max_taps,
        "epilogue": asdict(epilogue),
        "name": name,
        "filter_group": filter_group,
        "lanes": lanes,
    }


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    return pattern_conv2d_primfunc(
        _geom(params),
        tuple(tuple(p) for p in params["patterns"]),
        params["num_kernels"],
        params["max_taps"],
        Epilogue(**params["epilogue"]),
        knobs_config(knobs),
        params["name"],
        params["filter_group"],
        *(_layout(params.get(key)) for key in ("staged_input", "staged_output")),
    )


def _layout(value: dict | None) -> StagedLayout | None:
    return StagedLayout(**value) if value else None


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Rows per tile 1-8, vector = the target's lanes or half, 0 (whole row) to 4 vectors per
    tile, 1/2/4 filters together (divisors of the packing's filter group), either staging
    layout, the loop order: reduction in registers, or input channels outermost in blocks
    of 16 / 32 / 64 (ungrouped packings only; ``shares``, the parallel split, stays at its
    default: one per core), the prefetch distance (0 / 3 / 6 / 12 kernels), and the folds that apply
    (output rows per vector on narrow maps)."""
    out_channels, out_h = params["geom"]["out_channels"], _geom(params).out_height
    in_channels = params["geom"]["in_channels"]
    lanes = params["lanes"]
    group = params["filter_group"]
    space = {
        "rows": list(range(1, min(out_h, 8) + 1)),
        "vector": sorted({lanes, max(4, lanes // 2)}),
        "filters": [f for f in (1, 2, 4) if group % f == 0 and out_channels % f == 0],
        "col_vectors": [0, 1, 2, 3, 4],
        "shifted": [0, 1],
        "segmented": [0, 1],
        "channel_block": [0] + [b for b in (16, 32, 64) if b < in_channels and group == 1],
        "shares": [default["shares"]],
        "prefetch": sorted({0, 3, 6, 12, default.get("prefetch", 0)}),
        "fold": sorted({1, default.get("fold", 1)} | set(_folds(_geom(params), lanes))),
    }
    staged_in = _layout(params.get("staged_input"))
    if staged_in:  # whole rows the tiles cover exactly (the layout's rows), no fold
        space.update(
            rows=[r for r in space["rows"] if out_h % r == 0],
            vector=[staged_in.vector], col_vectors=[0], fold=[1],
        )  # fmt: skip
    return space


def _folds(geom: ConvGeometry, lanes: int) -> list[int]:
    """Folds that apply to ``geom`` with ``lanes``-wide vectors."""
    return [f for f in (2, 4, 8) if folded_rows(geom, PatternConvConfig(vector=lanes, fold=f)) == f]


def _geom(params: dict) -> ConvGeometry:
    g = params["geom"]
    return ConvGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})


PATTERN_CONV2D = register(TunableKernel("pattern_conv2d", _build, _space))


def pattern_conv2d_template(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    epilogue: Epilogue,
    config: PatternConvConfig,
    name: str,
    filter_group: int,
    lanes: int,
) -> tirx.PrimFunc:
    """The kernel at ``config`` as a MetaSchedule template (``config`` is its default point)."""
    params = _params(geom, patterns, num_kernels, max_taps, epilogue, name, filter_group, lanes)
    return _template(params, config_knobs(config))


def _template(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    # The body is what MetaSchedule analyses (never built: ``tunable.realize`` regenerates the
    # kernel from the knobs). Its FLOP estimator has no rule for the vector shuffles and
    # broadcasts of the segmented layout (nor of the staged output's whole-row stores), so a
    # segmented default gets the phase layout's body (same FLOPs, same result).
    analysed = {**knobs, "segmented": 0}
    if params.get("staged_output"):
        analysed["col_vectors"] = 1
    return template(_build(params, analysed), PATTERN_CONV2D.name, params, knobs)


def template_input_layout(func: tirx.PrimFunc) -> StagedLayout | None:
    """The staged layout a pattern conv template would read its input from in place at its
    default knobs (None: it stages its input, or already reads a staged one)."""
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    if params.get("staged_input"):
        return None
    return staged_layout(_geom(params), knobs_config(default_knobs(func)))


def with_staged_layouts(
    func: tirx.PrimFunc, staged_input: StagedLayout | None, staged_output: StagedLayout | None
) -> tirx.PrimFunc:
    """A pattern conv template reading its input from / writing its output in staged layouts
    (``StagedLayout``; None: NCHW), at the same default knobs."""
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    params["staged_input"] = asdict(staged_input) if staged_input else None
    params["staged_output"] = asdict(staged_output) if staged_output else None
    return _template(params, default_knobs(func))
