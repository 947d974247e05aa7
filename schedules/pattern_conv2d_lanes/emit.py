"""The filters-in-lanes kernel's TIR, emitted with TVM's IRBuilder
(``pattern_conv2d_lanes_primfunc``): per-tile code paths that skip the padding, the broadcast
FMAs, and the transposed epilogue stores."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..buffers import STACK_BYTES, accumulator_rows
from ..epilogue import Epilogue, optional_load
from ..geometry import ConvGeometry
from .config import LanesConfig
from .heuristics import lanes_default_config, share_split
from .tiling import inside_tiles, lines_read, overlap_width, row_width, tile_readers


def pattern_conv2d_lanes_primfunc(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    lanes: int,
    epilogue: Epilogue = Epilogue(),
    config: LanesConfig | None = None,
    name: str = "pattern_conv2d_lanes",
    vectorize: bool = True,
) -> tirx.PrimFunc:
    """The TIR kernel for one layer. Arguments, in order: data (N, C, H, W), kernel_ptr (O,
    P+1) i32, kernel_channel (K,) i32, kernel_values (K / lanes, max_taps, lanes) f32
    (``PatternWeight.lane_values``), filter_order (O,) i32, [bias (O,) f32 in packed order],
    [residual (N, O, Ho, Wo)], out (N, O, Ho, Wo). The packed filters must come in groups of
    ``lanes`` with the same kernels. ``vectorize=False`` emits the lanes as scalar loops (the
    body MetaSchedule analyses: its FLOP counter has no rule for broadcasts and shuffles)."""
    cfg = config or lanes_default_config(geom)
    n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    if filters % lanes:
        raise ValueError(f"{filters} filters are not groups of {lanes} lanes")
    rows, cols = cfg.rows, cfg.cols
    if cols * lanes * 4 > STACK_BYTES:  # an accumulator row past it leaves the registers
        raise ValueError(f"cols={cols}: a row of {cols} x {lanes} lanes outgrows the stack")
    out_h, out_w = geom.out_height, geom.out_width
    tiles_y, tiles_x = math.ceil(out_h / rows), math.ceil(out_w / cols)
    groups = filters // lanes
    group_shares, job_shares = share_split(geom, groups, tiles_y * tiles_x, cfg.shares)
    shares, share_groups = group_shares * job_shares, groups // group_shares
    per_tile = tiles_x * share_groups
    total = tiles_y * per_tile  # jobs of a group share
    per_share = math.ceil(total / job_shares)
    tile_row, reach = rows * sh, (rows - 1) * sh + kh  # input rows: tile to tile, one tile's
    span = (cols - 1) * sw + kw  # input columns one tile reads
    (pt, pl, _, _), height, width = geom.padding, geom.height, geom.width
    # Tiles reading padding: code paths that skip it (and any rows past the map).
    inside_rows = inside_tiles(tile_row, reach, pt, height, tiles_y)
    inside_cols = inside_tiles(cols * sw, span, pl, width, tiles_x)
    edge_rows = [t for t in range(tiles_y) if t not in inside_rows]
    edge_cols = [t for t in range(tiles_x) if t not in inside_cols]
    num_p = len(patterns)
    readers = tile_readers(geom, patterns, rows, cols)

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        data = T.arg("data", T.buffer((n_img, chans, geom.height, geom.width), "float32"))
        kptr = T.arg("kernel_ptr", T.buffer((filters, num_p + 1), "int32"))
        kchan = T.arg("kernel_channel", T.buffer((max(num_kernels, 1),), "int32"))
        kval_shape = (max(num_kernels // lanes, 1), max_taps, lanes)
        kval = T.arg("kernel_values", T.buffer(kval_shape, "float32"))
        order = T.arg("filter_order", T.buffer((filters,), "int32"))
        out_shape = (n_img, filters, out_h, out_w)
        bias, resid = epilogue.declare_args((filters,), out_shape)
        out = T.arg("out", T.buffer(out_shape, "float32"))
        every = tirx.Ramp(0, 1, lanes)
        last_kernel = max(num_kernels, 1) - 1

        def fma(acc, r, x, w, b) -> None:
            """acc[r][x, :] += w * b (w: the tap's weights of the group, b: one input value)."""
            if vectorize:
                at = tirx.Ramp(x * lanes, 1, lanes)
                T.buffer_store(acc[r], acc[r][at] + w * tirx.Broadcast(b, lanes), [at])
                return
            with T.serial(0, lanes) as f:
                T.buffer_store(acc[r], acc[r][x * lanes + f] + w[f] * b, [x * lanes + f])

        def accumulate(acc, i0, load, edge: _Edge) -> None:
            """acc += the kernels of the group at packed filter i0 times the input: ``load(ch,
            dy, dx)`` reads channel ch at row / column dy / dx of the tile's input window, whose
            rows lie ``width`` elements apart; ``edge``'s padding (no load, no FMA) and output
            rows past the map (no FMA) skipped."""
            # The group's kernels sit lanes-to-a-row from its first (``lane_values``).
            base = T.Bind(kptr[i0, 0] - kptr[i0, 0] // lanes)
            for p in range(num_p):
                with T.serial(kptr[i0, p], kptr[i0, p + 1]) as k:
                    ch = T.Bind(kchan[k])
                    taps = len(patterns[p])
                    if vectorize:
                        w = [T.Bind(kval[k - base, t, every]) for t in range(taps)]
                    else:
                        w = [_row(kval, (k - base, t)) for t in range(taps)]
                    if cfg.prefetch:
                        ahead = T.Bind(kchan[tvm.tirx.min(k + cfg.prefetch, last_kernel)])
                        for dy, dx in lines_read(reach, span, width, edge.cols, edge.rows):
                            addr = tvm.tirx.address_of(load(ahead, dy, dx))
                            T.evaluate(tvm.tirx.call_intrin("void", "tirx.prefetch", addr, 0, 3, 1))
                    for (dy, dx), uses in readers[p]:
                        live = [(r, x, t) for r, x, t in uses if r < edge.live]
                        if dx in edge.cols or dy in edge.rows or not live:
                            continue
                        b = T.Bind(load(ch, dy, dx))
                        for r, x, t in live:
                            fma(acc, r, x, w[t], b)

        def column_paths(acc, n, i0, y_in, x0, columns: list[int], rows_edge: _Edge) -> None:
            """accumulate() from input row y_in: one code path per column tile of ``columns``
            (x0 a constant: the padding columns skipped), then one for the rest (none if
            ``columns`` are all of them)."""
            if not columns:
                x_in = T.Bind(x0 * sw - pl)

                def inner(ch, dy, dx):
                    return data[n, ch, y_in + dy, x_in + dx]

                accumulate(acc, i0, inner, rows_edge)
                return
            at = columns[0] * cols * sw - pl
            skipped = frozenset(dx for dx in range(span) if not 0 <= at + dx < width)
            edge = replace(rows_edge, cols=skipped)

            def load(ch, dy, dx):
                return data[n, ch, y_in + dy, at + dx]

            if len(columns) == 1 and len(inside_cols) == 0:
                accumulate(acc, i0, load, edge)
                return
            with T.If(x0 == columns[0] * cols):
                with T.Then():
                    accumulate(acc, i0, load, edge)
                with T.Else():
                    column_paths(acc, n, i0, y_in, x0, columns[1:], rows_edge)

        def row_paths(acc, n, i0, tile, x0, tiles: list[int]) -> None:
            """column_paths() per row tile of ``tiles`` (a constant: its padding rows and
            output rows past the map skipped), then for the rest (none if ``tiles`` are all)."""
            if not tiles:
                column_paths(acc, n, i0, T.Bind(tile * tile_row - pt), x0, edge_cols, _Edge(rows))
                return
            y_in = tiles[0] * tile_row - pt
            padding = frozenset(dy for dy in range(reach) if not 0 <= y_in + dy < height)
            edge = _Edge(min(rows, out_h - tiles[0] * rows), padding)
            if len(tiles) == 1 and len(inside_rows) == 0:
                column_paths(acc, n, i0, y_in, x0, edge_cols, edge)
                return
            with T.If(tile == tiles[0]):
                with T.Then():
                    column_paths(acc, n, i0, y_in, x0, edge_cols, edge)
                with T.Else():
                    row_paths(acc, n, i0, tile, x0, tiles[1:])

        def store_row(acc, n, y, x0, i0, width: int) -> None:
            """out[n, filter f's, y, x0 .. x0 + width] = epilogue(acc[f] of those pixels)."""

            def put(f, value, xs) -> None:
                value = epilogue.apply(
                    value,
                    optional_load(bias, i0 + f),
                    optional_load(resid, n, order[i0 + f], y, xs),
                )
                T.buffer_store(out, value, [n, order[i0 + f], y, xs])

            if not vectorize:
                for f in range(lanes):
                    with T.serial(0, width) as x:
                        put(f, acc[x * lanes + f], x0 + x)
                return
            pixels = [acc[tirx.Ramp(x * lanes, 1, lanes)] for x in range(cols)]
            rows_of = transposed(pixels, lanes)  # per filter: (vector, first lane) of its row
            for f, (vec, at) in enumerate(rows_of):
                if width == 1:
                    put(f, tirx.Shuffle([vec], [at]), x0)
                else:
                    row = tirx.Shuffle([vec], list(range(at, at + width)))
                    put(f, row, tirx.Ramp(x0, 1, width))

        def store_tile_row(acc, n, y, x0, i0, widths: list[int]) -> None:
            """store_row() at the first of ``widths`` the row has room for at x0."""
            with T.If(x0 + widths[0] <= out_w):
                with T.Then():
                    store_row(acc, n, y, x0, i0, widths[0])
                if widths[1:]:
                    with T.Else():
                        store_tile_row(acc, n, y, x0, i0, widths[1:])

        # Widths a tile row is stored at, the first that fits: the tile's rounded up to a power
        # of two where the next column tile rewrites the pixels past it (``overlap_width``),
        # the tile's, the map's last columns.
        overlap = overlap_width(cols, tiles_x, per_share) if vectorize else cols
        widths = [cols] if overlap == cols else [overlap, cols]
        if out_w % cols:
            widths.append(out_w % cols)
        with T.serial(0, n_img) as n, T.parallel(0, shares) as share:
            first_group = T.Bind(share // job_shares * share_groups)
            lo = T.Bind(tvm.tirx.min(share % job_shares * per_share, total))
            count = T.Bind(tvm.tirx.min(lo + per_share, total) - lo)
            # (Loops holding the allocations start at 0: see ``pattern_conv2d.emit``.)
            with T.serial(0, count) as j:
                job = lo + j
                tile = job // per_tile
                # Column tiles innermost: a group's kernels and input rows stay in L1 across
                # its tiles (groups innermost: 0.80-0.92x, the rows of every channel outgrow L1).
                x0 = job % tiles_x * cols
                i0 = (first_group + job % per_tile // tiles_x) * lanes
                y0 = tile * rows
                acc = accumulator_rows(rows, cols * lanes)
                for r in range(rows):
                    with T.unroll(0, cols) as x, T.vectorized(0, lanes) as f:
                        T.buffer_store(acc[r], tirx.const(0.0, "float32"), [x * lanes + f])

                row_paths(acc, n, i0, tile, x0, edge_rows)
                for r in range(rows):
                    y = y0 + r
                    with T.If(y < out_h), T.Then():
                        store_tile_row(acc[r], n, y, x0, i0, widths)
    return ib.get().without_attr("global_symbol")


def transposed(pixels: list, lanes: int) -> list[tuple[tirx.PrimExpr, int]]:
    """The accumulators of a tile row (one vector per pixel, a filter per lane) transposed:
    per filter, (a vector, its first lane) holding the filter's pixels in order.

    A network of two-source shuffles (X pixels padded to a power of two P: log2 P stages of P
    shuffles, 24 for 8 pixels, each one ``vpermt2ps``), each stage's vectors bound once;
    LLVM lowers one shuffle of all X vectors per filter to ~7 permutes per filter instead."""
    count = row_width(len(pixels))
    if count > lanes:
        raise ValueError(f"{len(pixels)} pixels do not fit a {lanes}-lane vector")
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    vecs = list(pixels) + [zero] * (count - len(pixels))

    def stage(group: list, block: int) -> list:
        """Vectors of the same filters, ``block`` pixels each (lane j * block + p: filter j,
        pixel p), merged pairwise until one vector holds all of the group's pixels."""
        if len(group) == 1:
            return group
        per = lanes // block // 2  # filters of each output vector
        low, high = [], []
        for a, b in zip(group[::2], group[1::2], strict=True):
            for half, out in ((0, low), (per, high)):
                index = [
                    (j + half) * block + p if p < block else lanes + (j + half) * block + p - block
                    for j in range(per)
                    for p in range(2 * block)
                ]
                out.append(T.Bind(tirx.Shuffle([a, b], index)))
        return stage(low, 2 * block) + stage(high, 2 * block)

    final = stage(vecs, 1)
    per = lanes // count  # filters per final vector
    return [(final[f // per], f % per * count) for f in range(lanes)]


@dataclass(frozen=True)
class _Edge:
    """What a tile's code path skips: output rows from ``live`` on (past the map), and the
    padding ``rows`` / ``cols`` of its input window."""

    live: int
    rows: frozenset = frozenset()
    cols: frozenset = frozenset()


class _row:
    """``kval[k, t, f]`` as ``w[f]`` (the scalar analysis body's view of a tap's weights)."""

    def __init__(self, buf, at: tuple) -> None:
        self.buf, self.at = buf, at

    def __getitem__(self, f):
        return self.buf[(*self.at, f)]
