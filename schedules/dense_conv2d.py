"""Dense k x k conv on few input channels (a CNN's stem: 3 -> 64, 7x7, stride 2) as a packed
GEMM over phase-split input rows: TIR kernel generator.

``out[n, o, y, x] = sum_(c, ky, kx) W[o, c, ky, kx] in[n, c, y*s + ky - pad, x*s + kx - pad]`` is
``A @ B`` with A the weight (O x C*kh*kw, packed like ``dense_gemm.pack_rows``) and B's row
``(c, ky, kx)`` for output row ``y`` the input row ``y*s + ky - pad`` read at every ``s``-th
column from ``kx - pad``. Each job stages its output rows' input rows once, split into their
``s`` column phases (phase ``p`` holds columns ``p, p + s, ...`` of the padded row; padding is
zeros, ``staging.gather_row``'s shuffles), so every B vector is one unaligned load: phase
``kx % s`` at column ``x + kx // s``. The register tile and its broadcast FMAs are
``dense_gemm.emit_tile``'s (``rows`` filters x ``vectors`` vectors of output columns), its k
loop over (c, ky) with the ``kw`` taps of a row unrolled.

Against the filters-in-lanes kernel, which broadcast each input pixel into a vector of 16
filters: with 3 input channels a tile there reads a weight vector per 8 FMAs and transposes
its pixels-by-filters accumulators before storing NCHW rows; here the accumulators are output
rows already (measured in ``benchmarks/README.md``).

``DenseConvConfig.flat`` (the "flat rows", ``_flat_rows_primfunc``): B's columns run over a
job's output rows back to back, each row padded by the ``(kw - 1) // sw`` columns its taps
read past it, so a tile's vectors are full across row ends instead of one row's partial ones.
The AVX2 build takes it for dense convs on any channel count where the padding is a small
share of a row (``flat_rows_fit``): with 16 registers the lanes kernel's tile (8 pixels of 8
filters and 9 tap weights) outgrows them, while the GEMM's 4 x 3 tile fits. Strided ones of
many filters run as the 1x1 GEMM over their gathered windows instead (``dense_gemm``, K in
passes that stay in L1 / L2; ``relay_passes.conv_plan._window_gemm``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import allocated_view
from .dense_gemm import (
    GemmConfig,
    column_tiles,
    default_gemm_config,
    emit_tile,
    pack_rows,
    split_vectors,
    store_channel_row,
)
from .epilogue import Epilogue
from .geometry import ConvGeometry
from .pattern_conv2d.staging import gather_row
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template
from .vector_math import span, splat


@dataclass(frozen=True)
class DenseConvConfig:
    """``gemm``: the packed weight's rows and the register tile (``tile_rows`` of them at a
    time, default all) x ``gemm.vectors``; ``out_rows``: output rows per job (their input rows
    staged once: (out_rows - 1) * stride + kh of them); ``flat``: B's columns run across the
    job's rows (``_flat_rows_primfunc``), else each tile is one output row; ``chunks``: the
    flat rows' filters split into that many jobs per row job."""

    gemm: GemmConfig = GemmConfig()
    out_rows: int = 2
    tile_rows: int | None = None
    flat: bool = False
    chunks: int = 1


def default_dense_conv_config(geom: ConvGeometry, lanes: int, registers: int) -> DenseConvConfig:
    """The GEMM's tile for the target (``default_gemm_config`` without the rows-in-lanes column)
    and 2 output rows a job."""
    gemm = replace(default_gemm_config(lanes, registers), cross=0)
    return DenseConvConfig(gemm, out_rows=min(2, geom.out_height))


# A flat row's columns past the output (``(kw - 1) // sw`` of ``row_len``) at most this share.
FLAT_ROW_WASTE = 1 / 15


def flat_rows_fit(geom: ConvGeometry) -> bool:
    """Whether the flat-rows GEMM (``DenseConvConfig.flat``) wastes at most ``FLAT_ROW_WASTE``
    of its columns: outputs 28 wide and more at stride 1, 14 and more at stride 2 (3x3).

    AVX2 build, AMD Zen 5, 2 threads, ResNet-50's dense 3x3 convs alone against ONNX Runtime
    on AVX2 (AVX-512 hidden), one process, 5-7 interleaved rounds: the flat rows 0.94-0.96x ORT
    on 56x56 and 28x28 outputs where the filters-in-lanes kernel reads 0.77-0.88x; 0.83-0.84x
    against 0.78x on the stride-2 14x14 one; on 14x14 at stride 1 (12.5 % waste) 0.81-0.84x
    against 0.84-0.87x and on 7x7 outputs 0.69-0.73x against 0.89-0.94x."""
    (_, kw), (_, sw) = geom.kernel, geom.stride
    shift = (kw - 1) // sw
    return shift <= FLAT_ROW_WASTE * (geom.out_width + shift)


