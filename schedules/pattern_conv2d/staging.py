"""TIR that stages a pattern conv's input rows into its scratch layouts: plain padded rows by
stride phase (or pre-shifted per tap column), lane-segmented rows, or rows gathered from an
input already in a ``StagedLayout``."""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from ..geometry import ConvGeometry
from .tiling import StagedLayout, Tiling


def stage_rows(pad, slot, data, geom: ConvGeometry, n, rows, row_phases: int, shifted: bool):
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
                            gather_row(pad, data, dst, src, cols, width)
                        else:
                            _copy_row(pad, data, dst, src, row_w, width, ph - pl)


def stage_rows_from_staged(
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


def stage_rows_segmented(pad, slot, data, geom: ConvGeometry, n, rows, vec: int, tl: Tiling):
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
                    gather_row(pad, data, (*slot, ph, j), (n, slot[1], y), cols, geom.width, vec)


def gather_columns(data, row: tuple, cols: list[int], width: int, vec: int) -> tirx.PrimExpr:
    """The vector of ``data[(*row, x)]`` for x in ``cols``, 0 where x is outside [0, width): a
    shuffle of the row's ``vec``-column vectors it needs (the last one shorter) and a zero; a
    scalar for one column."""
    if len(cols) == 1:
        x = cols[0]
        return data[(*row, x)] if 0 <= x < width else tvm.tirx.const(0.0, "float32")
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


def gather_row(
    dst,
    data,
    dst_row: tuple,
    src_row: tuple,
    cols: list[int],
    width: int,
    lanes: int = 16,
    start: int = 0,
) -> None:
    """dst[*dst_row, start + q] = data[*src_row, cols[q]] (0 outside [0, width)) for every q,
    ``lanes`` at a time, each a shuffle of the input vectors it reads (``gather_columns``).
    Measured here on stride-2 phase rows against strided loads (TVM emits those lane by lane):
    15 % less staging time, 1.03-1.04x on the groups-of-4 layers that stage them."""
    for v in range(0, len(cols), lanes):
        part = cols[v : v + lanes]
        value = gather_columns(data, src_row, part, width, lanes)
        at = start + v if len(part) == 1 else tirx.Ramp(start + v, 1, len(part))
        T.buffer_store(dst, value, [*dst_row, at])


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
