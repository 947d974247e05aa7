"""Dense depthwise conv (NCHW, one filter per channel), read in place: TIR kernel generator.

Each job is one channel of one image; its ``kh * kw`` weights are scalars held in registers. An
output tile is ``rows`` output rows of the whole map width, each row a few vectors of ``lanes``
columns, computed as one expression per vector (``kh * kw`` FMAs) and stored through the fused
epilogue. Nothing is staged: a tap's input vector is

- stride 1, inside the row: one unaligned load;
- otherwise (a stride, or a vector reaching over the row's padding): a shuffle of the row's
  aligned vectors and a zero (``staging.gather_columns``); a stride-2 row's even and odd
  columns are two shuffles of the same three loads, which LLVM shares among the taps, as it
  shares the rows among a tile's output rows.

Rows whose taps reach the top or bottom padding are emitted one at a time with only their
valid taps; the rows between, ``rows`` at a time, with no condition at all.

A strided conv whose input map is over ``PREFETCH_MIN_INPUT_BYTES`` (MobileNetV2's 96 x
112x112 and 144 x 56x56) streams stride^2 times the input per output of a stride-1 one: each
of those rows prefetches the input rows it is the first to read, ``INPUT_AHEAD`` bytes further
on (into the next channels: a thread's channels are contiguous), and its output row
``OUTPUT_AHEAD`` on, owned. Inside a model the map was just written by the 1x1 conv before
and sits in L3 or DRAM. AMD Zen 3 (AVX2), MobileNetV2 profiled in one process against the
kernel without it: the stride-2 layer on 112x112 1.20-1.30x, the one on 56x56 1.09-1.25x;
stride 1 gained nothing clear in the model and lost 6-18 % alone (``benchmarks/README.md``).

The pattern kernel (``pattern_conv2d``) took depthwise convs before as one full kernel per
filter: it stages each channel into its lane-segmented layout first, a copy of the whole input
that this kernel does not make (AMD Zen 5, 2 threads, MobileNetV2's layers: see
``benchmarks/README.md``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import prefetch_span
from .epilogue import Epilogue
from .geometry import ConvGeometry
from .pattern_conv2d.staging import gather_columns
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template
from .vector_math import splat

# Independent output vectors a tile keeps in flight (FMA latency x pipes, with room to spare);
# at most this many more are emitted per tile (code size, registers for the shared loads).
MIN_VECTORS = 8
MAX_VECTORS = 24
# A strided conv's input map over this many bytes (one image) comes from L3 / DRAM inside a
# model: the kernel prefetches its rows ``INPUT_AHEAD`` bytes and its output rows
# ``OUTPUT_AHEAD`` ahead.
PREFETCH_MIN_INPUT_BYTES = 1 << 20
INPUT_AHEAD = 4096
OUTPUT_AHEAD = 2048


@dataclass(frozen=True)
class DepthwiseConfig:
    """A tile of ``rows`` output rows, each ``ceil(out_width / lanes)`` vectors of ``lanes``."""

    rows: int = 2
    lanes: int = 16


def row_vectors(out_width: int, lanes: int) -> list[tuple[int, int]]:
    """A row's vectors as (first column, width): whole vectors, then one shorter."""
    return [(x, min(lanes, out_width - x)) for x in range(0, out_width, lanes)]


