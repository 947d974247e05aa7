"""Pattern-sparse conv2d (NCHW, OIHW weight packed as ``PatternWeight``): TIR kernel generator.

The kernel is generated per layer with the layer's patterns baked in: each pattern is one code
path whose tap offsets ``(dy, dx)`` are compile-time constants, so the inner loop loads one input
channel index and the pattern's weights per kernel, then does ``taps x rows`` vector FMAs over an
output tile of ``rows x padded width``. A dense conv is the same kernel with one full pattern.

Structure (per image)::

    pad[c, phase, Y, q]   = zero-padded input, columns split by stride phase (contiguous loads)
    parallel for (row tile, packed filter i):
        acc[rows, width] = 0
        for pattern p:                       # unrolled in Python: one code path per pattern
            for k in kernel_ptr[i, p] .. kernel_ptr[i, p + 1]:
                c = kernel_channel[k]; w_t = kernel_values[k, t]
                for r (unrolled), x (vectorized):
                    acc[r, x] += sum_t w_t * pad[c, dx_t % s, (y0 + r) * s + dy_t, x + dx_t // s]
        out[filter_order[i], y0 + r, :W] = act(acc + bias[i] (+ residual))

The schedule knobs (``PatternConvConfig``) are rows per tile and vector width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6")


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape facts of an NCHW conv2d with an OIHW weight (symmetric padding allowed)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return (self.height + top + bottom - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.kernel[1]) // self.stride[1] + 1


@dataclass(frozen=True)
class Epilogue:
    """What is fused after the conv: per-filter bias, residual add, activation (in that order)."""

    bias: bool = False
    residual: bool = False
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.activation not in EPILOGUE_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")


@dataclass(frozen=True)
class PatternConvConfig:
    """Schedule knobs: output rows per tile and vector lanes along the output width."""

    rows: int = 2
    vector: int = 8
    extra: dict = field(default_factory=dict, compare=False)


def default_config(geom: ConvGeometry, vector: int = 8, max_accumulators: int = 14) -> PatternConvConfig:
    """Largest row tile whose accumulators fit the register file (16 vector registers on AVX2)."""
    vecs_per_row = math.ceil(geom.out_width / vector)
    rows = max(1, min(geom.out_height, max_accumulators // vecs_per_row))
    # Prefer tiles that divide the output evenly (no wasted rows in the last tile).
    for r in range(rows, 0, -1):
        if geom.out_height % r == 0 and r * 2 > rows:
            rows = r
            break
    return PatternConvConfig(rows=rows, vector=vector)


def pattern_conv2d_primfunc(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    epilogue: Epilogue = Epilogue(),
    config: PatternConvConfig | None = None,
    name: str = "pattern_conv2d",
) -> tirx.PrimFunc:
    """Build the TIR kernel for one layer's geometry, pattern library and epilogue.

    Arguments, in order: data (N, C, H, W), kernel_ptr (O, P+1) i32, kernel_channel (K,) i32,
    kernel_values (K, max_taps) f32, filter_order (O,) i32, [bias (O,) f32 in packed order],
    [residual (N, O, Ho, Wo)], out (N, O, Ho, Wo).
    """
    cfg = config or default_config(geom)
    n_img, chans, height, width = geom.batch, geom.in_channels, geom.height, geom.width
    filters, (kh, kw) = geom.out_channels, geom.kernel
    (sh, sw), (pt, pl, _, _) = geom.stride, geom.padding
    out_h, out_w = geom.out_height, geom.out_width
    rows, vec = cfg.rows, cfg.vector
    tiles = math.ceil(out_h / rows)
    wide = math.ceil(out_w / vec) * vec  # padded output width the vector loop covers
    pad_h = (tiles * rows - 1) * sh + kh
    pad_q = wide + (kw - 1) // sw
    num_p = len(patterns)
    taps = [[divmod(t, kw) for t in pat] for pat in patterns]

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tir.noalias": True, "op_pattern": 8})
            data = T.arg("data", T.buffer((n_img, chans, height, width), "float32"))
            kptr = T.arg("kernel_ptr", T.buffer((filters, num_p + 1), "int32"))
            kchan = T.arg("kernel_channel", T.buffer((max(num_kernels, 1),), "int32"))
            kval = T.arg("kernel_values", T.buffer((max(num_kernels, 1), max_taps), "float32"))
            order = T.arg("filter_order", T.buffer((filters,), "int32"))
            bias = T.arg("bias", T.buffer((filters,), "float32")) if epilogue.bias else None
            out_shape = (n_img, filters, out_h, out_w)
            resid = T.arg("residual", T.buffer(out_shape, "float32")) if epilogue.residual else None
            out = T.arg("out", T.buffer(out_shape, "float32"))

            pad = T.alloc_buffer((n_img, chans, sw, pad_h, pad_q), "float32")
            with T.parallel(0, n_img * chans) as nc:
                n, c = nc // chans, nc % chans
                with T.serial(0, pad_h) as y:
                    with T.serial(0, sw) as ph:
                        with T.serial(0, pad_q) as q:
                            src_y, src_x = y - pt, q * sw + ph - pl
                            inside = tvm.tirx.all(
                                src_y >= 0, src_y < height, src_x >= 0, src_x < width
                            )
                            T.buffer_store(
                                pad,
                                tvm.tirx.if_then_else(
                                    inside,
                                    data[n, c, tvm.tirx.min(tvm.tirx.max(src_y, 0), height - 1),
                                         tvm.tirx.min(tvm.tirx.max(src_x, 0), width - 1)],
                                    tvm.tirx.const(0.0, "float32"),
                                ),
                                [n, c, ph, y, q],
                            )

            with T.parallel(0, n_img * tiles * filters) as job:
                n = job // (tiles * filters)
                tile = job % (tiles * filters) // filters
                i = job % filters
                acc = T.alloc_buffer((rows, wide), "float32")  # < 1 KiB: stays on the stack
                with T.unroll(0, rows) as r:
                    with T.unroll(0, wide // vec) as xo:
                        with T.vectorized(0, vec) as xi:
                            T.buffer_store(acc, tvm.tirx.const(0.0, "float32"), [r, xo * vec + xi])
                for p in range(num_p):
                    with T.serial(kptr[i, p], kptr[i, p + 1]) as k:
                        c = T.Bind(kchan[k])
                        w = [T.Bind(kval[k, t]) for t in range(len(taps[p]))]
                        with T.unroll(0, rows) as r:
                            y0 = (tile * rows + r) * sh
                            with T.unroll(0, wide // vec) as xo:
                                with T.vectorized(0, vec) as xi:
                                    x = xo * vec + xi
                                    total = acc[r, x]
                                    for t, (dy, dx) in enumerate(taps[p]):
                                        src = pad[n, c, dx % sw, y0 + dy, x + dx // sw]
                                        total = total + w[t] * src
                                    T.buffer_store(acc, total, [r, x])
                o = T.Bind(order[i])

                def store(y, x):
                    value = acc[y - tile * rows, x]
                    if bias is not None:
                        value = value + bias[i]
                    if resid is not None:
                        value = value + resid[n, o, y, x]
                    if epilogue.activation in ("relu", "relu6"):
                        value = tvm.tirx.max(value, tvm.tirx.const(0.0, "float32"))
                    if epilogue.activation == "relu6":
                        value = tvm.tirx.min(value, tvm.tirx.const(6.0, "float32"))
                    T.buffer_store(out, value, [n, o, y, x])

                with T.serial(0, rows) as r:
                    y = tile * rows + r
                    with T.If(y < out_h):
                        with T.Then():
                            full = out_w // vec
                            if full:
                                with T.serial(0, full) as xo:
                                    with T.vectorized(0, vec) as xi:
                                        store(y, xo * vec + xi)
                            if out_w % vec:
                                with T.serial(full * vec, out_w) as x:
                                    store(y, x)
    # No global symbol: the module that takes the kernel names it (several layers share one).
    return ib.get().without_attr("global_symbol")
