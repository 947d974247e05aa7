"""Where a conv GEMM's register tiles read B (``dense_gemm.conv1x1_gemm_primfunc``): in place,
through a panel the job's first row tile fills, or through a panel gathered from the input map
(a strided 1x1 conv, or a k x k conv as an implicit GEMM over its windows). TIR building
blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .buffers import STACK_BYTES, allocated_view
from .vector_math import span

CACHE_LINE = 64  # bytes; a map row of whole lines is read in place (see b_source)

VectorAt = Callable[["tirx.PrimExpr", int, int], "tirx.PrimExpr"]  # (k, column offset, width) -> B


class Window(NamedTuple):
    """What column ``p`` (an output pixel) of a conv GEMM's B reads of the input map: tap
    ``(ky, kx)`` of the ``kernel`` is input row ``p // out_w * stride + ky - top``, column
    ``p % out_w * stride + kx - left`` (zero outside the map); B's row ``c * taps + tap``."""

    stride: int
    out_w: int
    in_dims: tuple[int, int]
    kernel: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # top, left

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]


def gathers(stride: int, kernel: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether a conv GEMM's B is gathered from the input map (a ``Window``): a strided, k x k
    or padded conv; a plain 1x1 conv's B is its input."""
    return stride > 1 or tuple(kernel) != (1, 1) or any(padding)


def vector_offsets(widths: tuple[int, ...]) -> list[int]:
    """Where each vector of a tile's columns starts."""
    return [sum(widths[:i]) for i in range(len(widths))]


def b_source(
    x: tirx.Buffer,
    n: tirx.PrimExpr,
    start: tirx.PrimExpr,
    widths: tuple[int, ...],
    depth: int,
    window: Window | None = None,
    k0: tirx.PrimExpr | int = 0,
    panel: tirx.Buffer | None = None,
) -> tuple[VectorAt, Callable[[tirx.PrimExpr], None] | None]:
    """Where a job's tiles read B, the columns ``[start, start + sum(widths))`` of ``x[n]``'s
    ``depth`` rows from ``k0`` on, as ``b_at(k, offset, width)`` (k from 0); and ``fill(k)``,
    what the job's first row tile also does at each k (None: nothing):

    - ``window``: the columns are output pixels of a strided or k x k conv, gathered from the
      input map (``x`` its flat (C, H*W) view) into a contiguous panel before the tiles
      (``gathered_panel``);
    - a map whose rows are whole cache lines (56x56, 28x28, 112x112): read in place, every
      vector load aligned;
    - any other (14x14, 7x7): the loads in place would split cache lines. The first row tile
      copies each k's vectors into a contiguous panel as it loads them, the copy's loads
      overlapping its FMAs; the other row tiles read the panel.

    AMD Zen 5, 2 threads, alone, against a panel copied before the tiles: in place 64x256 /
    24x144 / 64x64 on 56x56 and 96x16 on 112x112 1.05-1.24x (AVX2 build 1.04-1.09x), 28x28
    1.00-1.05x; filled by the first tile 96x384 / 64x384 on 14x14 1.09-1.14x, K = 1024 on
    14x14 and 7x7 1.00-1.02x (read in place there: 0.94-0.95x). Whole ResNet-50 / MobileNetV2:
    within the 2-4 % by which two compiles of the same model differ.

    A GEMM that passes over K in blocks (``GemmConfig.k_block``) gives each pass's ``panel``
    (``depth`` x the columns, allocated once for all passes) and always reads through it: the
    pass's rows of B stay in L1 while its row tiles run (``gemm_k_block``)."""
    fill = None
    if window is not None:
        panel = gathered_panel(x, n, start, sum(widths), depth, window, k0, panel)
    elif panel is None and int(x.shape[-1]) * 4 % CACHE_LINE == 0:  # rows of whole lines
        return (lambda kk, off, w: x[n, kk, span(start + off, w)]), None
    else:
        panel = panel if panel is not None else allocated_view((depth, sum(widths)))

        def fill(kk: tirx.PrimExpr) -> None:
            for off, w in zip(vector_offsets(widths), widths, strict=True):
                T.buffer_store(panel, x[n, k0 + kk, span(start + off, w)], [kk, span(off, w)])

    return (lambda kk, off, w: panel[kk, span(off, w)]), fill


def gathered_panel(
    x: tirx.Buffer,
    n: tirx.PrimExpr,
    start: tirx.PrimExpr,
    columns: int,
    depth: int,
    window: Window,
    k0: tirx.PrimExpr | int,
    panel: tirx.Buffer | None,
) -> tirx.Buffer:
    """B's rows ``k0 .. k0 + depth`` (whole channels of ``window.taps`` rows) at the output
    pixels ``start .. start + columns``, gathered from ``x[n]`` (flat (C, H*W)) into ``panel``
    (a new one where None). Per group of columns, each pixel's input offset per tap is computed
    once, with a mask that zeroes the padding's (its offset clamped to 0): then a scalar copy
    per element, its bits masked (no branch: LLVM makes a select of a load one, which
    mispredicts at the map's edges).

    A group's tables stay under ``STACK_BYTES`` each: a larger one goes to the workspace heap,
    and TVM's storage rewrite then reuses its memory for the tile's accumulator rows once the
    gather is done, which LLVM can no longer keep in registers (every FMA a load and a store:
    ResNet-50's 128x128 stride-2 3x3 on 56x56, its last tile's 9 x 40 tables, 4.4 ms against
    1.8 ms for the same GEMM on an im2col'd input)."""
    stride, out_w, (in_h, in_w), (kh, kw), (top, left) = window
    taps = window.taps  # ``depth`` whole channels: checked by the GEMM (``k_block``)
    panel = panel if panel is not None else allocated_view((depth, columns))
    padded = top > 0 or left > 0 or kh > 1 or kw > 1
    group = min(columns, max(1, (STACK_BYTES - 1) // (4 * taps)))  # columns per table
    at = allocated_view((taps, group), "int32")
    keep = allocated_view((taps, group), "int32") if padded else None
    for first in range(0, columns, group):
        width = min(group, columns - first)
        for j in range(width):
            p = start + first + j
            y0, x0 = p // out_w * stride - top, p % out_w * stride - left
            for tap in range(taps):
                y, x_ = y0 + tap // kw, x0 + tap % kw
                offset = y * in_w + x_
                if padded:
                    inside = tirx.all(y >= 0, y < in_h, x_ >= 0, x_ < in_w)
                    T.buffer_store(at, tirx.Select(inside, offset, 0), [tap, j])
                    T.buffer_store(keep, tirx.Select(inside, -1, 0), [tap, j])
                else:
                    T.buffer_store(at, offset, [tap, j])
        with T.serial(0, depth // taps) as ci:
            c = k0 // taps + ci
            for tap in range(taps):
                for j in range(width):
                    value = x[n, c, at[tap, j]]
                    if padded:  # zero in the padding, without a branch: the bits masked
                        bits = tirx.reinterpret("int32", value) & keep[tap, j]
                        value = tirx.reinterpret("float32", bits)
                    T.buffer_store(panel, value, [ci * taps + tap, first + j])
    return panel
