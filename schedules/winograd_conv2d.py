"""Dense 3x3 stride-1 conv as Winograd F(2x2, 3x3): TIR kernel generators.

Each 2x2 block of output pixels ("tile", ``winograd_tiles`` of them per image) is
``A^T [(G g G^T) * (B^T d B)] A`` over its 4x4 input patch d, summed over the input channels
(Lavin & Gray 2016). The 16 products per tile and channel pair are 16 independent matrix
products, one per position xi of the 4x4 transformed patch:
``M[xi] (O x tiles) = U[xi] (O x C) @ V[xi] (C x tiles)``: 2.25x fewer multiply-adds than the
direct conv, at the price of the transforms and of a weight 16/9 as large.

Three kernels, run one after another (``relay_passes.pattern_conv2d`` emits the three calls):

- ``winograd_input_primfunc``: data (N, C, H, W) -> V (N * 16, C, tiles_h, tiles_w), image
  ``n * 16 + xi``; each patch row gathered from the input row's vectors by shuffles
  (``gather_columns``: the patches overlap by 2 columns), a tile row of one channel at a time
  in the lanes;
- the batched GEMM: ``dense_gemm``'s 1x1 conv GEMM over the N * 16 "images" of C channels x
  tiles pixels, with 16 weights (``weights=16``: image i takes U[i % 16]): its tile, K passes,
  unroll and prefetch as for a 1x1 conv on a map of that many pixels;
- ``winograd_output_primfunc``: M -> out (N, O, OH, OW) with the epilogue (bias, residual,
  activation); each tile row's two output rows interleaved from contiguous loads of M.

The weight transform ``U = G g G^T`` runs at compile time (``pack_winograd_weight``), in
float64. F(2x2, 3x3)'s transforms have small constants (0, +-1, +-1/2): the result differs
from the direct conv by float32 rounding of a few more additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows
from .dense_gemm import (
    GemmConfig,
    conv1x1_gemm_config,
    conv1x1_gemm_template,
    pack_rows,
    store_channel_row,
)
from .epilogue import Epilogue
from .geometry import ConvGeometry
from .pattern_conv2d.staging import gather_columns
from .tunable import SCHEDULED_ATTR
from .vector_math import span, splat

POSITIONS = 16  # xi: the 4 x 4 transformed patch of F(2x2, 3x3)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


@dataclass(frozen=True)
class WinogradConfig:
    """The batched GEMM's configuration (``dense_gemm.conv1x1_gemm_config`` for a map of
    ``winograd_tiles`` pixels and C input channels) and the transforms' vector lanes."""

    gemm: GemmConfig
    lanes: int


def winograd_fits(geom: ConvGeometry) -> bool:
    """Whether the conv is one F(2x2, 3x3) computes: a 3x3 kernel at stride 1."""
    return geom.kernel == (3, 3) and geom.stride == (1, 1)


# Where F(2x2, 3x3) beats the direct kernels (``winograd_pays``): AMD EPYC Zen 3 (AVX2 only),
# 2 threads, conv + bias + ReLU alone through the VM, 7 interleaved rounds, against the AVX2
# build's direct kernel (flat rows / filters in lanes) and ONNX Runtime:
#   256x256 on 14x14 1.02 vs 2.00 ms (ORT 1.98), 512x512 on 7x7 1.83 vs 2.45 (2.53),
#   128x128 on 28x28 1.13 vs 1.82 (2.13), 64x64 on 56x56 1.45 vs 1.94 (2.03), 128x128 on 56x56
#   4.56 vs 7.22 (7.18), 48x48 on 28x28 0.45 vs 0.70, 256x256 on 7x7 0.34 vs 0.45,
#   64x64 on 14x14 0.111 vs 0.123; even: 128x128 on 7x7 0.113 vs 0.113, 64x64 on 112x112 7.30
#   vs 7.05 (V and M 26 MB); slower: 32x32 on 56x56 0.48 vs 0.44, 32x64 on 28x28 0.31 vs 0.24,
#   16x16 on 112x112 0.80 vs 0.55, 64x64 on 8x8 0.059 vs 0.037.
WINOGRAD_MIN_CHANNELS = 48  # input and output channels: the transforms' share grows as 1 / C
WINOGRAD_MIN_WORK = 1 << 17  # C * O * tiles: below it three calls cost more than they save
WINOGRAD_MAX_BYTES = 16 << 20  # V and M together: past it their traffic leaves the caches


