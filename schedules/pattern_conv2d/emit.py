"""The pattern conv kernel's TIR, emitted with TVM's IRBuilder (``pattern_conv2d_primfunc``):
the parallel job loops of both loop orders, the accumulator tiles, the per-pattern FMAs and
the epilogue stores. Layout math lives in ``tiling``, input staging in ``staging``."""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..buffers import accumulator_rows, prefetch
from ..epilogue import Epilogue, optional_load
from ..geometry import ConvGeometry
from .config import PatternConvConfig
from .heuristics import default_config
from .staging import stage_rows, stage_rows_from_staged, stage_rows_segmented
from .tiling import (
    StagedLayout,
    Tiling,
    prefetch_lines,
    segmented_vector,
    staged_layout,
    tap_offset,
    tiling,
)

ZERO = tvm.tirx.const(0.0, "float32")


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
    filters, group = geom.out_channels, cfg.filters
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
    emit = _Emitter(geom, patterns, num_kernels, epilogue, cfg, tl, staged_input, staged_output)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        emit.declare_args(max_taps)
        if cfg.channel_block > 0 and group == 1:
            emit.channel_blocked()
        else:
            emit.registers_only(in_place)
    # No global symbol: the module that takes the kernel names it (several layers share one).
    return ib.get().without_attr("global_symbol")


