"""Dense GEMM with a constant operand packed at compile time: 1x1 convs (NCHW), Winograd's 16
products of a 3x3 conv (``winograd_conv2d``: a 1x1 conv GEMM with a weight per image) and
linear layers over tokens. TIR kernel generator.

Both are ``C = A @ B`` computed by one register tile of ``rows`` x ``vectors`` vectors: per ``k``
the tile loads ``vectors`` vectors of B's row ``k`` and broadcasts ``rows`` values of A's column
``k`` (one FMA each, AVX-512's embedded broadcast), the accumulators staying in registers for
the whole of K (on 16-register targets, of a 1x1 conv's pass over K: ``gemm_k_block``).

- **1x1 conv** ``out[n, o, p] = sum_c W[o, c] x[n, c, p]`` (p a pixel of the flattened map):
  A is the weight, packed as ``(ceil(O / rows), C, rows)`` so a tile's broadcasts are
  contiguous; B is the input, a tile's columns being ``vectors`` x lanes pixels, read in place
  or through a panel a job's first row tile fills (``b_source``).
  The map's last columns (H*W not a multiple of the tile) join the last tile as one more
  vector, partial where H*W is not a multiple of the lanes, with half the rows; a last single
  column (7x7 maps: 49 = 3 x 16 + 1) instead joins it rows-in-lanes, one vector of the tile's
  weights times the pixel (``emit_tile``'s ``cross``; AVX-512, and AVX2 at 4 x 2 tiles). A
  strided conv's panels are gathered from its input map (``b_source``), with no slice
  first: alone on AMD Zen 5, ResNet's stride-2 1x1 convs on 56x56 / 28x28 inputs 1.20-1.71x
  (AVX2 build 1.09-1.34x) against the input sliced by its own kernel, on 14x14 0.98-1.01x.
  On 16-register targets K over ``K_BLOCK`` runs in passes, each pass's rows of B copied into
  a panel that stays in L1 while the row tiles run (``gemm_k_block``).
- **k x k conv** (``kernel`` / ``padding``: an implicit GEMM) ``out[n, o, p] = sum_(c, t)
  W[o, c, t] x[n, c, window(p, t)]``: A the weight as (O, C * kh * kw), B's row ``(c, t)`` tap
  ``t`` of every output pixel's window, gathered per job and pass over K (whole channels,
  ``WINDOW_K_BLOCK`` rows) into a panel (``gemm_panels.Window``); the AVX2 build's kernel for
  strided dense 3x3 convs of many filters (``relay_passes.conv_plan``).
- **linear** ``out[m, n] = sum_k x[m, k] W[k, n]`` (``dense_linear``): A is the input (tokens
  broadcast), B the weight packed by ``pack_columns``.

Parallel jobs are (image, column tile, chunk of row tiles): a job streams its column panel of
B once per row tile from L1 / L2 while A's tiles are read once. The 1x1 conv numbers its jobs
chunk-major (a chunk's column tiles adjacent): the runtime hands each thread one contiguous range
of jobs, so where a map has few column tiles (14x14: 3 full and a heavier last one, split in two
chunks) each thread gets half of the weight's rows and its share of the last tile, rather than
whole column tiles. AMD Zen 5, 2 threads, alone: 1x1 convs on 14x14 maps 1.05-1.09x (e.g.
256x1024 from 410 to 445 GFLOP/s); AVX2 build 1.00-1.03x; unchanged where a job is a whole
column (56x56, 28x28). The runtime's ranges are equal only where the jobs are a multiple of
the threads; where a thread would get over 5 % more than an even share, the rows split in more
chunks (``row_chunks``): the AVX2 build's 7x7 maps (3 column tiles, 9 jobs -> 12) 1.05-1.10x
on four of five MobileNetV2 / ResNet-50 shapes (960x160 0.93x), to 80-85 % of the AVX2 peak on
ResNet-50's.

In a whole model a 1x1 conv's weight comes from DRAM (ResNet-50 holds 100 MB of weights, L3 is
32 MB), where the tile consumes it at ~2 bytes a cycle per core: the conv GEMM prefetches the
packed weight ``PREFETCH_BYTES`` ahead of the tile. Chains of distinct 1x1 convs, AMD Zen 5,
2 threads, vs ONNX Runtime: 2048x512 / 512x2048 on 7x7 0.67x -> 0.98-1.03x, 1024x256 / 256x1024
on 14x14 0.74x -> 0.94-0.97x, 512x128 on 28x28 1.01x -> 1.06x (64 to 256 k ahead alike).
The maps it writes and adds are in L3 or DRAM too, and every tile's stores missed: each
finished vector prefetches the same vector of the next row tile's output (owned, for the
store) and residual. AMD EPYC Zen 3 (AVX2), 2 threads, whole models profiled in one process,
5 rounds: ResNet-50 68.5 -> 65.5 ms (ONNX Runtime 70.0), its 64->256 convs on 56x56 (4 calls)
5.56 -> 4.19 ms (ORT 4.79), 128->512 on 28x28 4.36 -> 3.37 (ORT 4.11); pattern-pruned
ResNet-50 53.5 -> 48.9 ms (ORT 61.1). Prefetching the next job's input columns as well, or
the weight 1 or 16 KiB ahead instead of 4, did not help.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows, allocated_view, prefetch
from .epilogue import Epilogue
from .gemm_panels import CACHE_LINE, VectorAt, Window, b_source, gathers, vector_offsets
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template
from .vector_math import span, splat

ZERO = tirx.const(0.0, "float32")
PREFETCH_BYTES = 4096  # how far ahead of the tile the conv GEMM prefetches its packed weight
CROSS_COLUMNS = 1  # map columns past whole tiles computed rows-in-lanes (see emit_tile)
K_BLOCK = 256  # most K rows a 16-register conv GEMM's tiles take per pass (``gemm_k_block``)
WINDOW_K_BLOCK = 576  # the same for a k x k conv's gathered windows (64 channels of 3x3 taps)


@dataclass(frozen=True)
class GemmConfig:
    """The register tile: ``rows`` broadcast values x ``vectors`` vectors of ``lanes``."""

    rows: int = 8
    vectors: int = 3
    lanes: int = 16
    cross: int = 0  # most map columns past whole tiles computed rows-in-lanes (``column_tiles``)
    k_block: int = 0  # K rows a conv GEMM's row tiles take per pass, from a panel (0: all of K)
    unroll: int = 1  # k per iteration of a conv GEMM tile's loop (``gemm_unroll``)

    @property
    def width(self) -> int:
        return self.vectors * self.lanes


def default_gemm_config(lanes: int, registers: int, columns: int | None = None) -> GemmConfig:
    """The tile for a target: accumulators fill three quarters of the vector registers (the
    rest hold B's vectors and the broadcast): AVX-512 / NEON 8 x 3 (24 of 32), AVX2 4 x 3.

    The map's last column goes rows-in-lanes (``cross``) where the tile's rows fit one vector
    and the registers hold its accumulator, weight vector and broadcast too: AVX-512 at 8 x 3;
    AVX2 at 4 x 2, taken where the map's ``columns`` are whole 2-vector tiles and one column
    (7x7 maps: 49 = 3 x 16 + 1); not NEON (8 rows are two of its vectors). AMD Zen 5, 2 threads,
    1x1 convs on 7x7 maps alone: AVX-512 1.05-1.21x; AVX2 4 x 2 with the column 1.09-1.22x over
    4 x 3 (72-75 % of the AVX2 peak, from 61-66 %), 4 x 3 with it 0.67-0.78x (it spills)."""
    if registers >= 32:
        rows = 8
        return GemmConfig(rows, vectors=3, lanes=lanes, cross=CROSS_COLUMNS * (rows <= lanes))
    if columns is not None and columns % (3 * lanes) and columns % (2 * lanes) == CROSS_COLUMNS:
        return GemmConfig(rows=4, vectors=2, lanes=lanes, cross=CROSS_COLUMNS)
    return GemmConfig(rows=4, vectors=3, lanes=lanes)


def conv1x1_gemm_config(
    lanes: int, registers: int, pixels: int, depth: int, taps: int = 1
) -> GemmConfig:
    """A 1x1 conv GEMM's configuration on a target: its tile (``default_gemm_config``), K in
    passes (``gemm_k_block``; a k x k conv's of ``taps`` rows a channel: ``WINDOW_K_BLOCK``)
    and k per loop iteration (``gemm_unroll``)."""
    limit = K_BLOCK if taps == 1 else WINDOW_K_BLOCK
    k_block = gemm_k_block(depth, registers, limit, taps)
    cfg = default_gemm_config(lanes, registers, pixels)
    return replace(cfg, k_block=k_block, unroll=gemm_unroll(k_block or depth, registers))


def gemm_k_block(depth: int, registers: int, limit: int = K_BLOCK, taps: int = 1) -> int:
    """K rows per pass of a 1x1 conv GEMM's row tiles (``GemmConfig.k_block``; 0: all of K):
    on 16-register targets, K over ``limit`` in the fewest equal passes of at most ``limit``
    rows (512: 2 x 256, 960: 4 x 240, 2048: 8 x 256), else 0. Each pass's B rows are copied
    into a contiguous panel (``b_source``) of ``limit`` x 3 vectors: 24 KB at 8 lanes, inside a
    32 KB L1, where one pass over K = 512 on 24 columns reads a 48 KB panel from L2 per tile.

    AMD EPYC Zen 3 (AVX2 only, 32 KB L1, 512 KB L2), 2 threads, alone, 9 interleaved rounds:
    against all of K read in place, 512x128 / 512x256 on 28x28 1.14x / 1.11x, 1024x256 /
    1024x512 on 14x14 1.07x / 1.13x (passes of 128 rows: 1.03-1.09x); K = 256 on 56x56
    disagreed (256x128 0.94-0.98x, 256x64 1.11-1.40x), so K up to ``limit`` keeps one pass.
    A pass takes whole channels of ``taps`` rows (a k x k conv's windows, ``gemm_panels``)."""
    if registers > 16 or depth <= limit:
        return 0
    first = math.ceil(depth / limit)
    passes = next(c for c in range(first, depth + 1) if depth % c == 0 and depth // c % taps == 0)
    return depth // passes


def gemm_unroll(depth: int, registers: int) -> int:
    """k per iteration of a 1x1 conv GEMM tile's loop (``GemmConfig.unroll``), its weight
    prefetched once per cache line (``emit_tile``'s ``ahead_every``): on 16-register targets the
    most of 4, 2, 1 that divides the ``depth`` of a pass, else 1. An AVX2 4 x 2 tile's k is 9 FMAs
    (4.5 cycles on two FMA pipes) in 25 instructions, a third of them the loop's and the
    prefetch's: near a 6-wide front end's limit. Unrolled by 4 it is 18 per k.

    AMD EPYC Zen 3 (AVX2 only), 2 threads, alone, 9 interleaved rounds, against one k per
    iteration and a prefetch per k: ResNet-50 / MobileNetV2 1x1 convs on 7x7 to 56x56 maps
    1.09-1.42x (512x2048 on 7x7 from 87 to 120 GFLOP/s, 64x256 on 56x56 from 94 to 123)."""
    if registers > 16:
        return 1
    return next(u for u in (4, 2, 1) if depth % u == 0)


@dataclass(frozen=True)
class ColumnTile:
    """Columns ``[start, start + sum(widths))`` computed ``rows`` rows at a time; each width is
    one vector (a partial one where it is less than the lanes). Then ``cross`` more columns,
    each one vector of the ``rows`` rows (``emit_tile``)."""

    start: int
    widths: tuple[int, ...]
    rows: int
    cross: int = 0


def column_tiles(columns: int, cfg: GemmConfig, cross: int = 0) -> tuple[int, ColumnTile | None]:
    """``columns`` as ``full`` tiles of ``cfg.width`` then one last tile (None if they fit
    exactly). A remainder of at most ``cross`` columns joins the last full tile as that many
    rows-in-lanes vectors (one FMA per column and k, at the full rows); a larger one joins it as
    one more vector, at half the rows so the accumulators still fit the registers."""
    full, rest = divmod(columns, cfg.width)
    if rest == 0:
        return full, None
    if full and rest <= cross:
        return full - 1, ColumnTile(
            (full - 1) * cfg.width, (cfg.lanes,) * cfg.vectors, cfg.rows, rest
        )
    if full == 0:
        widths = tuple(split_vectors(rest, cfg.lanes))
        rows = cfg.rows if len(widths) <= cfg.vectors else cfg.rows // 2
        return 0, ColumnTile(0, widths, rows)
    widths = (cfg.lanes,) * cfg.vectors + tuple(split_vectors(rest, cfg.lanes))
    return full - 1, ColumnTile((full - 1) * cfg.width, widths, max(1, cfg.rows // 2))


def split_vectors(count: int, lanes: int) -> list[int]:
    """``count`` columns as vectors of ``lanes`` and one partial vector."""
    return [lanes] * (count // lanes) + ([count % lanes] if count % lanes else [])


def pack_rows(weight: np.ndarray, rows: int) -> np.ndarray:
    """(M, K) -> (ceil(M / rows), K, rows), zero-padded: a tile's broadcasts, contiguous."""
    m, k = weight.shape
    padded = np.pad(weight, ((0, -m % rows), (0, 0)))
    return np.ascontiguousarray(padded.reshape(-1, rows, k).transpose(0, 2, 1))


def pack_columns(weight: np.ndarray, width: int) -> np.ndarray:
    """(K, N) -> (ceil(N / width), K, width), zero-padded: a tile's vectors, contiguous."""
    k, n = weight.shape
    padded = np.pad(weight, ((0, 0), (0, -n % width)))
    return np.ascontiguousarray(padded.reshape(k, -1, width).transpose(1, 0, 2))


ScalarAt = Callable[[int, "tirx.PrimExpr"], "tirx.PrimExpr"]  # (row in tile, k) -> A value
Finish = Callable[[int, int, int, "tirx.PrimExpr"], None]  # (row, offset, width, sum) -> store


def emit_tile(
    depth: int,
    rows: int,
    widths: tuple[int, ...],
    a_at: ScalarAt,
    b_at: VectorAt,
    finish: Finish,
    ahead: Callable[[tirx.PrimExpr], None] | None = None,
    cross: int = 0,
    a_rows_at: Callable[[tirx.PrimExpr], tirx.PrimExpr] | None = None,
    inner: int = 1,
    init: Callable[[int, int, int], tirx.PrimExpr] | None = None,
    ahead_every: int = 1,
) -> None:
    """One register tile: ``rows`` x ``widths`` accumulators over ``depth`` k, then ``finish``
    on each vector. Rows and offsets are Python constants: LLVM keeps the tile in registers. The
    k loop runs ``depth / inner`` times, each iteration ``inner`` k unrolled (k = iteration *
    inner + a constant); ``ahead(k)`` (prefetches) runs at every ``ahead_every``-th of them.

    ``cross`` more columns follow the widths, each accumulated as one vector of the ``rows``
    rows: ``a_rows_at(k)`` (A's ``rows`` values at ``k``, contiguous when packed) times B's
    scalar ``b_at(k, column, 1)``; ``finish`` takes them a row at a time (width 1). A map of
    49 pixels on 8 x 3 tiles of 16 lanes: 25 FMAs per k for 49 columns, against 16 for 4 rows
    of 4 vectors (the last one lane) on the half-rows tile.

    ``init(row, offset, width)``: the accumulators' starting values (a pass over part of K
    resuming partial sums), the ``cross`` columns' at ``init(-1, column, rows)`` (a vector
    of the rows); default zero."""
    offsets = vector_offsets(widths)
    acc = accumulator_rows(rows, sum(widths))
    across = accumulator_rows(cross, rows)
    for r in range(rows):
        for off, w in zip(offsets, widths, strict=True):
            start = splat(ZERO, w) if init is None else init(r, off, w)
            T.buffer_store(acc[r], start, [span(off, w)])
    for j, column in enumerate(across):
        start = splat(ZERO, rows) if init is None else init(-1, sum(widths) + j, rows)
        T.buffer_store(column, start, [span(0, rows)])
    if depth % inner:
        raise ValueError(f"depth {depth} is not a multiple of inner={inner}")
    with T.serial(0, depth // inner) as outer:
        for u in range(inner):
            kk = outer * inner + u if inner > 1 else outer
            if ahead is not None and u % ahead_every == 0:
                ahead(kk)
            b = [b_at(kk, off, w) for off, w in zip(offsets, widths, strict=True)]
            for r in range(rows):
                a = a_at(r, kk)
                for off, w, bv in zip(offsets, widths, b, strict=True):
                    at = span(off, w)
                    T.buffer_store(acc[r], acc[r][at] + splat(a, w) * bv, [at])
            if across:
                a_rows = a_rows_at(kk)
                for j, column in enumerate(across):
                    b_j = splat(b_at(kk, sum(widths) + j, 1), rows)
                    at = span(0, rows)
                    T.buffer_store(column, column[at] + a_rows * b_j, [at])
    for r in range(rows):
        for off, w in zip(offsets, widths, strict=True):
            finish(r, off, w, acc[r][span(off, w)])
        for j, column in enumerate(across):
            finish(r, sum(widths) + j, 1, column[r])


def tile_block(
    rows: int,
    columns: int,
    depth: int,
    cfg: GemmConfig,
    a_at: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
    b_at: VectorAt,
    finish: Finish,
) -> None:
    """A ``rows`` x ``columns`` block of ``A @ B`` as register tiles (``rows`` a multiple of
    ``cfg.rows``): loops over the column tiles (``column_tiles``) and the row tiles of each.
    ``a_at(row, k)``, ``b_at(k, column, width)`` and ``finish(row, column, width, sum)`` take
    positions in the block."""
    full, last = column_tiles(columns, cfg)

    def tiles(start: tirx.PrimExpr, widths: tuple[int, ...], tile_rows: int) -> None:
        with T.serial(0, rows // tile_rows) as t:
            r0 = t * tile_rows
            emit_tile(
                depth, tile_rows, widths,
                lambda r, kk: a_at(r0 + r, kk),
                lambda kk, off, w: b_at(kk, start + off, w),
                lambda r, off, w, value: finish(r0 + r, start + off, w, value),
            )  # fmt: skip

    if full:
        with T.serial(0, full) as c:
            tiles(c * cfg.width, (cfg.lanes,) * cfg.vectors, cfg.rows)
    if last is not None:
        tiles(last.start, last.widths, last.rows)


def store_channel_row(
    out: tirx.Buffer,
    at: tuple,
    value: tirx.PrimExpr,
    epilogue: Epilogue,
    operands: tuple[tirx.Buffer | None, tirx.Buffer | None],
    channels: int,
) -> None:
    """``out[at] = epilogue(value)`` for a vector of one output channel's row (``at[1]``: the
    channel; ``operands``: the bias, broadcast, and the residual, read at ``at``), skipped for
    a packed tile's padding channels (from ``channels`` on)."""
    bias, resid = operands
    width = value.ty.dtype.lanes
    value = epilogue.apply(
        value,
        None if bias is None else splat(bias[at[1]], width),
        None if resid is None else resid[at],
    )
    with T.If(at[1] < channels), T.Then():
        T.buffer_store(out, value, list(at))


def job_tiles(job: int | tirx.PrimExpr, batch: int, col_jobs: int, chunk: int) -> tuple:
    """A conv GEMM job's (image, column tile, first row tile), numbered chunk-major: the jobs of
    one chunk of row tiles are adjacent, every image's column tiles among them (see the module
    docstring). ``job``: an int or the parallel loop's variable."""
    per_image = col_jobs // batch
    return job % col_jobs // per_image, job % col_jobs % per_image, job // col_jobs * chunk


def row_chunks(row_tiles: int, other_jobs: int, cores: int) -> int:
    """Row tiles per job: whole columns of tiles where there are enough column jobs to feed
    ``cores`` (4 jobs each), else split so there are; then the fewest more chunks that leave
    no thread more than 5 % above an even share (the runtime gives each thread one contiguous,
    equal range of jobs)."""
    wanted = min(row_tiles, max(1, math.ceil(4 * cores / max(1, other_jobs))))
    for count in range(wanted, row_tiles + 1):
        chunk = math.ceil(row_tiles / count)
        jobs = math.ceil(row_tiles / chunk) * other_jobs
        if math.ceil(jobs / cores) * cores <= 1.05 * jobs:
            return chunk
    return math.ceil(row_tiles / wanted)


def conv1x1_gemm_primfunc(
    batch: int,
    in_channels: int,
    out_channels: int,
    pixels: int,
    epilogue: Epilogue = Epilogue(),
    cfg: GemmConfig | None = None,
    cores: int = 1,
    name: str = "dense_conv1x1",
    out_dims: tuple[int, int] | None = None,
    tile_rows: int | None = None,
    stride: int = 1,
    in_dims: tuple[int, int] | None = None,
    weights: int = 1,
    kernel: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> tirx.PrimFunc:
    """Arguments: x (batch, C, P), weight ``pack_rows(W, cfg.rows)``, [bias (O,)],
    [residual (batch, O, P)], out (batch, O, P); ``out_dims`` (H, W) declares x / residual /
    out as 4-D maps of ``pixels = H * W`` (read through flat views). The register tile is
    ``tile_rows`` (a divisor of the packed ``cfg.rows``; default all of them) x ``cfg.vectors``.
    ``stride`` > 1: x is the conv's input map of ``in_dims``, each panel gathered from every
    ``stride``-th row and column of it (``b_source``). ``kernel`` / ``padding`` (top, left)
    other than a 1x1 conv's: a k x k conv as an implicit GEMM, the weight (O, C * kh * kw), each
    panel its windows gathered from the input map of ``in_dims`` (``gemm_panels.Window``; a
    pass over K takes whole channels). ``weights`` > 1: that many packed weights one after
    another (``weights * ceil(O / cfg.rows)`` row tiles), image n taking number
    ``n % weights`` (Winograd's positions, ``winograd_conv2d``)."""
    cfg = cfg or GemmConfig()
    tile_rows = tile_rows or cfg.rows
    if cfg.rows % tile_rows:
        raise ValueError(f"tile_rows={tile_rows} does not divide the packed rows {cfg.rows}")
    full, last = column_tiles(pixels, GemmConfig(tile_rows, cfg.vectors, cfg.lanes), cfg.cross)
    if last is not None and cfg.rows % last.rows:
        raise ValueError(
            f"the map's last column tile takes {last.rows} rows at a time, which do not divide "
            f"the packed rows {cfg.rows} (tile_rows={tile_rows}: use an even one)"
        )
    row_tiles = math.ceil(out_channels / cfg.rows)
    col_jobs = batch * (full + (last is not None))
    chunk = row_chunks(row_tiles, col_jobs, cores)
    chunks = math.ceil(row_tiles / chunk)
    dims = out_dims or (pixels,)
    gathered = gathers(stride, kernel, padding)
    if gathered and (out_dims is None or in_dims is None):
        raise ValueError("a strided or k x k conv GEMM needs its out_dims and in_dims")
    in_dims = in_dims or dims
    window = Window(stride, dims[-1], in_dims, kernel, padding) if gathered else None
    depth = in_channels * kernel[0] * kernel[1]  # K
    k_block = cfg.k_block or depth
    if depth % k_block:
        raise ValueError(f"k_block={cfg.k_block} does not divide the {depth} input channels")
    if k_block % (kernel[0] * kernel[1]):
        raise ValueError(f"k_block={k_block} is not whole channels of the {kernel} kernel")
    if k_block % cfg.unroll:
        raise ValueError(f"unroll={cfg.unroll} does not divide the {k_block} k of a pass")
    line_every = max(1, min(cfg.unroll, CACHE_LINE // (4 * cfg.rows)))  # k per weight line
    passes = depth // k_block
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        x_arg = T.arg("x", T.buffer((batch, in_channels, *in_dims), "float32"))
        w = T.arg("weight", T.buffer((weights * row_tiles, depth, cfg.rows), "float32"))
        bias, resid_arg = epilogue.declare_args((out_channels,), (batch, out_channels, *dims))
        out_arg = T.arg("out", T.buffer((batch, out_channels, *dims), "float32"))
        x_flat = (batch, in_channels, math.prod(in_dims))
        x = T.decl_buffer(x_flat, "float32", data=x_arg.data)
        maps, flat_maps = (batch, out_channels, pixels), (batch * out_channels * pixels,)
        out = T.decl_buffer(maps, "float32", data=out_arg.data)
        out_flat = T.decl_buffer(flat_maps, "float32", data=out_arg.data)
        resid = resid_flat = None
        if resid_arg is not None:
            resid = T.decl_buffer(maps, "float32", data=resid_arg.data)
            resid_flat = T.decl_buffer(flat_maps, "float32", data=resid_arg.data)
        w_flat = T.decl_buffer((w.shape[0] * w.shape[1] * w.shape[2],), "float32", data=w.data)
        with T.parallel(0, col_jobs * chunks) as job:
            n, col_tile, first = job_tiles(job, batch, col_jobs, chunk)
            w_tile0 = n % weights * row_tiles if weights > 1 else 0  # image n's weight

            def tile(start: tirx.PrimExpr, widths: tuple[int, ...], rows: int, cross: int) -> None:
                columns = widths + ((cross,) if cross else ())
                if passes == 1:
                    b_at, fill = b_source(x, n, start, columns, depth, window)
                    row_tiles_of(start, widths, rows, cross, b_at, fill, 0)
                    return
                panel = allocated_view((k_block, sum(columns)))
                with T.serial(0, passes) as kb:
                    b_at, fill = b_source(
                        x, n, start, columns, k_block, window, kb * k_block, panel
                    )
                    row_tiles_of(start, widths, rows, cross, b_at, fill, kb)

            def row_tiles_of(start, widths, rows, cross, b_at, fill, kb) -> None:
                """The job's row tiles over pass ``kb`` of K (all of it where ``passes`` is 1)."""
                sub, k0 = cfg.rows // rows, kb * k_block  # sub-tiles of a packed row tile
                with T.serial(0, chunk * sub) as t:
                    row_tile, part = (first + t // sub, t % sub) if sub > 1 else (first + t, 0)
                    o0 = row_tile * cfg.rows + part * rows

                    def a_at(r: int, kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        return w[w_tile0 + row_tile, k0 + kk, part * rows + r]

                    def a_rows_at(kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        return w[w_tile0 + row_tile, k0 + kk, span(part * rows, rows)]

                    def ahead(kk: tirx.PrimExpr) -> None:
                        # One pass: this tile's weight further on; passes: the next tile's, at
                        # this k (the next row tile of the pass).
                        tile_at = w_tile0 + row_tile
                        if passes == 1:
                            at = (tile_at * depth + kk) * cfg.rows + PREFETCH_BYTES // 4
                        else:
                            at = ((tile_at + 1) * depth + k0 + kk) * cfg.rows
                        prefetch(w_flat[tirx.min(at, w_flat.shape[0] - 1)])

                    def finish(r: int, off: int, width: int, value: tirx.PrimExpr) -> None:
                        at = (n, o0 + r, span(start + off, width))
                        # The next row tile's output (and residual) at this vector: in a
                        # model the maps come from L3 / DRAM, missed at every tile's stores.
                        below = tirx.min(o0 + rows + r, out_channels - 1)
                        ahead_at = (n * out_channels + below) * pixels + start + off
                        prefetch(out_flat[ahead_at], write=True)
                        if resid is not None:
                            prefetch(resid_flat[ahead_at])
                        operands = (bias, resid)
                        if passes == 1:
                            store_channel_row(out, at, value, epilogue, operands, out_channels)
                            return
                        with T.If(kb == passes - 1):  # partial sums stay in ``out`` till then
                            with T.Then():
                                store_channel_row(out, at, value, epilogue, operands, out_channels)
                            with T.Else():
                                store_channel_row(
                                    out, at, value, Epilogue(), (None, None), out_channels
                                )

                    def resume(r: int, off: int, width: int) -> tirx.PrimExpr:
                        """The partial sums of the passes before (row -1: a cross column's,
                        its rows as one vector)."""
                        if r < 0:  # channels o0.. of one pixel: a strided gather
                            last = splat(tirx.const(out_channels - 1, "int32"), width)
                            channel = tirx.min(tirx.Ramp(o0, 1, width), last)
                            pixel = start + off + n * out_channels * pixels
                            sums = out_flat[channel * pixels + pixel]
                        else:
                            channel = tirx.min(o0 + r, out_channels - 1)
                            sums = out[n, channel, span(start + off, width)]
                        return tirx.Select(kb > 0, sums, splat(ZERO, width))

                    def filling(kk: tirx.PrimExpr) -> None:
                        fill(kk)
                        ahead(kk)

                    def emit(at_k: Callable[[tirx.PrimExpr], None], every: int = 1) -> None:
                        emit_tile(
                            k_block, rows, widths, a_at, b_at, finish, at_k, cross, a_rows_at,
                            cfg.unroll, None if passes == 1 else resume, every,
                        )  # fmt: skip

                    if fill is None:
                        with T.If(row_tile < row_tiles), T.Then():
                            emit(ahead, line_every)
                    else:  # a job's first row tile always exists
                        with T.If(t == 0):
                            with T.Then():
                                emit(filling)
                            with T.Else(), T.If(row_tile < row_tiles), T.Then():
                                emit(ahead, line_every)

            if last is None:
                tile(col_tile * cfg.width, (cfg.lanes,) * cfg.vectors, tile_rows, 0)
            elif full == 0:  # the map is one tile
                tile(last.start, last.widths, last.rows, last.cross)
            else:
                with T.If(col_tile < full):
                    with T.Then():
                        tile(col_tile * cfg.width, (cfg.lanes,) * cfg.vectors, tile_rows, 0)
                    with T.Else():
                        tile(last.start, last.widths, last.rows, last.cross)
    return ib.get().without_attr("global_symbol")


__all__ = [
    "ColumnTile",
    "GemmConfig",
    "column_tiles",
    "conv1x1_gemm_config",
    "conv1x1_gemm_primfunc",
    "default_gemm_config",
    "emit_tile",
    "gemm_k_block",
    "gemm_unroll",
    "job_tiles",
    "pack_columns",
    "pack_rows",
    "row_chunks",
    "split_vectors",
    "store_channel_row",
    "tile_block",
]


# --- MetaSchedule search space of the 1x1 conv GEMM (see schedules/tunable.py) --------------


def _conv1x1_build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    cfg = GemmConfig(
        params["packed_rows"], knobs["vectors"], params["lanes"], params.get("cross", 0),
        k_block=params.get("k_block", 0), unroll=params.get("unroll", 1),
    )  # fmt: skip
    height, width = params["out_dims"]
    in_dims = params.get("in_dims")
    return conv1x1_gemm_primfunc(
        params["batch"], params["in_channels"], params["out_channels"], height * width,
        Epilogue(**params["epilogue"]), cfg, params["cores"], params["name"], (height, width),
        tile_rows=knobs["rows"], stride=params.get("stride", 1),
        in_dims=tuple(in_dims) if in_dims else None, weights=params.get("weights", 1),
        kernel=tuple(params.get("kernel", (1, 1))), padding=tuple(params.get("padding", (0, 0))),
    )  # fmt: skip


def _conv1x1_space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Tile rows dividing the packed rows, 1-4 vectors (the knobs are sampled independently:
    a tile past the registers spills and loses when measured)."""
    packed = params["packed_rows"]
    return {"rows": [r for r in range(1, packed + 1) if packed % r == 0], "vectors": [1, 2, 3, 4]}


DENSE_CONV1X1 = register(TunableKernel("dense_conv1x1", _conv1x1_build, _conv1x1_space))


def conv1x1_gemm_template(
    batch: int,
    in_channels: int,
    out_channels: int,
    out_dims: tuple[int, int],
    epilogue: Epilogue,
    cfg: GemmConfig,
    cores: int,
    name: str,
    stride: int = 1,
    in_dims: tuple[int, int] | None = None,
    weights: int = 1,
    useful_flops: int | None = None,
    kernel: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> tirx.PrimFunc:
    """The 1x1 conv GEMM at ``cfg`` (its default tile, weight packed by ``cfg.rows``) as a
    MetaSchedule template; the knobs are the tile's rows and vectors. ``stride`` / ``in_dims``
    / ``kernel`` / ``padding``: a strided or k x k conv's, its panels gathered from the input
    map; ``weights``: one per image,
    cycling (``conv1x1_gemm_primfunc``); ``useful_flops``: what tuning counts for it where that
    is not the GEMM's own multiply-adds (Winograd's: the direct conv's)."""
    params = {
        "batch": batch, "in_channels": in_channels, "out_channels": out_channels,
        "out_dims": list(out_dims), "epilogue": asdict(epilogue), "packed_rows": cfg.rows,
        "lanes": cfg.lanes, "cross": cfg.cross, "cores": cores, "name": name,
    }  # fmt: skip
    if cfg.k_block:
        params["k_block"] = cfg.k_block
    if cfg.unroll > 1:
        params["unroll"] = cfg.unroll
    if gathers(stride, kernel, padding):
        params.update(stride=stride, in_dims=list(in_dims))
    if kernel != (1, 1) or any(padding):
        params.update(kernel=list(kernel), padding=list(padding))
    if weights > 1:
        params["weights"] = weights
    if useful_flops is not None:
        params["useful_flops"] = useful_flops
    knobs = {"rows": cfg.rows, "vectors": cfg.vectors}
    return template(_conv1x1_build(params, knobs), DENSE_CONV1X1.name, params, knobs)
