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
    staged once: (out_rows - 1) * stride + kh of them)."""

    gemm: GemmConfig = GemmConfig()
    out_rows: int = 2
    tile_rows: int | None = None


def default_dense_conv_config(geom: ConvGeometry, lanes: int, registers: int) -> DenseConvConfig:
    """The GEMM's tile for the target (``default_gemm_config`` without the rows-in-lanes column)
    and 2 output rows a job."""
    gemm = replace(default_gemm_config(lanes, registers), cross=0)
    return DenseConvConfig(gemm, out_rows=min(2, geom.out_height))


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
    n_img, chans, filters = geom.batch, geom.in_channels, geom.out_channels
    (kh, kw), (sh, sw), (top, left, _, _) = geom.kernel, geom.stride, geom.padding
    height, width, out_h, out_w = geom.height, geom.width, geom.out_height, geom.out_width
    depth, out_rows = chans * kh * kw, max(1, min(cfg.out_rows, out_h))
    rows_in = (out_rows - 1) * sh + kh  # input rows a job stages
    phase_len = math.ceil((out_w + (kw - 1) // sw) / lanes) * lanes
    full, last = column_tiles(out_w, GemmConfig(tile_rows, gemm.vectors, lanes))
    row_tiles, row_jobs = math.ceil(filters / gemm.rows), math.ceil(out_h / out_rows)
    out_shape = (n_img, filters, out_h, out_w)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        data = T.arg("data", T.buffer((n_img, chans, height, width), "float32"))
        w = T.arg("weight", T.buffer((row_tiles, depth, gemm.rows), "float32"))
        bias, resid = epilogue.declare_args((filters,), out_shape)
        out = T.arg("out", T.buffer(out_shape, "float32"))
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
                            for v in range(0, phase_len, lanes):
                                zero = splat(tirx.const(0.0, "float32"), lanes)
                                T.buffer_store(phases, zero, [slot, span(v, lanes)])

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


# --- MetaSchedule search space (see schedules/tunable.py) -----------------------------------


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    gemm = GemmConfig(params["packed_rows"], knobs["vectors"], params["lanes"])
    cfg = DenseConvConfig(gemm, knobs["out_rows"], knobs["rows"])
    geom, epilogue = ConvGeometry.from_json(params["geom"]), Epilogue(**params["epilogue"])
    return dense_conv2d_primfunc(geom, epilogue, cfg, params["name"])


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Tile rows dividing the packed rows, 1-4 vectors, 1-4 output rows a job (at most the
    map's)."""
    packed = params["packed_rows"]
    out_height = ConvGeometry.from_json(params["geom"]).out_height
    return {
        "rows": [r for r in range(1, packed + 1) if packed % r == 0],
        "vectors": [1, 2, 3, 4],
        "out_rows": list(range(1, min(4, out_height) + 1)),
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
    }
    knobs = {
        "rows": cfg.tile_rows or cfg.gemm.rows,
        "vectors": cfg.gemm.vectors,
        "out_rows": cfg.out_rows,
    }
    return template(_build(params, knobs), DENSE_CONV2D.name, params, knobs)