class _Emitter:
    """Emits one layer's kernel body inside an open ``T.prim_func``: the layer's facts, its
    argument buffers (``declare_args``), and one method per part of the body. Accumulator
    tiles are lists (per filter) of lists (per row) of buffers (``new_tile``)."""

    def __init__(
        self,
        geom: ConvGeometry,
        patterns: tuple[tuple[int, ...], ...],
        num_kernels: int,
        epilogue: Epilogue,
        cfg: PatternConvConfig,
        tl: Tiling,
        staged_input: StagedLayout | None,
        staged_output: StagedLayout | None,
    ) -> None:
        self.geom, self.epilogue, self.cfg, self.tl = geom, epilogue, cfg, tl
        self.num_kernels, self.num_p = num_kernels, len(patterns)
        self.staged_input, self.staged_output = staged_input, staged_output
        self.rows, self.vec, self.fold, self.cols = cfg.rows, cfg.vector, tl.fold, tl.cols
        kw = geom.kernel[1]
        # Per pattern, where each tap reads: (plane, staged row offset, column offset).
        self.taps = [
            [tap_offset(geom, tl, cfg.shifted, *divmod(t, kw)) for t in pat] for pat in patterns
        ]
        self.lines, self.from_tile_column = prefetch_lines(geom, cfg, tl)

    def declare_args(self, max_taps: int) -> None:
        """The kernel's arguments (see ``pattern_conv2d_primfunc``), kept as attributes."""
        geom, num_kernels = self.geom, self.num_kernels
        n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
        data_shape = (n_img, chans, geom.height, geom.width)
        if self.staged_input is not None:
            data_shape = self.staged_input.shape(n_img, chans)
        self.data = T.arg("data", T.buffer(data_shape, "float32"))
        self.kptr = T.arg("kernel_ptr", T.buffer((filters, self.num_p + 1), "int32"))
        self.kchan = T.arg("kernel_channel", T.buffer((max(num_kernels, 1),), "int32"))
        kval_shape = (max(num_kernels, 1), max_taps)
        self.kval = T.arg("kernel_values", T.buffer(kval_shape, "float32"))
        self.order = T.arg("filter_order", T.buffer((filters,), "int32"))
        out_shape = (n_img, filters, geom.out_height, geom.out_width)
        self.bias, self.resid = self.epilogue.declare_args((filters,), out_shape)
        if self.staged_output is not None:
            out_shape = self.staged_output.shape(n_img, filters)
        self.out = T.arg("out", T.buffer(out_shape, "float32"))

    def stage(self, pad, slot, n, c, first, count) -> None:
        """Stage rows first .. first + count of channel c's planes into pad[slot, c]."""
        tl, span = self.tl, (first, count)
        if self.staged_input is not None:
            lay = self.staged_input
            stage_rows_from_staged(pad, (slot, c), self.data, n, span, lay, tl.segment)
        elif tl.segment:
            stage_rows_segmented(pad, (slot, c), self.data, self.geom, n, span, self.vec, tl)
        else:
            shifted = self.cfg.shifted
            stage_rows(pad, (slot, c), self.data, self.geom, n, span, tl.row_phases, shifted)

    def prefetch_rows(self, pad, n, c, y, x0) -> None:
        """Prefetch the cache lines of channel c's input rows y .. y + rows_in of a tile."""
        for plane in range(self.tl.planes):
            for r, x in self.lines:
                col = x0 + x if self.from_tile_column else x
                prefetch(pad[n, c, plane, y + r, col])

    def add_kernel(self, acc, pad, n, row0, x0, k, p: int, span=0) -> None:
        """acc[f][r] += kernel k's taps (pattern p) for the filters of ``acc``, reading pad[n]
        from staged row ``row0``; filter f's copy of the kernel is ``f * span`` kernels later
        (grouped filters)."""
        cfg, tl, vec, taps = self.cfg, self.tl, self.vec, self.taps[p]
        c = T.Bind(self.kchan[k])
        if cfg.prefetch:
            last = max(self.num_kernels, 1) - 1
            ahead = T.Bind(self.kchan[tvm.tirx.min(k + cfg.prefetch, last)])
            self.prefetch_rows(pad, n, ahead, row0, x0)
        w = [
            [T.Bind(self.kval[k + f * span, t]) for t in range(len(taps))] for f in range(len(acc))
        ]
        if tl.segment:
            _add_kernel_segmented(acc, pad, (n, c), row0, taps, w, tl, vec)
            return
        for r in range(self.rows):
            y0 = row0 + r * tl.row_step  # the first staged row of the tile's row r
            with T.unroll(0, self.cols // vec) as xo, T.vectorized(0, vec) as xi:
                x = xo * vec + xi
                col = x if self.fold > 1 else x0 + x  # (folded tiles are whole rows: x0 = 0)
                src = [pad[n, c, plane, y0 + dy, col + dx] for plane, dy, dx in taps]
                for f in range(len(acc)):
                    total = acc[f][r][x]
                    for t in range(len(src)):
                        total = total + w[f][t] * src[t]
                    T.buffer_store(acc[f][r], total, [x])

    def new_tile(self, count: int, first: Callable | None = None) -> list:
        """``count`` x rows accumulator rows, set to ``first(f, r, x)`` (default 0). Each row is
        < 1 KiB so TVM keeps it on the stack, where LLVM holds it in registers."""
        rows, cols, vec = self.rows, self.cols, self.vec
        acc = [accumulator_rows(rows, cols) for _ in range(count)]
        for f in range(count):
            for r in range(rows):
                with T.unroll(0, cols // vec) as xo, T.vectorized(0, vec) as xi:
                    x = xo * vec + xi
                    value = ZERO if first is None else first(f, r, x)
                    T.buffer_store(acc[f][r], value, [x])
        return acc

    def finish(self, value, n, i, y=None, x=None):
        """epilogue(value) for packed filter i (residual at ``y``, ``x``)."""
        resid = optional_load(self.resid, n, self.order[i], y, x)
        return self.epilogue.apply(value, optional_load(self.bias, i), resid)

    def store(self, n, i, y, x, value) -> None:
        """out[n, packed filter i's, y, x] = epilogue(value) (``x`` a column, or a Ramp and
        ``value`` a vector)."""
        lay, o = self.staged_output, self.order[i]
        if lay is not None:
            at = [n, o, 0, y + lay.top, lay.index(x + lay.left)]
            T.buffer_store(self.out, self.finish(value, n, i), at)
        else:
            T.buffer_store(self.out, self.finish(value, n, i, y, x), [n, o, y, x])

    def store_tile(self, acc, n, tile, x0, i0) -> None:
        """out[filter_order[i0 + f], tile rows, x0 + ...] = epilogue(acc[f]), in bounds."""
        tl, rows, vec, fold = self.tl, self.rows, self.vec, self.fold
        out_h, out_w = self.geom.out_height, self.geom.out_width
        if self.staged_output is not None:
            self.store_staged_tile(acc, n, tile, x0, i0)
            if tl.col_tiles == 1 and fold == 1:
                return

        # Tiles start at multiples of ``vec``, so a row's last vector holds out_w % vec
        # columns: stored as one shorter vector (no per-element conditions).
        tail = out_w % vec
        for f in range(len(acc)):
            i = i0 + f
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
                            self.store(n, i, y, x, tirx.Shuffle(vectors, index))
                    continue
                if fold > 1:  # output row j of the fold: lanes j * pad_q ..
                    for j in range(fold):
                        y = (tile * rows + r) * fold + j
                        with T.If(y < out_h), T.Then(), T.vectorized(0, out_w) as x:
                            self.store(n, i, y, x, acc[f][r][j * tl.row_w + x])
                    continue
                y = tile * rows + r
                with T.If(y < out_h), T.Then(), T.serial(0, self.cols // vec) as xo:
                    with T.If(x0 + xo * vec + vec <= out_w):
                        with T.Then(), T.vectorized(0, vec) as xi:
                            self.store(n, i, y, x0 + xo * vec + xi, acc[f][r][xo * vec + xi])
                        if tail:
                            with T.Else(), T.If(x0 + xo * vec < out_w), T.Then():
                                with T.vectorized(0, tail) as xi:
                                    value = acc[f][r][xo * vec + xi]
                                    self.store(n, i, y, x0 + xo * vec + xi, value)

    def store_staged_tile(self, acc, n, tile, x0, i0) -> None:
        """Write filter tile ``acc`` into ``out`` in the staged output layout. Whole-row tiles
        (``vec``-lane accumulators): each staged vector is one shuffle of a row's finished
        accumulators and zeros (the padding lanes). Other tiles (part rows, folds) leave the
        data to ``store_tile``'s stores and write the padding positions (scalars, by the job of
        the row's first column tile). The tiles with the first / last row also zero the padding
        rows above / below."""
        lay, tl, vec, out = self.staged_output, self.tl, self.vec, self.out
        out_h = self.geom.out_height
        rows, fold, lanes = len(acc[0]), tl.fold, lay.vector
        columns = [c - lay.left for c in lay.columns()]  # the data column of each position
        seg = tl.segment

        def source(x: int) -> int:  # where column x sits in the row's accumulators
            return x % seg * vec + x // seg if seg else x

        for f in range(len(acc)):
            o = self.order[i0 + f]
            for r in range(rows):
                for j in range(fold):
                    y = (tile * rows + r) * fold + j
                    with T.If(tvm.tirx.all(y < out_h, x0 == 0)), T.Then():
                        for first, last in ((0, lay.top), (out_h + lay.top, lay.rows)):
                            edge = y == 0 if first == 0 else y == out_h - 1
                            with T.If(edge), T.Then(), T.serial(first, last) as row:
                                with T.vectorized(0, lay.row_w) as q:
                                    T.buffer_store(out, ZERO, [n, o, 0, row, q])
                        if tl.col_tiles > 1 or fold > 1:  # store_tile stores the data
                            for at, x in enumerate(columns):
                                if not 0 <= x < lay.width:
                                    T.buffer_store(out, ZERO, [n, o, 0, y + lay.top, at])
                            continue
                        parts = [
                            self.finish(acc[f][r][tirx.Ramp(v * vec, 1, vec)], n, i0 + f)
                            for v in range(tl.cols // vec)
                        ]
                        parts.append(tirx.Broadcast(ZERO, vec))
                        for q in range(0, lay.row_w, lanes):
                            index = [
                                source(x) if 0 <= x < lay.width else tl.cols
                                for x in columns[q : q + lanes]
                            ]
                            at = [n, o, 0, y + lay.top, tirx.Ramp(q, 1, lanes)]
                            T.buffer_store(out, tirx.Shuffle(parts, index), at)

    def registers_only(self, in_place: bool) -> None:
        """The registers-only loop order (the module's structure): parallel shares of the
        (row tile, column tile, filters) jobs, each staging the rows it reads (none where the
        input is read ``in_place`` from its staged layout), a filter tile's whole reduction
        kept in registers."""
        geom, tl, cfg = self.geom, self.tl, self.cfg
        n_img, chans, group, cols = geom.batch, geom.in_channels, cfg.filters, self.cols
        tiles, tile_row = tl.tiles, tl.tile_row
        jobs = geom.out_channels // group
        per_tile = tl.col_tiles * jobs
        total = tiles * per_tile
        shares = max(1, min(cfg.shares, total))
        per_share = math.ceil(total / shares)
        # Staged rows a tile reads (the last tile reads to the end), and a share's most: its
        # jobs span at most per_share // per_tile + 1 (started) row tiles.
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
                        self.stage(pad, share, n, c, first, end - first)
                # (Loops holding the allocations start at 0: see ``channel_blocked``.)
                with T.serial(0, count) as j:
                    job = lo + j
                    tile = job // per_tile
                    x0 = job % per_tile // jobs * cols
                    i0 = job % jobs * group
                    source, slot = (self.data, n) if in_place else (pad, share)
                    self.filter_tile(source, slot, n, tile, tile * tile_row - first, x0, i0, group)

    def filter_tile(self, source, slot, n, tile, row0, x0, i0, group: int) -> None:
        """One output tile of ``group`` filters from i0: every kernel of theirs, read from
        ``source[slot]`` from staged row ``row0``, then the epilogue and the store."""
        kptr = self.kptr
        acc = self.new_tile(group)
        # Grouped filters' kernels are stored one filter after the other.
        span = T.Bind(kptr[i0 + 1, 0] - kptr[i0, 0]) if group > 1 else 0
        for p in range(self.num_p):
            with T.serial(kptr[i0, p], kptr[i0, p + 1]) as k:
                self.add_kernel(acc, source, slot, row0, x0, k, p, span)
        self.store_tile(acc, n, tile, x0, i0)

    def channel_blocked(self) -> None:
        """The channel-block-outer loop order (``cfg.channel_block`` > 0, one filter per tile):
        the input staged once, in parallel over channels (every share reads every row), then

        parallel for (row tile, column tile, share of the filters):
            for block b of ``channel_block`` input channels:
                for filter i of the share:
                    acc = 0 if b == 0 else partial[i, tile]
                    for pattern p: while run (i, p)'s next kernel has a channel in block b: add
                    partial[i, tile] = acc, or out = epilogue(acc) after the last block
        """
        geom, tl, cfg = self.geom, self.tl, self.cfg
        kptr, kchan, num_p = self.kptr, self.kchan, self.num_p
        n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
        rows, vec, cols, block = self.rows, self.vec, self.cols, cfg.channel_block
        tiles, col_tiles = tl.tiles, tl.col_tiles
        pad = T.alloc_buffer((n_img, chans, tl.planes, tl.plane_rows, tl.row_w), "float32")
        with T.parallel(0, n_img * chans) as nc:
            self.stage(pad, nc // chans, nc // chans, nc % chans, 0, tl.plane_rows)

        blocks = math.ceil(chans / block)
        shares = max(1, min(cfg.shares, filters))
        per_share = math.ceil(filters / shares)
        last_kernel = max(self.num_kernels, 1) - 1
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
                    acc = self.new_tile(
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
                            self.add_kernel(acc, pad, n, tile * tl.tile_row, x0, k, p)
                            T.buffer_store(cursor, k + 1, [slot])
                    with T.If(b < blocks - 1):
                        with T.Then():
                            for r in range(rows):
                                with T.unroll(0, cols // vec) as xo, T.vectorized(0, vec) as xi:
                                    x = xo * vec + xi
                                    at = [n, i, tile * rows + r, x0 + x]
                                    T.buffer_store(partial, acc[0][r][x], at)
                        with T.Else():
                            self.store_tile(acc, n, tile, x0, i)


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
