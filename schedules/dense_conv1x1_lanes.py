"""Dense 1x1 conv (NCHW) with its filters in the vector lanes. TIR kernel generator.

``out[n, o, p] = sum_c W[o, c] x[n, c, p]`` (p a pixel of the flattened output map) as
``dense_gemm.emit_tile``'s register tile with the operands swapped against ``dense_gemm``'s
conv GEMM: ``rows`` pixels, broadcast from the input's channel row ``c`` (``rows`` neighbouring
floats), times ``vectors`` vectors of filters, the weight packed ``pack_columns(W.T, width)``
so a tile's vectors at one ``c`` are contiguous. Each accumulator is one pixel's ``lanes``
filters, stored down the output's channels (a strided store, ``rows x vectors`` of them per
tile against ``C x rows x vectors`` FMAs). A stride-2 conv reads its pixels' broadcasts from
every other row and column of the input map in place.

No map size wastes lanes: the pixels are the broadcast side (the last tile's missing pixels
repeat the map's last one and are not stored) and the filters fill the lanes (the last filter
tile's vectors are as wide as the filters left). The GEMM with pixels in the lanes fills its
vectors only where the map is a multiple of them (7x7: 49 = 3 x 16 + 1).

On 16 vector registers (AVX2) the tile is 6 pixels x 2 vectors: 12 accumulators, 2 weight
vectors and the broadcast. Alone, AMD Zen 5, AVX2 build, 2 threads, interleaved medians,
+ bias + ReLU, against the pixels-in-lanes GEMM's 4 x 3 (4 x 2 and a last column on 7x7),
on >= 384 input channels: 7x7 maps 1.00-1.18x, 14x14 and 28x28 1.04-1.09x (233-235 GFLOP/s,
95 % of the measured AVX2 peak); fewer channels and stride 2 lose (``conv1x1_lanes_fit``).
AVX-512 keeps the pixels-in-lanes GEMM (8 x 3 tiles on 32 registers).

Parallel jobs are (image, filter tile, chunk of pixel tiles), a filter tile's jobs adjacent:
a thread's contiguous range of jobs reads one weight panel for several pixel chunks. In a model
the weight comes from DRAM: the tile prefetches it ``PREFETCH_BYTES`` ahead, as the GEMM does.
"""

from __future__ import annotations

import math
from dataclasses import asdict

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import prefetch
from .dense_gemm import PREFETCH_BYTES, GemmConfig, emit_tile, over_column_tiles, row_chunks
from .epilogue import Epilogue
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template
from .vector_math import span

LANES_TILE = (6, 2)  # pixels x filter vectors of the tile on 16 registers (see the docstring)
LANES_REGISTERS = 16  # the targets it is taken on: at most this many vector registers
MIN_DEPTH = 384  # input channels: fewer, and the strided stores show (conv1x1_lanes_fit)


def conv1x1_lanes_fit(registers: int, in_channels: int, stride: int) -> bool:
    """Whether a dense 1x1 conv is taken with its filters in the lanes: on 16-register targets,
    stride 1, at least ``MIN_DEPTH`` input channels (a tile's ``rows x vectors`` strided
    stores against its ``C x rows x vectors`` FMAs). Alone, AVX2 build, AMD Zen 5, against the
    pixels-in-lanes GEMM: K = 64 on 56x56 0.85x, K = 160-333 0.94-1.04x, K >= 384 1.04-1.12x;
    stride 2 (pixels broadcast from every other input column) 0.85-0.94x."""
    return registers <= LANES_REGISTERS and stride == 1 and in_channels >= MIN_DEPTH


def default_conv1x1_lanes_config(lanes: int) -> GemmConfig:
    """The tile on a 16-register target: 6 pixels x 2 vectors of ``lanes`` filters."""
    rows, vectors = LANES_TILE
    return GemmConfig(rows=rows, vectors=vectors, lanes=lanes, filters_in_lanes=True)


def _down_channels(base: tirx.PrimExpr, stride: int, width: int) -> tirx.PrimExpr:
    """The flat indices ``base + i * stride`` for ``i < width`` (``base`` for one lane): one
    pixel's ``width`` filters in the output / residual, ``stride`` = the map's pixels."""
    return base if width == 1 else tirx.Ramp(base, stride, width)


