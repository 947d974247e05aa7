"""Geometry of the filters-in-lanes kernel's tiles: the input pixels a tile reads and the
accumulations each feeds, the cache lines to prefetch, the tiles clear of the padding, and
the widths tile rows are stored at. Plain integer math, shared with
``tvm_sparse.kernel_bounds``."""

from __future__ import annotations

from ..geometry import ConvGeometry


def tile_readers(geom: ConvGeometry, patterns, rows: int, cols: int) -> list[list]:
    """Per pattern, each input pixel (row, column offset in the input window) a ``rows x
    cols`` tile reads, and the (row, column, tap) accumulations that read it."""
    (_, kw), (sh, sw) = geom.kernel, geom.stride
    readers = []
    for pattern in patterns:
        pixels: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for t, tap in enumerate(pattern):
            dy, dx = divmod(tap, kw)
            for r in range(rows):
                for x in range(cols):
                    pixels.setdefault((r * sh + dy, x * sw + dx), []).append((r, x, t))
        readers.append(sorted(pixels.items()))
    return readers


def lines_read(
    reach: int, span: int, pitch: int, skipped=frozenset(), skipped_rows=frozenset()
) -> list[tuple[int, int]]:
    """(row, column) offsets touching each cache line of a tile's input window (``reach``
    rows ``pitch`` elements apart, of ``span`` columns; columns ``skipped`` and rows
    ``skipped_rows`` not read): the
    first and last element of each run of elements read with gaps under a line (16), and
    every 16th between. Rows narrower than a line share lines: 6 prefetches, not 10 (two a
    row), for the 5 rows of 14 a stride-2 tile reads on a 14-wide map (1.03x there, 1.01x
    on 7x7 maps, others the same: A/B on the AVX-512 VM). A point between rows comes back as
    the (row, column) of the same address (``divmod`` by ``pitch``)."""
    read = [dx for dx in range(span) if dx not in skipped]
    offsets = [dy * pitch + dx for dy in range(reach) if dy not in skipped_rows for dx in read]
    points: list[int] = []
    start = 0
    for i, at in enumerate(offsets):
        if i + 1 == len(offsets) or offsets[i + 1] - at >= 16:  # a run ends at ``at``
            points += [*range(offsets[start], at, 16), at]
            start = i + 1
    return [divmod(at, pitch) for at in points]


def row_width(pixels: int) -> int:
    """The lanes a filter's row of ``pixels`` takes in the ``transposed`` vectors: the next
    power of two."""
    return 1 << max(0, (pixels - 1).bit_length())


def overlap_width(cols: int, tiles_x: int, per_share: int) -> int:
    """The width to store a tile's rows at: ``cols`` rounded up to a power of two (the width of
    a filter's row in the ``transposed`` vectors) where each share's jobs hold whole runs of
    column tiles (``per_share`` a multiple of ``tiles_x``: the tile after this one is the
    same core's next job and rewrites the extra pixels), else ``cols``. The last column tile
    of a row keeps ``cols`` (its extra pixels would land in the next output row).

    A filter's row of 7 pixels is one 8-wide store (after an extract for the upper half of a
    vector) instead of LLVM's 4 + 2 + 1 stores and the extracts and shuffles between them:
    ``[no kernels]`` 0.0124 -> 0.0106 ms, the whole kernel 1.03-1.05x on ResNet-18's stride-2
    layer on 56x56 (28x28 output: 3 of its 4 column tiles), 1.01-1.04x on its 28- and 14-wide
    layers (A/B on the AVX-512 VM, two runs)."""
    padded = row_width(cols)
    return padded if tiles_x > 1 and per_share % tiles_x == 0 else cols


def inside_tiles(step: int, reach: int, before: int, size: int, count: int) -> range:
    """Of ``count`` tiles ``step`` input positions apart, tile t reading ``reach`` from
    ``t * step - before``: those whose reads stay within the input's ``size`` (no padding)."""
    lo = min(count, -(-before // step))
    hi = min(count, (size + before - reach) // step + 1)
    return range(lo, max(lo, hi))
