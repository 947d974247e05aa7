"""Pattern conv with filters in vector lanes: for layers whose filters share kernels in groups of
a vector's lanes (connectivity and patterns pruned per group of 16 filters on AVX-512; dense
convs, one full pattern: ``relay_passes.pattern_conv2d._lanes_format``).

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
rows past the map. Against staging the padded rows of those row tiles (sessions 12-18), where
a share copied 80-170 KB of rows for 0.05-0.1 ms of work: 1.28x on ResNet-18's stride-2 layer
on 14x14, 1.26x on its 7x7 map, 1.04-1.15x on 14- to 56-wide maps (back-to-back runs of both
builds on the AVX-512 VM; the staging alone, left out by a diagnostic build: 1.05-1.11x).

Every lane computes an output (no lanes past a row's end, no lane shifts, no transposed
staging: the ``pattern_conv2d`` kernel's costs on 7 * 2^k-wide maps); each broadcast feeds up
to taps FMAs. The output is transposed in registers (``transposed``: 24 shuffles per 8-pixel
row of 16 filters), each filter's row stored as a whole vector where the next column tile
rewrites what it writes past the tile (``_overlap_width``). Measured on the AVX-512 VM
in-core (every load an L1 hit, staging and stores excluded): 410-510 useful GFLOP/s on
ResNet-18's 3x3 layers, 85-100 % of the FMA peak, against ~340 for 4 filters together.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows
from .pattern_conv2d import (
    STACK_BYTES,
    ConvGeometry,
    Epilogue,
    _geom,
    _params,
    activation,
)
from .tunable import Knobs, TunableKernel, register, template


@dataclass(frozen=True)
class LanesConfig:
    """Schedule knobs: output rows and columns per tile (``rows x cols`` accumulator vectors)
    and the parallel shares (one per core)."""

    rows: int = 2
    cols: int = 8
    shares: int = 2
    prefetch: int = 0


STORE_BOUND_KERNELS = 2.0  # kernels per filter under this: tiles of one cache-line-wide row
LINE_FLOATS = 16  # fp32 values in a 64-byte cache line
TILE_FMAS = 400  # a kernel's FMAs in one code path (taps x accumulators), at most


def most_accumulators(geom: ConvGeometry) -> int:
    """The accumulators a tile may hold within ``TILE_FMAS`` unrolled FMAs per kernel (at the
    kernel's every tap). Dense 7x7 stem (3 x 224 x 224, stride 2, on the AVX-512 VM, 2
    threads): 1 x 8 tiles 0.72 ms, 2 x 4 0.75, 2 x 8 0.83, 3 x 8 1.22, 1 x 16 1.46, the
    per-pixel kernel 0.97: a 49-tap tile unrolls past the instruction cache from ~16
    accumulators. 3x3 layers stay within the registers' 24."""
    (kh, kw) = geom.kernel
    return max(1, TILE_FMAS // (kh * kw))


def lanes_default_config(
    geom: ConvGeometry,
    registers: int = 32,
    shares: int = 2,
    kernels_per_filter: float | None = None,
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
    1 KiB accumulator row leaves the registers)."""
    out_h, out_w = geom.out_height, geom.out_width
    unrolled = most_accumulators(geom)
    store_bound = kernels_per_filter is not None and kernels_per_filter < STORE_BOUND_KERNELS
    if store_bound and out_w % LINE_FLOATS == 0 and unrolled >= LINE_FLOATS:
        return LanesConfig(rows=1, cols=LINE_FLOATS, shares=max(1, shares))
    cols = next((c for c in (8, 7) if out_w % c == 0), min(8, out_w))
    rows = max(1, min(out_h, min(registers - 8, unrolled) // cols))
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
    inside_rows = _inside(tile_row, reach, pt, height, tiles_y)
    inside_cols = _inside(cols * sw, span, pl, width, tiles_x)
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
        bias = T.arg("bias", T.buffer((filters,), "float32")) if epilogue.bias else None
        out_shape = (n_img, filters, out_h, out_w)
        resid = T.arg("residual", T.buffer(out_shape, "float32")) if epilogue.residual else None
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
                if bias is not None:
                    value = value + bias[i0 + f]
                if resid is not None:
                    value = value + resid[n, order[i0 + f], y, xs]
                T.buffer_store(out, activation(value, epilogue), [n, order[i0 + f], y, xs])

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
        # of two where the next column tile rewrites the pixels past it (``_overlap_width``),
        # the tile's, the map's last columns.
        overlap = _overlap_width(cols, tiles_x, per_share) if vectorize else cols
        widths = [cols] if overlap == cols else [overlap, cols]
        if out_w % cols:
            widths.append(out_w % cols)
        with T.serial(0, n_img) as n, T.parallel(0, shares) as share:
            first_group = T.Bind(share // job_shares * share_groups)
            lo = T.Bind(tvm.tirx.min(share % job_shares * per_share, total))
            count = T.Bind(tvm.tirx.min(lo + per_share, total) - lo)
            # (Loops holding the allocations start at 0: see ``_channel_blocked``.)
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


def tile_readers(geom: ConvGeometry, patterns, rows: int, cols: int) -> list[list]:
    """Per pattern, each input pixel (row, column offset in the input window) a ``rows x
    cols`` tile reads, and the (row, column, tap) accumulations that read it."""
    (_, kw), (sh, sw) = geom.kernel, geom.stride
    readers = []
    for pattern in patterns:
        pixels: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for t, tap in enumerate(pattern):
            dy, dx = divmod(tap, kw)
            for r in range(rows):
                for x in range(cols):
                    pixels.setdefault((r * sh + dy, x * sw + dx), []).append((r, x, t))
        readers.append(sorted(pixels.items()))
    return readers


def transposed(pixels: list, lanes: int) -> list[tuple[tirx.PrimExpr, int]]:
    """The accumulators of a tile row (one vector per pixel, a filter per lane) transposed:
    per filter, (a vector, its first lane) holding the filter's pixels in order.

    A network of two-source shuffles (X pixels padded to a power of two P: log2 P stages of P
    shuffles, 24 for 8 pixels, each one ``vpermt2ps``), each stage's vectors bound once;
    LLVM lowers one shuffle of all X vectors per filter to ~7 permutes per filter instead."""
    count = _row_width(len(pixels))
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


def lines_read(
    reach: int, span: int, pitch: int, skipped=frozenset(), skipped_rows=frozenset()
) -> list[tuple[int, int]]:
    """(row, column) offsets touching each cache line of a tile's input window (``reach``
    rows ``pitch`` elements apart, of ``span`` columns; columns ``skipped`` and rows
    ``skipped_rows`` not read): the
    first and last element of each run of elements read with gaps under a line (16), and
    every 16th between. Rows narrower than a line share lines: 6 prefetches, not 10 (two a
    row), for the 5 rows of 14 a stride-2 tile reads on a 14-wide map (1.03x there, 1.01x
    on 7x7 maps, others the same: A/B on the AVX-512 VM). A point between rows comes back as
    the (row, column) of the same address (``divmod`` by ``pitch``)."""
    read = [dx for dx in range(span) if dx not in skipped]
    offsets = [dy * pitch + dx for dy in range(reach) if dy not in skipped_rows for dx in read]
    points: list[int] = []
    start = 0
    for i, at in enumerate(offsets):
        if i + 1 == len(offsets) or offsets[i + 1] - at >= 16:  # a run ends at ``at``
            points += [*range(offsets[start], at, 16), at]
            start = i + 1
    return [divmod(at, pitch) for at in points]


def _row_width(pixels: int) -> int:
    """The lanes a filter's row of ``pixels`` takes in the ``transposed`` vectors: the next
    power of two."""
    return 1 << max(0, (pixels - 1).bit_length())


def _overlap_width(cols: int, tiles_x: int, per_share: int) -> int:
    """The width to store a tile's rows at: ``cols`` rounded up to a power of two (the width of
    a filter's row in the ``transposed`` vectors) where each share's jobs hold whole runs of
    column tiles (``per_share`` a multiple of ``tiles_x``: the tile after this one is the
    same core's next job and rewrites the extra pixels), else ``cols``. The last column tile
    of a row keeps ``cols`` (its extra pixels would land in the next output row).

    A filter's row of 7 pixels is one 8-wide store (after an extract for the upper half of a
    vector) instead of LLVM's 4 + 2 + 1 stores and the extracts and shuffles between them:
    ``[no kernels]`` 0.0124 -> 0.0106 ms, the whole kernel 1.03-1.05x on ResNet-18's stride-2
    layer on 56x56 (28x28 output: 3 of its 4 column tiles), 1.01-1.04x on its 28- and 14-wide
    layers (A/B on the AVX-512 VM, two runs)."""
    padded = _row_width(cols)
    return padded if tiles_x > 1 and per_share % tiles_x == 0 else cols


@dataclass(frozen=True)
class _Edge:
    """What a tile's code path skips: output rows from ``live`` on (past the map), and the
    padding ``rows`` / ``cols`` of its input window."""

    live: int
    rows: frozenset = frozenset()
    cols: frozenset = frozenset()


def _inside(step: int, reach: int, before: int, size: int, count: int) -> range:
    """Of ``count`` tiles ``step`` input positions apart, tile t reading ``reach`` from
    ``t * step - before``: those whose reads stay within the input's ``size`` (no padding)."""
    lo = min(count, -(-before // step))
    hi = min(count, (size + before - reach) // step + 1)
    return range(lo, max(lo, hi))


class _row:
    """``kval[k, t, f]`` as ``w[f]`` (the scalar analysis body's view of a tap's weights)."""

    def __init__(self, buf, at: tuple) -> None:
        self.buf, self.at = buf, at

    def __getitem__(self, f):
        return self.buf[(*self.at, f)]


# --- MetaSchedule search space (see schedules/tunable.py) -----------------------------------


def _build(params: dict, knobs: Knobs, vectorize: bool = True) -> tirx.PrimFunc:
    return pattern_conv2d_lanes_primfunc(
        _geom(params),
        tuple(tuple(p) for p in params["patterns"]),
        params["num_kernels"],
        params["max_taps"],
        params["lanes"],
        Epilogue(**params["epilogue"]),
        LanesConfig(**knobs),
        params["name"],
        vectorize,
    )


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Tiles of 1-8 rows x 4-16 columns (1 KiB of stack per accumulator row; tiles past ~28
    accumulators spill: slow, still right), fewer where ``most_accumulators`` caps them (a
    7x7 kernel: 1-2 rows x 4-8 columns), prefetch 0 / 2 / 4 / 8 kernels ahead; ``shares``
    stays at its default (one per core)."""
    geom = _geom(params)
    most = most_accumulators(geom)
    cols = min(STACK_BYTES // (4 * params["lanes"]), most, geom.out_width)
    return {
        "rows": list(range(1, max(1, min(geom.out_height, 8, most // 4)) + 1)),
        "cols": list(range(4, max(4, cols) + 1)),
        "shares": [default["shares"]],
        "prefetch": sorted({0, 2, 4, 8, default.get("prefetch", 0)}),
    }


PATTERN_CONV2D_LANES = register(TunableKernel("pattern_conv2d_lanes", _build, _space))


def pattern_conv2d_lanes_template(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    lanes: int,
    epilogue: Epilogue,
    config: LanesConfig,
    name: str,
) -> tirx.PrimFunc:
    """The kernel at ``config`` as a MetaSchedule template (``config`` is its default point)."""
    # (The pattern kernel's parameters; its filter group here: the lanes.)
    params = _params(geom, patterns, num_kernels, max_taps, epilogue, name, lanes, lanes)
    knobs = asdict(config)
    analysed = _build(params, knobs, vectorize=False)  # (never built: realize regenerates it)
    return template(analysed, PATTERN_CONV2D_LANES.name, params, knobs)