def conv1x1_lanes_primfunc(
    batch: int,
    in_channels: int,
    out_channels: int,
    out_dims: tuple[int, int],
    epilogue: Epilogue = Epilogue(),
    cfg: GemmConfig | None = None,
    cores: int = 1,
    name: str = "dense_conv1x1",
    stride: int = 1,
    in_dims: tuple[int, int] | None = None,
    tile_rows: int | None = None,
) -> tirx.PrimFunc:
    """Arguments: x (batch, C, *in_dims), weight ``pack_columns(W.T, cfg.width)``,
    [bias (O,)], [residual (batch, O, *out_dims)], out (batch, O, *out_dims). ``in_dims``
    defaults to ``out_dims`` (stride 1). The tile is ``tile_rows`` (default ``cfg.rows``)
    pixels x ``cfg.vectors`` vectors of filters."""
    cfg = cfg or default_conv1x1_lanes_config(8)
    rows = tile_rows or cfg.rows
    if stride > 1 and in_dims is None:
        raise ValueError("a strided 1x1 conv needs its in_dims")
    in_dims = in_dims or out_dims
    if stride == 1 and tuple(in_dims) != tuple(out_dims):
        raise ValueError(f"a stride-1 1x1 conv maps {in_dims} to itself, not to {out_dims}")
    out_w, in_w = out_dims[1], in_dims[1]
    pixels, in_pixels = math.prod(out_dims), math.prod(in_dims)
    filter_tiles = math.ceil(out_channels / cfg.width)
    pixel_tiles = math.ceil(pixels / rows)
    other_jobs = batch * filter_tiles
    chunk = row_chunks(pixel_tiles, other_jobs, cores)
    chunks = math.ceil(pixel_tiles / chunk)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        x_arg = T.arg("x", T.buffer((batch, in_channels, *in_dims), "float32"))
        w = T.arg("weight", T.buffer((filter_tiles, in_channels, cfg.width), "float32"))
        bias, resid_arg = epilogue.declare_args((out_channels,), (batch, out_channels, *out_dims))
        out_arg = T.arg("out", T.buffer((batch, out_channels, *out_dims), "float32"))
        x = T.decl_buffer((batch, in_channels, in_pixels), "float32", data=x_arg.data)
        w_flat = T.decl_buffer((filter_tiles * in_channels * cfg.width,), "float32", data=w.data)
        out = T.decl_buffer((batch * out_channels * pixels,), "float32", data=out_arg.data)
        resid = None
        if resid_arg is not None:
            resid = T.decl_buffer(out.shape, "float32", data=resid_arg.data)
        with T.parallel(0, other_jobs * chunks) as job:
            n = job // chunks // filter_tiles
            tile = job // chunks % filter_tiles
            first = job % chunks * chunk
            o0 = tile * cfg.width

            def pixel_tiles_of(widths: tuple[int, ...]) -> None:
                with T.serial(0, chunk) as t:
                    p0 = (first + t) * rows

                    def a_at(r: int, kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        p = tirx.min(p0 + r, pixels - 1)  # a last tile's pixels repeat
                        at = p if stride == 1 else (p // out_w * in_w + p % out_w) * stride
                        return x[n, kk, at]

                    def b_at(kk: tirx.PrimExpr, off: int, width: int) -> tirx.PrimExpr:
                        return w[tile, kk, span(off, width)]

                    def ahead(kk: tirx.PrimExpr) -> None:
                        at = (tile * in_channels + kk) * cfg.width + PREFETCH_BYTES // 4
                        prefetch(w_flat[tirx.min(at, w_flat.shape[0] - 1)])

                    def finish(r: int, off: int, width: int, value: tirx.PrimExpr) -> None:
                        base = (n * out_channels + o0 + off) * pixels + p0 + r
                        at = _down_channels(base, pixels, width)
                        value = epilogue.apply(
                            value,
                            None if bias is None else bias[span(o0 + off, width)],
                            None if resid is None else resid[at],
                        )
                        with T.If(p0 + r < pixels), T.Then():
                            T.buffer_store(out, value, [at])

                    with T.If(first + t < pixel_tiles), T.Then():
                        emit_tile(in_channels, rows, widths, a_at, b_at, finish, ahead)

            over_column_tiles(out_channels, cfg, tile, pixel_tiles_of)
    return ib.get().without_attr("global_symbol")


# --- MetaSchedule search space (see schedules/tunable.py) ----------------------------------


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    cfg = GemmConfig(params["rows"], params["vectors"], params["lanes"], filters_in_lanes=True)
    return conv1x1_lanes_primfunc(
        params["batch"], params["in_channels"], params["out_channels"],
        tuple(params["out_dims"]), Epilogue(**params["epilogue"]), cfg, params["cores"],
        params["name"], params["stride"], tuple(params["in_dims"]), tile_rows=knobs["rows"],
    )  # fmt: skip


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """1-8 pixels a tile; the filter vectors are the packed weight's."""
    return {"rows": list(range(1, 9))}


DENSE_CONV1X1_LANES = register(TunableKernel("dense_conv1x1_lanes", _build, _space))


def conv1x1_lanes_template(
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
) -> tirx.PrimFunc:
    """The kernel at ``cfg`` (its weight packed by ``cfg.width``) as a MetaSchedule template;
    the knob is the tile's pixels."""
    params = {
        "batch": batch, "in_channels": in_channels, "out_channels": out_channels,
        "out_dims": list(out_dims), "in_dims": list(in_dims or out_dims), "stride": stride,
        "epilogue": asdict(epilogue), "rows": cfg.rows, "vectors": cfg.vectors,
        "lanes": cfg.lanes, "cores": cores, "name": name,
    }  # fmt: skip
    knobs = {"rows": cfg.rows}
    return template(_build(params, knobs), DENSE_CONV1X1_LANES.name, params, knobs)