def default_depthwise_config(geom: ConvGeometry, lanes: int) -> DepthwiseConfig:
    """Enough rows for ``MIN_VECTORS`` independent vectors, within ``MAX_VECTORS`` and the map."""
    per_row = len(row_vectors(geom.out_width, lanes))
    rows = max(1, min(math.ceil(MIN_VECTORS / per_row), MAX_VECTORS // per_row, geom.out_height))
    return DepthwiseConfig(rows, lanes)


def pack_depthwise(weight: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> (C, kh * kw): a channel's taps, contiguous."""
    return np.ascontiguousarray(weight.reshape(weight.shape[0], -1), dtype="float32")


def _interior_rows(geom: ConvGeometry) -> tuple[int, int]:
    """Output rows [lo, hi) whose taps all read rows of the input (no padding row)."""
    (kh, _), (sh, _), (top, _, _, _) = geom.kernel, geom.stride, geom.padding
    lo = math.ceil(top / sh)
    hi = (geom.height - kh + top) // sh + 1
    return min(lo, geom.out_height), max(min(hi, geom.out_height), min(lo, geom.out_height))


def depthwise_conv2d_primfunc(
    geom: ConvGeometry,
    epilogue: Epilogue = Epilogue(),
    cfg: DepthwiseConfig | None = None,
    name: str = "depthwise_conv2d",
) -> tirx.PrimFunc:
    """Arguments: data (N, C, H, W), weight ``pack_depthwise(W)`` (C, kh * kw), [bias (C,)],
    [residual (N, C, OH, OW)], out (N, C, OH, OW)."""
    if geom.in_channels != geom.out_channels:
        raise ValueError(
            f"depthwise: {geom.out_channels} filters for {geom.in_channels} channels "
            "(one filter per channel expected)"
        )
    cfg = cfg or default_depthwise_config(geom, 16)
    n_img, chans = geom.batch, geom.in_channels
    (kh, kw), (sh, sw), (top, left, _, _) = geom.kernel, geom.stride, geom.padding
    out_h, out_w, height, width = geom.out_height, geom.out_width, geom.height, geom.width
    vectors = row_vectors(out_w, cfg.lanes)
    lo, hi = _interior_rows(geom)
    tiles = (hi - lo) // cfg.rows
    single = [*range(lo), *range(lo + tiles * cfg.rows, out_h)]  # borders and the rest
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        data = T.arg("data", T.buffer((n_img, chans, height, width), "float32"))
        weight = T.arg("weight", T.buffer((chans, kh * kw), "float32"))
        out_shape = (n_img, chans, out_h, out_w)
        bias, resid = epilogue.declare_args((chans,), out_shape)
        out = T.arg("out", T.buffer(out_shape, "float32"))
        prefetching = sh > 1 and chans * height * width * 4 > PREFETCH_MIN_INPUT_BYTES
        if prefetching:
            data_flat = T.decl_buffer((n_img * chans * height * width,), "float32", data=data.data)
            out_flat = T.decl_buffer((n_img * chans * out_h * out_w,), "float32", data=out.data)
        with T.parallel(0, n_img * chans) as job:
            n, c = job // chans, job % chans
            w = [T.Bind(weight[c, t]) for t in range(kh * kw)]

            def ahead(y: tirx.PrimExpr) -> None:
                """Prefetch the input rows output row ``y`` reads first (its last ``sh``) and
                its own output row, further on in the flat maps."""
                first = (job * height + y * sh - top + kh - sh) * width + INPUT_AHEAD // 4
                prefetch_span(data_flat, first, sh * width)
                row = (job * out_h + y) * out_w + OUTPUT_AHEAD // 4
                prefetch_span(out_flat, row, out_w, write=True)

            def tap(y: tirx.PrimExpr, dy: int, dx: int, x0: int, lanes: int) -> tirx.PrimExpr:
                row = (n, c, y * sh + dy - top)
                cols = [(x0 + e) * sw + dx - left for e in range(lanes)]
                if lanes > 1 and sw == 1 and cols[0] >= 0 and cols[-1] < width:
                    return data[(*row, tirx.Ramp(cols[0], 1, lanes))]
                return gather_columns(data, row, cols, width, cfg.lanes)

            def emit_row(y: tirx.PrimExpr, rows_valid: list[int]) -> None:
                for x0, lanes in vectors:
                    total = None
                    for dy in rows_valid:
                        for dx in range(kw):
                            term = splat(w[dy * kw + dx], lanes) * tap(y, dy, dx, x0, lanes)
                            total = term if total is None else total + term
                    if total is None:
                        total = splat(tirx.const(0.0, "float32"), lanes)
                    at = [n, c, y, tirx.Ramp(x0, 1, lanes) if lanes > 1 else x0]
                    value = epilogue.apply(
                        total,
                        None if bias is None else splat(bias[c], lanes),
                        None if resid is None else resid[tuple(at)],
                    )
                    T.buffer_store(out, value, at)

            if tiles:
                with T.serial(0, tiles) as t:
                    for r in range(cfg.rows):
                        emit_row(lo + t * cfg.rows + r, list(range(kh)))
                        if prefetching:
                            ahead(lo + t * cfg.rows + r)
            for y in single:
                valid = [dy for dy in range(kh) if 0 <= y * sh + dy - top < height]
                emit_row(y, valid)
    return ib.get().without_attr("global_symbol")


# --- MetaSchedule search space (see schedules/tunable.py) -----------------------------------


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    cfg = DepthwiseConfig(knobs["rows"], params["lanes"])
    geom, epilogue = ConvGeometry.from_json(params["geom"]), Epilogue(**params["epilogue"])
    return depthwise_conv2d_primfunc(geom, epilogue, cfg, params["name"])


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """1-8 output rows per tile (at most the map's)."""
    out_height = ConvGeometry.from_json(params["geom"]).out_height
    return {"rows": list(range(1, min(8, out_height) + 1))}


DEPTHWISE_CONV2D = register(TunableKernel("depthwise_conv2d", _build, _space))


def depthwise_conv2d_template(
    geom: ConvGeometry, epilogue: Epilogue, cfg: DepthwiseConfig, name: str
) -> tirx.PrimFunc:
    """The depthwise kernel at ``cfg`` as a MetaSchedule template; the knob is the tile's rows."""
    params = {
        "geom": asdict(geom),
        "epilogue": asdict(epilogue),
        "lanes": cfg.lanes,
        "name": name,
    }
    knobs = {"rows": cfg.rows}
    return template(_build(params, knobs), DEPTHWISE_CONV2D.name, params, knobs)
