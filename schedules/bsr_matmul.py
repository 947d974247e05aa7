"""Block-sparse (BSR) FC and 1x1 conv kernels: TIR generators for ``formats.block.BSRWeight``.

Both compute ``out = act(W @ x + bias (+ residual))`` with ``W (O, I)`` in BSR (``(r, c)``
blocks, values stored ``(K, c, r)``); each block's ``r x c`` loop is unrolled, the loop over a
row's blocks is data-dependent (``block_ptr``). Work is split into ``shares`` contiguous ranges
of packed block rows (balanced by the packing), one parallel job per (share, tile).

- ``bsr_matmul_primfunc`` (FC, ``x (M, K)``, ``out (M, N)``): vectorized along the r outputs of a
  block (one r-wide FMA per block column and batch row, the input broadcast); the accumulator
  holds ``rows`` batch rows x r outputs. A batch-1 FC layer streams the packed weight once.
- ``bsr_conv1x1_primfunc`` (NCHW 1x1 conv, any stride): vectorized along the output pixels; an
  accumulator tile of r output channels x ``vectors * vector`` pixels stays in registers and each
  input vector load feeds r FMAs. Stride 1 reads the input in place (an ``(N, C, H*W)`` view);
  a pixel tail that is not a whole vector is staged zero-padded; a strided
  conv first gathers its subsampled input into ``(N, C, Ho*Wo)``.
  Where its output map is over ``PREFETCH_MIN_OUTPUT_BYTES``, a tile prefetches the next block
  row's output (owned) and residual at its pixels before its stores: in a model those maps are
  in L3 / DRAM. AMD EPYC Zen 3 (AVX2), 2 threads, profiled inside whole models (one process,
  5-7 rounds): MobileNetV2 + BSR 16->96 on 112x112 0.78 -> 0.60 ms, 24->144 on 56x56 0.54 ->
  0.39; ResNet-50 + BSR 64->256 on 56x56 (4 calls) 3.32 -> 2.47, 128->512 on 28x28 2.17 ->
  1.74. On the maps of 800 KB and less (14x14, 7x7) the same prefetches read 1.05-1.5x slower.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import asdict, dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import STACK_BYTES, accumulator_rows, prefetch
from .epilogue import Epilogue, optional_load
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template

ZERO = tvm.tirx.const(0.0, "float32")
PREFETCH_MIN_OUTPUT_BYTES = 1 << 20  # a 1x1 conv's output map prefetched over this (see above)


@dataclass(frozen=True)
class BSRMatmulConfig:
    """FC knobs: batch rows per job, parallel shares of block rows."""

    rows: int = 1
    shares: int = 1


def default_bsr_matmul_config(m: int, num_threads: int = 1) -> BSRMatmulConfig:
    return BSRMatmulConfig(rows=min(m, 8), shares=max(1, num_threads))


def _vector_loop(extent: int):
    return T.vectorized(0, extent) if extent > 1 else T.serial(0, extent)


def bsr_matmul_primfunc(
    lead: int | tuple[int, ...],
    k: int,
    n: int,
    block: tuple[int, int],
    num_blocks: int,
    epilogue: Epilogue = Epilogue(),
    config: BSRMatmulConfig | None = None,
    name: str = "bsr_matmul",
    kept: tuple[int, int] | None = None,
) -> tirx.PrimFunc:
    """Arguments: x (*lead, K), block_ptr (R+1,) i32, block_col (nb,) i32, block_values
    (nb, c, r), row_order (R,) i32, [bias (R*r,) in original order, zero-padded], [residual
    (*lead, N)], out (*lead, N); R = ceil(N / r), nb = max(num_blocks, 1). The leading dims
    (tokens x batch, or an int M) are the M rows, read through flat (M, K) / (M, N) views.

    ``kept = (nr, nc)`` makes it the BCR kernel: row_idx (nb, nr) i32 and col_idx (nb, nc) i32
    follow block_col, block_values is (nb, nc, nr); each block's sub-block is computed as
    nr-wide vectors, then added into its rows."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    m = math.prod(lead)
    cfg = config or default_bsr_matmul_config(m)
    r, c = block
    sub_r, sub_c = kept if kept is not None else (r, c)
    n_rows = math.ceil(n / r)
    rows = cfg.rows
    m_tiles = math.ceil(m / rows)
    shares = max(1, min(cfg.shares, n_rows))
    per_share = math.ceil(n_rows / shares)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        # Final (``tirx.is_scheduled``): MetaSchedule can neither schedule nor sample it, so it
        # is no tuning task; TVM's default schedules leave it as it is.
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        x_arg = T.arg("x", T.buffer((*lead, k), "float32"))
        ptr = T.arg("block_ptr", T.buffer((n_rows + 1,), "int32"))
        bcol = T.arg("block_col", T.buffer((max(num_blocks, 1),), "int32"))
        if kept is not None:
            ridx = T.arg("row_idx", T.buffer((max(num_blocks, 1), sub_r), "int32"))
            cidx = T.arg("col_idx", T.buffer((max(num_blocks, 1), sub_c), "int32"))
        vals = T.arg("block_values", T.buffer((max(num_blocks, 1), sub_c, sub_r), "float32"))
        order = T.arg("row_order", T.buffer((n_rows,), "int32"))
        bias, resid_arg = epilogue.declare_args((n_rows * r,), (*lead, n))
        out_arg = T.arg("out", T.buffer((*lead, n), "float32"))
        x = T.decl_buffer((m, k), "float32", data=x_arg.data)
        out = T.decl_buffer((m, n), "float32", data=out_arg.data)
        resid = None if resid_arg is None else T.decl_buffer((m, n), data=resid_arg.data)
        with T.parallel(0, shares * m_tiles) as job:
            share = job // m_tiles
            m0 = job % m_tiles * rows
            acc = T.alloc_buffer((rows, r), "float32")  # < 1 KiB: on the stack
            with share_rows(share, per_share, shares, n_rows) as i:
                with T.unroll(0, rows) as mr, _vector_loop(r) as ii:
                    T.buffer_store(acc, ZERO, [mr, ii])
                with T.serial(ptr[i], ptr[i + 1]) as b:
                    col0 = T.Bind(bcol[b] * c)
                    dst = acc  # BCR: the block's kept rows first, added into acc after
                    if kept is not None:
                        dst = T.alloc_buffer((rows, sub_r), "float32")
                        with T.unroll(0, rows) as mr, _vector_loop(sub_r) as ii:
                            T.buffer_store(dst, ZERO, [mr, ii])
                    with T.unroll(0, sub_c) as j:
                        col = col0 + (cidx[b, j] if kept is not None else j)
                        col = col if k % c == 0 else tvm.tirx.min(col, k - 1)
                        with T.unroll(0, rows) as mr:
                            xv = T.Bind(x[tvm.tirx.min(m0 + mr, m - 1), col])
                            with _vector_loop(sub_r) as ii:
                                T.buffer_store(dst, dst[mr, ii] + xv * vals[b, j, ii], [mr, ii])
                    if kept is not None:
                        with T.unroll(0, rows) as mr, T.unroll(0, sub_r) as ii:
                            row = ridx[b, ii]
                            T.buffer_store(acc, acc[mr, row] + dst[mr, ii], [mr, row])
                o0 = T.Bind(order[i] * r)

                def store(mr: tirx.PrimExpr, ii: tirx.PrimExpr) -> None:
                    value = epilogue.apply(
                        acc[mr, ii], optional_load(bias, o0 + ii),
                        optional_load(resid, m0 + mr, o0 + ii),
                    )  # fmt: skip
                    T.buffer_store(out, value, [m0 + mr, o0 + ii])

                if n % r == 0 and r > 1:  # each row's r outputs as one vector store
                    for mr in range(rows):
                        with when(m0 + mr < m if m % rows else None):
                            store(mr, tvm.tirx.Ramp(0, 1, r))
                else:
                    with T.serial(0, rows) as mr, T.serial(0, r) as ii:
                        conds = [m0 + mr < m] + ([o0 + ii < n] if n % r else [])
                        with T.If(tvm.tirx.all(*conds)), T.Then():
                            store(mr, ii)
    return ib.get().without_attr("global_symbol")