def winograd_pays(geom: ConvGeometry) -> bool:
    """Whether F(2x2, 3x3) beats the direct kernels on the conv (measured above)."""
    c, o, tiles = geom.in_channels, geom.out_channels, math.prod(winograd_tiles(geom))
    scratch = 4 * POSITIONS * geom.batch * tiles * (c + o)
    return (
        min(c, o) >= WINOGRAD_MIN_CHANNELS
        and c * o * tiles >= WINOGRAD_MIN_WORK
        and scratch <= WINOGRAD_MAX_BYTES
    )


def winograd_tiles(geom: ConvGeometry) -> tuple[int, int]:
    """The 2x2 output tiles down and across (a last half tile where the output is odd)."""
    return math.ceil(geom.out_height / 2), math.ceil(geom.out_width / 2)


def default_winograd_config(geom: ConvGeometry, lanes: int, registers: int) -> WinogradConfig:
    """The 1x1 conv GEMM's configuration for a map of the tiles' count."""
    pixels = math.prod(winograd_tiles(geom))
    return WinogradConfig(conv1x1_gemm_config(lanes, registers, pixels, geom.in_channels), lanes)


def pack_winograd_weight(weight: np.ndarray, rows: int) -> np.ndarray:
    """(O, C, 3, 3) -> U = G g G^T as 16 ``pack_rows`` weights one after another:
    (16 * ceil(O / rows), C, rows), position xi = 4 * a + b the xi-th."""
    transformed = np.einsum("ai,ocij,bj->aboc", _G, np.asarray(weight, "float64"), _G)
    o, c = weight.shape[:2]
    packed = [pack_rows(u.astype("float32"), rows) for u in transformed.reshape(POSITIONS, o, c)]
    return np.ascontiguousarray(np.concatenate(packed))


def _tile_chunks(tiles_w: int, lanes: int) -> list[tuple[int, int]]:
    """A tile row as (first tile, count) vectors of at most ``lanes`` tiles."""
    return [(t, min(lanes, tiles_w - t)) for t in range(0, tiles_w, lanes)]


def winograd_input_primfunc(geom: ConvGeometry, lanes: int, name: str) -> tirx.PrimFunc:
    """Arguments: data (N, C, H, W), V (N * 16, C, tiles_h, tiles_w) = B^T d B of each tile's
    4x4 input patch d (0 past the borders), ``B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
    [0, -1, 1, 0], [0, 1, 0, -1]]``."""
    n_img, chans, height, width = geom.batch, geom.in_channels, geom.height, geom.width
    top, left = geom.padding[0], geom.padding[1]
    tiles_h, tiles_w = winograd_tiles(geom)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        data = T.arg("data", T.buffer((n_img, chans, height, width), "float32"))
        v = T.arg("V", T.buffer((n_img * POSITIONS, chans, tiles_h, tiles_w), "float32"))
        # A root block: Relax's RewriteDataflowReshape inspects every one-input call_tir's
        # body for a reshape and requires one (``max_pool2d`` too).
        with T.sblock("root"), T.parallel(0, n_img * chans) as job, T.serial(0, tiles_h) as ty:
            n, c = job // chans, job % chans
            for tx0, count in _tile_chunks(tiles_w, lanes):
                cols = [[2 * (tx0 + t) + j - left for t in range(count)] for j in range(4)]
                zero = splat(tirx.const(0.0, "float32"), count)
                rows = accumulator_rows(POSITIONS, count)  # B^T d, row a column j at 4a + j
                for j in range(4):
                    d = []
                    for i in range(4):
                        y = 2 * ty + i - top
                        row = (n, c, tirx.max(tirx.min(y, height - 1), 0))
                        patch = gather_columns(data, row, cols[j], width, lanes)
                        d.append(tirx.Select(tirx.all(y >= 0, y < height), patch, zero))
                    for a, value in enumerate(_transform_b(d)):
                        T.buffer_store(rows[4 * a + j], value, [span(0, count)])
                for a in range(4):
                    t = [rows[4 * a + j][span(0, count)] for j in range(4)]
                    for b, value in enumerate(_transform_b(t)):
                        at = (n * POSITIONS + 4 * a + b, c, ty, span(tx0, count))
                        T.buffer_store(v, value, list(at))
    return ib.get().without_attr("global_symbol")