def default_flat_conv_config(
    geom: ConvGeometry, lanes: int, registers: int, cores: int
) -> DenseConvConfig:
    """The flat rows on the GEMM's tile: jobs of the fewest output rows (at least 4) whose
    count divides over the cores (56 rows: 4; 28: 7; 14: 7), else 4 rows and each job's
    filters split over the cores. Same measurements as ``flat_rows_fit``: on 28x28 outputs 7
    rows a job 0.94-0.95x ORT, 14 rows 0.92-0.95x, 4 rows (7 jobs, filters split) 0.84-0.89x;
    on 56x56 4 rows 0.94-0.96x, 14 rows 0.86x."""
    gemm = replace(default_gemm_config(lanes, registers), cross=0)
    out_h = geom.out_height
    even = [r for r in range(4, out_h + 1) if out_h % r == 0 and (out_h // r) % cores == 0]
    if even:
        return DenseConvConfig(gemm, out_rows=even[0], flat=True)
    return DenseConvConfig(gemm, out_rows=min(4, out_h), flat=True, chunks=cores)


def pack_dense_conv(weight: np.ndarray, rows: int) -> np.ndarray:
    """(O, C, kh, kw) -> ``pack_rows`` of the (O, C*kh*kw) matrix."""
    return pack_rows(np.asarray(weight, "float32").reshape(weight.shape[0], -1), rows)


def dense_conv2d_primfunc(
    geom: ConvGeometry,
    epilogue: Epilogue = Epilogue(),
    cfg: DenseConvConfig | None = None,
    name: str = "dense_conv2d",
) -> tirx.PrimFunc:
    """Arguments: data (N, C, H, W), weight ``pack_dense_conv(W, cfg.gemm.rows)``, [bias (O,)],
    [residual (N, O, OH, OW)], out (N, O, OH, OW)."""
    cfg = cfg or DenseConvConfig()
    gemm, lanes = cfg.gemm, cfg.gemm.lanes
    tile_rows = cfg.tile_rows or gemm.rows
    if gemm.rows % tile_rows:
        raise ValueError(f"tile_rows={tile_rows} does not divide the packed rows {gemm.rows}")
    if cfg.flat:
        return _flat_rows_primfunc(geom, epilogue, cfg, name)
    n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
    (kh, kw), (sh, sw), (top, left, _, _) = geom.kernel, geom.stride, geom.padding
    height, width, out_h, out_w = geom.height, geom.width, geom.out_height, geom.out_width
    depth, out_rows = chans * kh * kw, max(1, min(cfg.out_rows, out_h))
    rows_in = (out_rows - 1) * sh + kh  # input rows a job stages
    phase_len = math.ceil((out_w + (kw - 1) // sw) / lanes) * lanes
    full, last = column_tiles(out_w, GemmConfig(tile_rows, gemm.vectors, lanes))
    row_tiles, row_jobs = math.ceil(filters / gemm.rows), math.ceil(out_h / out_rows)
    with IRBuilder() as ib, T.prim_func():
        data, w, bias, resid, out = _arguments(name, geom, epilogue, row_tiles, gemm.rows)
        with T.parallel(0, n_img * row_jobs) as job:
            n, y0 = job // row_jobs, job % row_jobs * out_rows
            phases = allocated_view((chans * rows_in * sw, phase_len))
            with T.serial(0, chans) as c, T.serial(0, rows_in) as r:
                y_in = y0 * sh + r - top
                for p in range(sw):
                    slot = (c * rows_in + r) * sw + p
                    cols = [m * sw + p - left for m in range(phase_len)]
                    with T.If(tvm.tirx.all(y_in >= 0, y_in < height)):
                        with T.Then():
                            gather_row(phases, data, (slot,), (n, c, y_in), cols, width, lanes)
                        with T.Else():
                            _fill_zero(phases, slot, 0, phase_len, lanes)

            def tile(row_tile, t, start, widths: tuple[int, ...], rows: int) -> None:
                """The tile of output row y0 + t at columns ``start``, each ``rows`` filters of
                the packed row tile."""
                y = y0 + t
                with T.serial(0, gemm.rows // rows) as part:
                    o0 = row_tile * gemm.rows + part * rows

                    def a_at(r: int, kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        return w[row_tile, kk, part * rows + r]

                    def b_at(kk: tirx.PrimExpr, off: int, width_: int) -> tirx.PrimExpr:
                        c, ky, kx = kk // (kh * kw), kk // kw % kh, kk % kw
                        slot = (c * rows_in + t * sh + ky) * sw + kx % sw
                        return phases[slot, span(start + off + kx // sw, width_)]

                    def finish(r: int, off: int, width_: int, value: tirx.PrimExpr) -> None:
                        at = (n, o0 + r, y, span(start + off, width_))
                        store_channel_row(out, at, value, epilogue, (bias, resid), filters)

                    emit_tile(depth, rows, widths, a_at, b_at, finish, inner=kw)

            with T.serial(0, row_tiles) as row_tile, T.serial(0, out_rows) as t:
                with T.If(y0 + t < out_h), T.Then():
                    if full:
                        with T.serial(0, full) as col:
                            tile(row_tile, t, col * gemm.width, (lanes,) * gemm.vectors, tile_rows)
                    if last is not None:
                        tile(row_tile, t, last.start, last.widths, last.rows)
    return ib.get().without_attr("global_symbol")


def _flat_rows_primfunc(
    geom: ConvGeometry, epilogue: Epilogue, cfg: DenseConvConfig, name: str
) -> tirx.PrimFunc:
    """``cfg.flat``: B's columns run over a job's output rows back to back. Each row is
    ``row_len = out_w + (kw - 1) // sw`` long (its last columns computed and not stored), so B's
    row for (c, ky, kx) is one stream of the job's staged input: slot (c, ky, kx % sw) holds
    input row ``y * sh + ky - top``'s phase ``kx % sw`` for each output row y of the job, read
    from ``kx // sw`` on. Column tiles are whole vectors across row ends; the stores split them
    (compile-time positions). ``cfg.chunks`` splits a job's filters (each chunk stages its
    own copy), for row jobs that do not divide over the cores."""
    gemm, lanes = cfg.gemm, cfg.gemm.lanes
    tile_rows = cfg.tile_rows or gemm.rows
    n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
    (kh, kw), (sh, sw), (top, left, _, _) = geom.kernel, geom.stride, geom.padding
    height, width, out_h, out_w = geom.height, geom.width, geom.out_height, geom.out_width
    depth, out_rows = chans * kh * kw, max(1, min(cfg.out_rows, out_h))
    row_len = out_w + (kw - 1) // sw
    used = (out_rows - 1) * row_len + out_w  # the job's columns through its last pixel
    tile_w = gemm.vectors * lanes
    full, rest = divmod(used, tile_w)
    slot_len = math.ceil(((full + (rest > 0)) * tile_w + (kw - 1) // sw) / lanes) * lanes
    row_tiles, row_jobs = math.ceil(filters / gemm.rows), math.ceil(out_h / out_rows)
    chunks = max(1, min(cfg.chunks, row_tiles))
    per_chunk = math.ceil(row_tiles / chunks)
    with IRBuilder() as ib, T.prim_func():
        data, w, bias, resid, out = _arguments(name, geom, epilogue, row_tiles, gemm.rows)
        with T.parallel(0, n_img * row_jobs * chunks) as job:
            n, y0 = job // (row_jobs * chunks), job // chunks % row_jobs * out_rows
            chunk = job % chunks
            staged = allocated_view((chans * kh * sw, slot_len))
            with T.serial(0, chans) as c:
                for ky, p in ((ky, p) for ky in range(kh) for p in range(sw)):
                    slot = (c * kh + ky) * sw + p
                    cols = [m * sw + p - left for m in range(row_len)]
                    for t in range(out_rows):
                        y_in = (y0 + t) * sh + ky - top
                        inside = tvm.tirx.all(y_in >= 0, y_in < height, y0 + t < out_h)
                        with T.If(inside):
                            with T.Then():
                                src = (n, c, y_in)
                                at = t * row_len
                                gather_row(staged, data, (slot,), src, cols, width, lanes, at)
                            with T.Else():
                                _fill_zero(staged, slot, t * row_len, row_len, lanes)
                    _fill_zero(
                        staged, slot, out_rows * row_len, slot_len - out_rows * row_len, lanes
                    )

            def tile(row_tile, start: int, widths: tuple[int, ...]) -> None:
                """Columns ``start`` .. of the job's rows, ``tile_rows`` filters at a time."""
                with T.serial(0, gemm.rows // tile_rows) as part:
                    o0 = row_tile * gemm.rows + part * tile_rows

                    def a_at(r: int, kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        return w[row_tile, kk, part * tile_rows + r]

                    def b_at(kk: tirx.PrimExpr, off: int, width_: int) -> tirx.PrimExpr:
                        c, ky, kx = kk // (kh * kw), kk // kw % kh, kk % kw
                        slot = (c * kh + ky) * sw + kx % sw
                        return staged[slot, span(start + off + kx // sw, width_)]

                    def finish(r: int, off: int, width_: int, value: tirx.PrimExpr) -> None:
                        for t, x, lane, count in _row_pieces(start + off, width_, row_len, out_w):
                            piece = (
                                value
                                if count == width_
                                else tirx.Shuffle([value], list(range(lane, lane + count)))
                            )
                            with T.If(y0 + t < out_h), T.Then():
                                at = (n, o0 + r, y0 + t, span(x, count))
                                store_channel_row(out, at, piece, epilogue, (bias, resid), filters)

                    emit_tile(depth, tile_rows, widths, a_at, b_at, finish, inner=kw)

            # Column tiles outer: every row tile reuses a tile's B (its ~tile_w columns of every
            # slot) from L1 / L2. Row tiles outer read the same, within the noise (A/B on Zen 5,
            # AVX2 build).
            starts = [(col * tile_w, (lanes,) * gemm.vectors) for col in range(full)]
            if rest:
                starts.append((full * tile_w, tuple(split_vectors(rest, lanes))))
            for start, widths in starts:
                with T.serial(0, per_chunk) as i:
                    row_tile = chunk * per_chunk + i
                    with T.If(row_tile < row_tiles), T.Then():
                        tile(row_tile, start, widths)
    return ib.get().without_attr("global_symbol")


def _arguments(name: str, geom: ConvGeometry, epilogue: Epilogue, row_tiles: int, rows: int):
    """The kernel's name, attributes and arguments (inside ``T.prim_func``): data, the packed
    weight, the epilogue's bias and residual (None where it has none), out."""
    T.func_name(name)
    T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
    depth = geom.in_channels * geom.kernel[0] * geom.kernel[1]
    data_shape = (geom.batch, geom.in_channels, geom.height, geom.width)
    data = T.arg("data", T.buffer(data_shape, "float32"))
    w = T.arg("weight", T.buffer((row_tiles, depth, rows), "float32"))
    out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
    bias, resid = epilogue.declare_args((geom.out_channels,), out_shape)
    out = T.arg("out", T.buffer(out_shape, "float32"))
    return data, w, bias, resid, out


def _fill_zero(buf: tirx.Buffer, slot, start: int, count: int, lanes: int) -> None:
    """buf[slot, start .. start + count) = 0, ``lanes`` at a time."""
    for v in range(start, start + count, lanes):
        part = min(lanes, start + count - v)
        T.buffer_store(buf, splat(tirx.const(0.0, "float32"), part), [slot, span(v, part)])


def _row_pieces(
    start: int, count: int, row_len: int, out_w: int
) -> list[tuple[int, int, int, int]]:
    """(output row, first column, first lane, lanes) of each stored piece of the flat columns
    ``start .. start + count`` (rows ``row_len`` apart, columns from ``out_w`` on dropped)."""
    pieces, q = [], start
    while q < start + count:
        t, x = divmod(q, row_len)
        end = min(start + count, t * row_len + row_len)
        if x < out_w:
            pieces.append((t, x, q - start, min(end, t * row_len + out_w) - q))
        q = end
    return pieces


# --- MetaSchedule search space (see schedules/tunable.py) -----------------------------------


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    gemm = GemmConfig(params["packed_rows"], knobs["vectors"], params["lanes"])
    flat = {"flat": params.get("flat", False), "chunks": params.get("chunks", 1)}
    cfg = DenseConvConfig(gemm, knobs["out_rows"], knobs["rows"], **flat)
    geom, epilogue = ConvGeometry.from_json(params["geom"]), Epilogue(**params["epilogue"])
    return dense_conv2d_primfunc(geom, epilogue, cfg, params["name"])


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Tile rows dividing the packed rows, 1-4 vectors, 1-4 output rows a job (at most the
    map's); the flat rows also every divisor of the map's rows up to 14."""
    packed = params["packed_rows"]
    out_height = ConvGeometry.from_json(params["geom"]).out_height
    out_rows = {*range(1, min(4, out_height) + 1), default["out_rows"]}
    if params.get("flat"):
        out_rows |= {r for r in range(1, min(14, out_height) + 1) if out_height % r == 0}
    return {
        "rows": [r for r in range(1, packed + 1) if packed % r == 0],
        "vectors": [1, 2, 3, 4],
        "out_rows": sorted(out_rows),
    }


DENSE_CONV2D = register(TunableKernel("dense_conv2d", _build, _space))


def dense_conv2d_template(
    geom: ConvGeometry, epilogue: Epilogue, cfg: DenseConvConfig, name: str
) -> tirx.PrimFunc:
    """The kernel at ``cfg`` (its weight packed by ``cfg.gemm.rows``) as a MetaSchedule
    template; the knobs are the tile's rows and vectors and the output rows a job."""
    params = {
        "geom": asdict(geom),
        "epilogue": asdict(epilogue),
        "packed_rows": cfg.gemm.rows,
        "lanes": cfg.gemm.lanes,
        "name": name,
        "flat": cfg.flat,
        "chunks": cfg.chunks,
    }
    knobs = {
        "rows": cfg.tile_rows or cfg.gemm.rows,
        "vectors": cfg.gemm.vectors,
        "out_rows": cfg.out_rows,
    }
    return template(_build(params, knobs), DENSE_CONV2D.name, params, knobs)
