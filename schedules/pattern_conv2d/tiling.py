"""Geometry of the pattern conv kernel: how a config tiles a layer's output and lays out its
staged input (``Tiling``, ``StagedLayout``), and where each tap and prefetch reads. Plain
integer math, shared by the kernel emitter and ``tvm_sparse.kernel_bounds``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm

from ..geometry import ConvGeometry
from .config import PatternConvConfig


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


def segmented_vector(tl: Tiling, vec: int, v: int) -> tuple[int, int, list[int]]:
    """Where segmented vector v of a staged row (lane l: the row's column S * l + v, S =
    ``tl.segment``) comes from: (staged vector v % S, moved ``v // S`` lanes down, the lane
    indices of that shuffle of [staged vector, tail]; the tail's lane i holds column S * vec +
    i, zeros where no valid output lane reads past the row: ``Tiling.lane_tail``)."""
    seg = tl.segment
    move, at = divmod(v, seg)
    lanes = [x + move if x + move < vec else vec + seg * (x + move - vec) + at for x in range(vec)]
    return at, move, lanes