@dataclass(frozen=True)
class Conv1x1Geometry:
    """Static facts of an NCHW 1x1 conv (no padding): batch, channels in/out, input size, stride."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    stride: tuple[int, int] = (1, 1)

    @property
    def out_height(self) -> int:
        return (self.height - 1) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        return (self.width - 1) // self.stride[1] + 1

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def strided(self) -> bool:
        return self.stride != (1, 1)


@dataclass(frozen=True)
class BSRConvConfig:
    """1x1 conv knobs: vector lanes along pixels, vectors per tile, parallel shares of rows, and
    whether the jobs run on the thread pool at all (a ~30 us layer can lose its launch cost)."""

    vector: int = 16
    vectors: int = 1
    shares: int = 1
    parallel: bool = True

    @property
    def tile(self) -> int:
        return self.vector * self.vectors


def default_bsr_conv_config(
    geom: Conv1x1Geometry,
    r: int,
    lanes: int = 16,
    num_threads: int = 1,
    accumulators: int = 16,
    bcr: bool = False,
) -> BSRConvConfig:
    """Tile of r x (vectors x vector) accumulators within ``accumulators`` registers (BCR: its
    (r, tile) buffer under 1 KiB, the stack); shares of block rows only when pixel tiles alone
    cannot feed the cores."""
    pixels = geom.pixels
    vector = lanes if pixels >= 2 * lanes or lanes <= 8 else 8
    vectors = max(1, min(accumulators // r, 8, math.ceil(pixels / vector)))
    while bcr and vectors > 1 and r * vectors * vector * 4 >= STACK_BYTES:
        vectors -= 1
    while bcr and vector > 4 and r * vectors * vector * 4 >= STACK_BYTES:
        vector //= 2
    tiles = geom.batch * math.ceil(pixels / (vector * vectors))
    shares = 1 if tiles >= 4 * num_threads else max(1, num_threads)
    return BSRConvConfig(vector=vector, vectors=vectors, shares=shares)


def bsr_conv1x1_primfunc(
    geom: Conv1x1Geometry,
    block: tuple[int, int],
    num_blocks: int,
    epilogue: Epilogue = Epilogue(),
    config: BSRConvConfig | None = None,
    name: str = "bsr_conv1x1",
    kept: tuple[int, int] | None = None,
) -> tirx.PrimFunc:
    """Arguments: data (N, C, H, W), block_ptr (R+1,) i32, block_col (nb,) i32, block_values
    (nb, c, r) f32, row_order (R,) i32, [bias (R*r,) original order zero-padded], [residual
    (N, O, Ho, Wo)], out (N, O, Ho, Wo); inside, pixels are one axis (flat views, no copy).

    ``kept = (nr, nc)`` makes it the BCR kernel (``formats.block.BCRWeight``): then row_idx
    (nb, nr) i32 and col_idx (nb, nc) i32 follow block_col, and block_values is (nb, nc, nr).
    Each block's nr x nc sub-block is accumulated in registers, then added into its rows."""
    r, c = block
    cfg = config or default_bsr_conv_config(geom, r)
    n_img, chans, outs, pixels = geom.batch, geom.in_channels, geom.out_channels, geom.pixels
    n_rows = math.ceil(outs / r)
    vec, tile = cfg.vector, cfg.tile
    full_tiles, tail = divmod(pixels, tile)
    tail_vecs = math.ceil(tail / vec)
    stage_tail = tail % vec != 0 and not geom.strided
    shares = max(1, min(cfg.shares, n_rows))
    per_share = math.ceil(n_rows / shares)
    tiles = full_tiles + (tail > 0)
    clamp_chan = chans % c != 0

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        data4 = T.arg("data", T.buffer((n_img, chans, geom.height, geom.width), "float32"))
        ptr = T.arg("block_ptr", T.buffer((n_rows + 1,), "int32"))
        bcol = T.arg("block_col", T.buffer((max(num_blocks, 1),), "int32"))
        nb = max(num_blocks, 1)
        if kept is not None:
            ridx = T.arg("row_idx", T.buffer((nb, kept[0]), "int32"))
            cidx = T.arg("col_idx", T.buffer((nb, kept[1]), "int32"))
        sub_r, sub_c = kept if kept is not None else (r, c)
        vals = T.arg("block_values", T.buffer((nb, sub_c, sub_r), "float32"))
        order = T.arg("row_order", T.buffer((n_rows,), "int32"))
        out_shape = (n_img, outs, geom.out_height, geom.out_width)
        bias, resid = epilogue.declare_args((n_rows * r,), out_shape)
        out = T.arg("out", T.buffer(out_shape, "float32"))
        # Pixels as one axis: (N, C|O, H*W) views of the same memory (no copy).
        flat = (n_img, outs, pixels)
        out = T.decl_buffer(flat, "float32", data=out.data)
        resid = T.decl_buffer(flat, "float32", data=resid.data) if resid is not None else None
        data = (
            data4
            if geom.strided
            else T.decl_buffer((n_img, chans, pixels), "float32", data=data4.data)
        )

        # Where each tile reads its input from: src(n, channel, pixel) -> value.
        if geom.strided:
            src_buf = _stage_strided(data, geom, tiles * tile)

            def src(n, ch, p, tail_tile):
                return src_buf[n, ch, p]
        elif stage_tail:
            tail_buf = _stage_tail(data, geom, full_tiles * tile, tail_vecs * vec)

            def src(n, ch, p, tail_tile):
                if tail_tile:
                    return tail_buf[n, ch, p - full_tiles * tile]
                return data[n, ch, p]
        else:

            def src(n, ch, p, tail_tile):
                return data[n, ch, p]

        def tile_body(n, t, i, vectors, tail_tile):
            """acc = block row i (packed) x pixels [t * tile, + vectors * vec); then store."""
            p0, width = t * tile, vectors * vec
            # BSR: one stack buffer per output row (each < 1 KiB, constant indices: registers).
            # BCR: rows are indexed by row_idx, so one (r, width) buffer (memory), and the
            # block's kept rows accumulate in per-row register buffers first.
            if kept is None:
                acc_rows = accumulator_rows(r, width)
                dst = acc_rows
            else:
                acc = T.alloc_buffer((r, width), "float32")
                acc_rows = [_RowView(acc, ii) for ii in range(r)]
            for row in acc_rows:
                with T.unroll(0, vectors) as v, T.vectorized(0, vec) as x:
                    _put(row, v * vec + x, ZERO)
            with T.serial(ptr[i], ptr[i + 1]) as b:
                ch0 = T.Bind(bcol[b] * c)
                if kept is not None:
                    dst = accumulator_rows(sub_r, width)
                    for row in dst:
                        with T.unroll(0, vectors) as v, T.vectorized(0, vec) as x:
                            T.buffer_store(row, ZERO, [v * vec + x])
                with T.unroll(0, sub_c) as j:
                    ch = ch0 + (cidx[b, j] if kept is not None else j)
                    ch = tvm.tirx.min(ch, chans - 1) if clamp_chan else ch
                    w = [T.Bind(vals[b, j, ii]) for ii in range(sub_r)]
                    with T.unroll(0, vectors) as v, T.vectorized(0, vec) as x:
                        xv = src(n, ch, p0 + v * vec + x, tail_tile)
                        col = v * vec + x
                        for ii in range(sub_r):
                            T.buffer_store(dst[ii], dst[ii][col] + w[ii] * xv, [col])
                if kept is not None:
                    for ii in range(sub_r):
                        row = T.Bind(ridx[b, ii])
                        with T.unroll(0, vectors) as v, T.vectorized(0, vec) as x:
                            col = v * vec + x
                            T.buffer_store(acc, acc[row, col] + dst[ii][col], [row, col])
            o0 = T.Bind(order[i] * r)
            if n_img * outs * pixels * 4 > PREFETCH_MIN_OUTPUT_BYTES:
                below = T.Bind(order[tvm.tirx.min(i + 1, n_rows - 1)] * r)
                for ii, v in itertools.product(range(r), range(vectors)):
                    o = tvm.tirx.min(below + ii, outs - 1)
                    at = (n, o, tvm.tirx.min(p0 + v * vec, pixels - 1))
                    prefetch(out[at], write=True)
                    if resid is not None:
                        prefetch(resid[at])

            def store(ii, p):
                o = o0 + ii
                value = epilogue.apply(
                    acc_rows[ii][p - p0],
                    optional_load(bias, o),
                    optional_load(resid, n, o, p),
                )
                T.buffer_store(out, value, [n, o, p])

            for ii in range(r):
                with when(o0 + ii < outs if outs % r and ii >= outs % r else None):
                    if tail_tile:  # whole vectors, then the last pixels one by one
                        if tail // vec:
                            with T.serial(0, tail // vec) as v, T.vectorized(0, vec) as x:
                                store(ii, p0 + v * vec + x)
                        with T.serial(tail // vec * vec, tail) as p:
                            store(ii, p0 + p)
                    else:
                        with T.serial(0, vectors) as v, T.vectorized(0, vec) as x:
                            store(ii, p0 + v * vec + x)

        jobs = T.parallel if cfg.parallel else T.serial
        with jobs(0, n_img * tiles * shares) as job:
            n = job // (tiles * shares)
            t = job % (tiles * shares) // shares
            share = job % shares
            if full_tiles and tail:
                with T.If(t < full_tiles):
                    with T.Then():
                        with share_rows(share, per_share, shares, n_rows) as i:
                            tile_body(n, t, i, cfg.vectors, False)
                    with T.Else():
                        with share_rows(share, per_share, shares, n_rows) as i:
                            tile_body(n, t, i, tail_vecs, True)
            else:
                with share_rows(share, per_share, shares, n_rows) as i:
                    if full_tiles:
                        tile_body(n, t, i, cfg.vectors, False)
                    else:
                        tile_body(n, t, i, tail_vecs, True)
    return ib.get().without_attr("global_symbol")


def _put(row, col, value) -> None:
    """Store into a 1-D buffer or a ``_RowView``."""
    if isinstance(row, _RowView):
        T.buffer_store(row.buf, value, [row.ii, col])
    else:
        T.buffer_store(row, value, [col])


class _RowView:
    """Row ``ii`` of a 2-D buffer, read / written like a 1-D buffer."""

    def __init__(self, buf, ii: int) -> None:
        self.buf, self.ii = buf, ii

    def __getitem__(self, col):
        return self.buf[self.ii, col]


@contextlib.contextmanager
def share_rows(share, per_share: int, shares: int, n_rows: int):
    """Loop over the packed block rows of one share. The loop starts at 0: a loop whose start
    depends on the parallel variable ran the wrong rows here (TVM 0.27, LLVM codegen)."""
    with T.serial(0, per_share) as di:
        i = share * per_share + di
        with when(i < n_rows if per_share * shares != n_rows else None):
            yield i


@contextlib.contextmanager
def when(cond):
    """``T.If(cond)`` frame, or nothing when ``cond`` is None (statically true)."""
    if cond is None:
        yield
        return
    with T.If(cond), T.Then():
        yield


def _stage_strided(data, geom: Conv1x1Geometry, padded: int):
    """buf[n, c, p] = data[n, c, (p // Wo) * sh, (p % Wo) * sw] for p < Ho*Wo, else 0."""
    n_img, chans = geom.batch, geom.in_channels
    (sh, sw), wo, pixels = geom.stride, geom.out_width, geom.pixels
    buf = T.alloc_buffer((n_img, chans, padded), "float32")
    with T.parallel(0, n_img * chans) as nc:
        n, ch = nc // chans, nc % chans
        with T.serial(0, geom.out_height) as y, T.serial(0, wo) as x:
            T.buffer_store(buf, data[n, ch, y * sh, x * sw], [n, ch, y * wo + x])
        with T.serial(pixels, padded) as p:
            T.buffer_store(buf, ZERO, [n, ch, p])
    return buf


def _stage_tail(data, geom: Conv1x1Geometry, start: int, width: int):
    """buf[n, c, q] = data[n, c, start + q] for start + q < P, else 0 (q < width)."""
    n_img, chans, pixels = geom.batch, geom.in_channels, geom.pixels
    buf = T.alloc_buffer((n_img, chans, width), "float32")
    with T.parallel(0, n_img * chans) as nc:
        n, ch = nc // chans, nc % chans
        with T.serial(0, width) as q:
            inside = start + q < pixels
            value = data[n, ch, tvm.tirx.min(start + q, pixels - 1)]
            T.buffer_store(buf, tvm.tirx.if_then_else(inside, value, ZERO), [n, ch, q])
    return buf


# --- MetaSchedule search space of the 1x1 conv kernel (see schedules/tunable.py) ------------


def _conv_build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    geom = Conv1x1Geometry(**{**params["geom"], "stride": tuple(params["geom"]["stride"])})
    kept = tuple(params["kept"]) if params["kept"] else None
    config = BSRConvConfig(
        vector=knobs["vector"], vectors=knobs["vectors"], shares=knobs["shares"],
        parallel=bool(knobs.get("parallel", 1)),
    )  # fmt: skip
    return bsr_conv1x1_primfunc(
        geom, tuple(params["block"]), params["num_blocks"], Epilogue(**params["epilogue"]),
        config, params["name"], kept,
    )  # fmt: skip


def _conv_space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Vector = the target's lanes or half, 1-8 vectors per tile, 1 share or one per core, on
    the thread pool or not."""
    lanes = params["lanes"]
    return {
        "vector": sorted({lanes, max(4, lanes // 2)}),
        "vectors": list(range(1, 9)),
        "shares": sorted({1, params["num_threads"]}),
        "parallel": [1, 0],
    }


BSR_CONV1X1 = register(TunableKernel("bsr_conv1x1", _conv_build, _conv_space))


def bsr_conv1x1_template(
    geom: Conv1x1Geometry,
    block: tuple[int, int],
    num_blocks: int,
    epilogue: Epilogue,
    config: BSRConvConfig,
    name: str,
    kept: tuple[int, int] | None,
    lanes: int,
    num_threads: int,
) -> tirx.PrimFunc:
    """The 1x1 kernel at ``config`` as a MetaSchedule template (``config``: its default)."""
    params = {
        "geom": asdict(geom), "block": list(block), "num_blocks": num_blocks,
        "epilogue": asdict(epilogue), "name": name, "kept": list(kept) if kept else None,
        "lanes": lanes, "num_threads": num_threads,
    }  # fmt: skip
    knobs = {"vector": config.vector, "vectors": config.vectors, "shares": config.shares,
             "parallel": int(config.parallel)}  # fmt: skip
    return template(_conv_build(params, knobs), BSR_CONV1X1.name, params, knobs)
