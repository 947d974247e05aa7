"""Max-pool of stride 2 (ResNet's 3x3/2 after the stem): TIR kernel generator.

TVM's legalized pool reads each output vector's inputs with stride-2 (and, at the padding,
predicated) loads. This kernel takes each output row in two passes over contiguous vectors::

    parallel for share h (a contiguous run of the N x C x Ho output rows):
        for row (n, c, oy) of the share:
            line[0 .. pad_left) = line[pad_left + W ..] = -inf
            line[pad_left + x] = max over the input rows oy * 2 - pad_top + dy inside the map
                                 of data[n, c, row, x]                 # vertical, whole vectors
            for each lanes-wide output chunk ox0 (the last one moved back to end at Wo):
                out[n, c, oy, ox0 + k] = max over dx of line[2 * (ox0 + k) + dx]

where ``line[2 * ox0 + dx + 2k]`` (k < lanes) is the even lanes of two contiguous vectors (one
two-source shuffle). The last chunk overlaps the one before it where Wo is not a multiple of
``lanes``: it rewrites the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import allocated_view
from .tunable import SCHEDULED_ATTR


@dataclass(frozen=True)
class PoolGeometry:
    """An NCHW max-pool of stride 2: input (batch, channels, height, width), window ``kernel``,
    ``padding`` (top, left, bottom, right)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    padding: tuple[int, int, int, int]

    @property
    def out_height(self) -> int:
        return (self.height + self.padding[0] + self.padding[2] - self.kernel[0]) // 2 + 1

    @property
    def out_width(self) -> int:
        return (self.width + self.padding[1] + self.padding[3] - self.kernel[1]) // 2 + 1


def pool_unsupported(geom: PoolGeometry, lanes: int) -> str | None:
    """Why the kernel cannot take this pool, or None."""
    (kh, kw), (pt, pl, pb, pr) = geom.kernel, geom.padding
    if geom.width < lanes or geom.out_width < lanes:
        return f"map {geom.height}x{geom.width} narrower than a vector ({lanes} lanes)"
    if max(pt, pb) >= kh or max(pl, pr) >= kw:
        return f"padding {geom.padding} reaches past the {kh}x{kw} window"
    return None


def max_pool2d_primfunc(
    geom: PoolGeometry, lanes: int = 16, shares: int = 2, name: str = "max_pool2d_s2"
) -> tirx.PrimFunc:
    """Arguments: data (N, C, H, W) f32, out (N, C, Ho, Wo) f32."""
    reason = pool_unsupported(geom, lanes)
    if reason is not None:
        raise ValueError(reason)
    n_img, chans, height, width = geom.batch, geom.channels, geom.height, geom.width
    (kh, kw), (pt, pl, _, _) = geom.kernel, geom.padding
    out_h, out_w = geom.out_height, geom.out_width
    # The line holds the padded input row and -inf past it, up to the last chunk's reads.
    line_len = max(pl + width, 2 * out_w + kw) + 2 * lanes
    in_chunks = _chunks(width, lanes)
    out_chunks = _chunks(out_w, lanes)
    rows = n_img * chans * out_h
    shares = max(1, min(shares, rows))
    per_share = math.ceil(rows / shares)
    evens = list(range(0, 2 * lanes, 2))
    lowest = tirx.Broadcast(tirx.const(float("-inf"), "float32"), lanes)

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        # Scheduled already: tuning and TVM's default schedules leave it alone.
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        data = T.arg("data", T.buffer((n_img, chans, height, width), "float32"))
        out = T.arg("out", T.buffer((n_img, chans, out_h, out_w), "float32"))
        # A root block: Relax's RewriteDataflowReshape inspects every one-input call_tir's
        # body for a reshape and requires one (it finds none here).
        with T.sblock("root"), T.parallel(0, shares) as share:
            lo = T.Bind(tvm.tirx.min(share * per_share, rows))
            count = T.Bind(tvm.tirx.min(lo + per_share, rows) - lo)
            with T.serial(0, count) as j:
                row = lo + j
                plane, oy = row // out_h, row % out_h
                n, c = plane // chans, plane % chans
                line = allocated_view((line_len,))
                fills = [*range(0, pl, lanes), *range(pl + width, line_len - lanes + 1, lanes)]
                for at in fills:  # the padding (the left one's overrun rewritten below)
                    T.buffer_store(line, lowest, [tirx.Ramp(at, 1, lanes)])
                first = T.Bind(tvm.tirx.max(oy * 2 - pt, 0))
                end = T.Bind(tvm.tirx.min(oy * 2 - pt + kh, height))
                for x0 in in_chunks:
                    src = tirx.Ramp(x0, 1, lanes)
                    T.buffer_store(line, data[n, c, first, src], [tirx.Ramp(pl + x0, 1, lanes)])
                with T.serial(1, end - first) as dy:
                    for x0 in in_chunks:
                        at = tirx.Ramp(pl + x0, 1, lanes)
                        value = tirx.Max(line[at], data[n, c, first + dy, tirx.Ramp(x0, 1, lanes)])
                        T.buffer_store(line, value, [at])
                for ox0 in out_chunks:
                    taps = []
                    for dx in range(kw):
                        start = 2 * ox0 + dx
                        a = line[tirx.Ramp(start, 1, lanes)]
                        b = line[tirx.Ramp(start + lanes, 1, lanes)]
                        taps.append(tirx.Shuffle([a, b], evens))
                    value = taps[0]
                    for tap in taps[1:]:
                        value = tirx.Max(value, tap)
                    T.buffer_store(out, value, [n, c, oy, tirx.Ramp(ox0, 1, lanes)])
    return ib.get().without_attr("global_symbol")


def _chunks(size: int, lanes: int) -> list[int]:
    """Starts of ``lanes``-wide chunks covering ``size >= lanes`` elements: every ``lanes``-th,
    the last moved back to end at ``size``."""
    starts = list(range(0, size - lanes + 1, lanes))
    if size % lanes:
        starts.append(size - lanes)
    return starts