def _transform_b(d: list[tirx.PrimExpr]) -> list[tirx.PrimExpr]:
    """B^T applied to four values (a patch column or row)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _transform_a(m: list[tirx.PrimExpr]) -> list[tirx.PrimExpr]:
    """A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] applied to four values."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_output_primfunc(
    geom: ConvGeometry, epilogue: Epilogue, lanes: int, name: str
) -> tirx.PrimFunc:
    """Arguments: M (N * 16, O, tiles_h, tiles_w), [bias (O,)], [residual (N, O, OH, OW)],
    out (N, O, OH, OW) = the epilogue of A^T m A for each tile's 16 values m; a tile row's
    two output rows, their even and odd columns interleaved."""
    n_img, filters = geom.batch, geom.out_channels
    out_h, out_w = geom.out_height, geom.out_width
    tiles_h, tiles_w = winograd_tiles(geom)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        m = T.arg("M", T.buffer((n_img * POSITIONS, filters, tiles_h, tiles_w), "float32"))
        out_shape = (n_img, filters, out_h, out_w)
        bias, resid = epilogue.declare_args((filters,), out_shape)
        out = T.arg("out", T.buffer(out_shape, "float32"))
        with T.parallel(0, n_img * filters) as job, T.serial(0, tiles_h) as ty:
            n, o = job // filters, job % filters
            for tx0, count in _tile_chunks(tiles_w, lanes):
                rows = accumulator_rows(8, count)  # A^T m, row r column b at 4r + b
                for b in range(4):
                    at = [(n * POSITIONS + 4 * a + b, o, ty, span(tx0, count)) for a in range(4)]
                    for r, value in enumerate(_transform_a([m[i] for i in at])):
                        T.buffer_store(rows[4 * r + b], value, [span(0, count)])
                x0, kept = 2 * tx0, min(2 * count, out_w - 2 * tx0)
                for r in range(2):
                    pair = _transform_a([rows[4 * r + b][span(0, count)] for b in range(4)])
                    interleaved = [t // 2 + count * (t % 2) for t in range(kept)]
                    value = pair[0] if kept == 1 else tirx.Shuffle(pair, interleaved)
                    y = 2 * ty + r
                    at = (n, o, y, span(x0, kept))
                    if out_h % 2 and r == 1:
                        with T.If(y < out_h), T.Then():
                            store_channel_row(out, at, value, epilogue, (bias, resid), filters)
                    else:
                        store_channel_row(out, at, value, epilogue, (bias, resid), filters)
    return ib.get().without_attr("global_symbol")


def winograd_gemm_template(
    geom: ConvGeometry, cfg: WinogradConfig, cores: int, name: str
) -> tirx.PrimFunc:
    """The batched GEMM (V -> M) as the 1x1 conv GEMM's MetaSchedule template: N * 16 images
    of the tiles' map, 16 weights; tuning counts the direct conv's FLOPs for it (the useful
    work: the transforms are final kernels, no tasks)."""
    o, c = geom.out_channels, geom.in_channels
    direct = 2 * geom.batch * o * c * 9 * geom.out_height * geom.out_width
    return conv1x1_gemm_template(
        geom.batch * POSITIONS, c, o, winograd_tiles(geom), Epilogue(), cfg.gemm, cores, name,
        weights=POSITIONS, useful_flops=direct,
    )  # fmt: skip


__all__ = [
    "POSITIONS",
    "WinogradConfig",
    "default_winograd_config",
    "pack_winograd_weight",
    "winograd_fits",
    "winograd_gemm_template",
    "winograd_input_primfunc",
    "winograd_pays",
    "winograd_output_primfunc",
    "winograd_tiles",
]
