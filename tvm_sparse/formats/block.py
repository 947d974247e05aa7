"""Block-sparse weights of FC layers and 1x1 convs: BSR / BCR formats, detection, choice.

A weight is viewed as a matrix ``W (O, I)`` (outputs x inputs): an FC weight as PyTorch stores
it -- the transpose of the ``(K, N)`` constant Relax folds from ``linear`` -- and a 1x1 conv's
OIHW weight as ``(O, I)``. It is cut into ``(r, c)`` blocks (r output rows x c input columns);
edge blocks are zero-padded to the full block.

Why ``r x 1`` blocks (r = 4 / 8 / 16) first: a block of r outputs that share one input column
lets the 1x1 conv kernel load one input row vector (along H*W) and feed r FMAs with it, and lets
the FC kernel do one r-wide vector FMA (along N) per block column with the input broadcast.
``1 x c`` blocks would make both kernels reduce across lanes. ``(4, 4)`` is what
``tvm_sparse.prune`` defaults to; ``(1, 1)`` is plain unstructured sparsity.

Packed layout (``BSRWeight``):

- ``row_order[i]``: block row (outputs ``row_order[i] * r ..``) stored at packed position ``i``.
  Rows are ordered like ``pattern.balanced_filter_order`` so each of ``num_shares`` contiguous
  equal-count shares (one per core) holds about the same number of nonzero blocks.
- ``block_ptr[i] : block_ptr[i + 1]``: the nonzero blocks of packed block row ``i``.
- ``block_col[k]``: block column of block ``k`` (inputs ``block_col[k] * c ..``).
- ``block_values[k, j, i] = W[row * r + i, block_col[k] * c + j]``: column-major inside the
  block, so the r outputs of one input are contiguous (one vector load when r = lanes).

``BCRWeight`` is GRIM's block column-row format (whole rows and columns pruned inside blocks).

The format decision (``choose_block_format``) is made by estimated time from a per-CPU cost table
(``tvm_sparse/cost_tables/<cpu>.json``, written by ``benchmarks/bench_block.py --refresh-costs``):
every candidate block shape's nonzero-block count (BCR: blocks x kept rows x kept columns) times
its measured cost, against the measured cost of what would run otherwise (the dense kernel per
multiply-add, or for a 1x1 conv the pattern kernel per nonzero). No fixed density threshold; a
weight without any zero stays dense.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .pattern import balanced_filter_order
from .sparsity import choose_conv_format, conv_sparsity

Block = tuple[int, int]
# Block shapes the detection tries (each has a kernel and a cost-table entry).
BLOCK_SHAPES: tuple[Block, ...] = ((16, 1), (8, 1), (4, 1), (4, 4), (1, 1))
# BCR block shapes the detection tries: GRIM prunes whole rows / columns inside such blocks.
BCR_SHAPES: tuple[Block, ...] = ((8, 8), (16, 16))
COST_TABLE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "cost_tables")


def as_matrix(weight: np.ndarray) -> np.ndarray:
    """An FC (O, I) or 1x1 conv (O, I, 1, 1) weight as the (O, I) matrix the blocks cut."""
    weight = np.asarray(weight)
    return weight.reshape(weight.shape[0], -1)


def _blocks(mat: np.ndarray, block: Block) -> np.ndarray:
    """(R, C, r, c) zero-padded blocks of ``mat``."""
    r, c = block
    rows, cols = mat.shape
    padded = np.zeros((rows + (-rows % r), cols + (-cols % c)), dtype=mat.dtype)
    padded[:rows, :cols] = mat
    return padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c).transpose(0, 2, 1, 3)


@dataclass(frozen=True)
class BlockSparsity:
    """Block structure of a weight viewed as (O, I), cut into ``block`` = (rows, cols) blocks."""

    shape: tuple[int, int]
    block: tuple[int, int]
    density: float  # nonzero weights / all weights
    block_density: float  # blocks with any nonzero / all blocks (BSR)
    rowcol_density: float  # mean over blocks of (nonzero rows * nonzero cols) / (r * c) (BCR)
    nonzero_blocks: int = field(default=0, compare=False)

    @property
    def fill(self) -> float:
        """Nonzeros / values a BSR packing stores (1.0: no explicit zeros are computed)."""
        r, c = self.block
        return self.density * self.shape[0] * self.shape[1] / max(1, self.nonzero_blocks * r * c)


def block_sparsity(weight: np.ndarray, block: Block = (4, 4)) -> BlockSparsity:
    """Measure the BSR / BCR structure of a weight viewed as (O, -1) at one block shape."""
    mat = as_matrix(weight) != 0
    r, c = block
    if r < 1 or c < 1:
        raise ValueError(f"block shape must be positive, got {block}")
    blocks = _blocks(mat, block)
    nonzero = blocks.any(axis=(2, 3))
    kept_rows = blocks.any(axis=3).sum(axis=2)
    kept_cols = blocks.any(axis=2).sum(axis=2)
    return BlockSparsity(
        shape=(int(mat.shape[0]), int(mat.shape[1])),
        block=(r, c),
        density=float(mat.mean()) if mat.size else 0.0,
        block_density=float(nonzero.mean()) if nonzero.size else 0.0,
        rowcol_density=float((kept_rows * kept_cols).mean() / (r * c)) if nonzero.size else 0.0,
        nonzero_blocks=int(nonzero.sum()),
    )


@dataclass(frozen=True)
class BSRWeight:
    """A weight (O, I) packed as block-sparse rows (see the module docstring for the layout)."""

    shape: tuple[int, int]
    block: Block
    row_order: np.ndarray  # int32 (R,)
    block_ptr: np.ndarray  # int32 (R + 1,)
    block_col: np.ndarray  # int32 (K,)
    block_values: np.ndarray  # float32 (K, c, r)

    @classmethod
    def from_dense(cls, weight: np.ndarray, block: Block, num_shares: int = 1) -> BSRWeight:
        """Pack an FC (O, I) or 1x1 conv (O, I, 1, 1) weight; keeps every block with a nonzero."""
        mat = as_matrix(np.asarray(weight, dtype=np.float32))
        blocks = _blocks(mat, block)
        nonzero = (blocks != 0).any(axis=(2, 3))  # (R, C)
        work = nonzero.sum(axis=1)
        order = balanced_filter_order(work, np.zeros((len(work), 1), np.int64), num_shares)
        counts = work[order]
        ptr = np.zeros(len(order) + 1, dtype=np.int32)
        ptr[1:] = np.cumsum(counts)
        rows, cols = np.nonzero(nonzero[order])  # row-major: packed row, then column
        values = blocks[order[rows], cols].transpose(0, 2, 1)  # (K, c, r)
        return cls(
            shape=(int(mat.shape[0]), int(mat.shape[1])),
            block=(int(block[0]), int(block[1])),
            row_order=order.astype(np.int32),
            block_ptr=ptr,
            block_col=cols.astype(np.int32),
            block_values=np.ascontiguousarray(values, dtype=np.float32),
        )

    def to_dense(self) -> np.ndarray:
        """Unpack to the dense (O, I) matrix (exact round trip)."""
        r, c = self.block
        n_rows, n_cols = math.ceil(self.shape[0] / r), math.ceil(self.shape[1] / c)
        blocks = np.zeros((n_rows, n_cols, r, c), dtype=np.float32)
        packed_row = np.repeat(np.arange(n_rows), np.diff(self.block_ptr))
        blocks[self.row_order[packed_row], self.block_col] = self.block_values.transpose(0, 2, 1)
        mat = blocks.transpose(0, 2, 1, 3).reshape(n_rows * r, n_cols * c)
        return mat[: self.shape[0], : self.shape[1]]

    @property
    def num_blocks(self) -> int:
        return int(self.block_col.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.row_order.shape[0])

    def kernel_args(self) -> list[np.ndarray]:
        """block_ptr, block_col, block_values, row_order (never empty: TVM needs extents >= 1)."""
        r, c = self.block
        cols = self.block_col if self.num_blocks else np.zeros(1, np.int32)
        values = self.block_values if self.num_blocks else np.zeros((1, c, r), np.float32)
        return [self.block_ptr, cols, values, self.row_order]


@dataclass(frozen=True)
class BCRWeight:
    """GRIM's block column-row format: in each (r, c) block only whole rows and columns survive.

    Like ``BSRWeight`` (``row_order``, ``block_ptr``, ``block_col`` over the nonzero blocks), plus
    per block ``row_idx[k] (nr,)`` / ``col_idx[k] (nc,)``: its kept rows and columns inside the
    block, and ``values[k, j, i] = W[row * r + row_idx[k, i], block_col[k] * c + col_idx[k, j]]``
    (the dense ``nr x nc`` sub-block, column-major). ``nr`` / ``nc`` are the most rows / columns
    any block keeps; a block keeping fewer is padded with distinct pruned rows / columns (whose
    values are zeros), so the scatter back is still exact.
    """

    shape: tuple[int, int]
    block: Block
    row_order: np.ndarray  # int32 (R,)
    block_ptr: np.ndarray  # int32 (R + 1,)
    block_col: np.ndarray  # int32 (K,)
    row_idx: np.ndarray  # int32 (K, nr)
    col_idx: np.ndarray  # int32 (K, nc)
    values: np.ndarray  # float32 (K, nc, nr)

    @classmethod
    def from_dense(cls, weight: np.ndarray, block: Block, num_shares: int = 1) -> BCRWeight:
        mat = as_matrix(np.asarray(weight, dtype=np.float32))
        blocks = _blocks(mat, block)  # (R, C, r, c)
        kept_rows = (blocks != 0).any(axis=3)  # (R, C, r)
        kept_cols = (blocks != 0).any(axis=2)  # (R, C, c)
        nonzero = kept_rows.any(axis=2)
        work = nonzero.sum(axis=1)
        order = balanced_filter_order(work, np.zeros((len(work), 1), np.int64), num_shares)
        ptr = np.zeros(len(order) + 1, dtype=np.int32)
        ptr[1:] = np.cumsum(work[order])
        rows, cols = np.nonzero(nonzero[order])
        src_rows = order[rows]
        n_r = max(1, int(kept_rows[nonzero].sum(axis=-1).max(initial=0)))
        n_c = max(1, int(kept_cols[nonzero].sum(axis=-1).max(initial=0)))
        # Kept indices first (ascending), then pruned ones: a permutation, so padding is distinct.
        row_idx = np.argsort(~kept_rows[src_rows, cols], axis=-1, kind="stable")[:, :n_r]
        col_idx = np.argsort(~kept_cols[src_rows, cols], axis=-1, kind="stable")[:, :n_c]
        sub = blocks[src_rows, cols]  # (K, r, c)
        sub = np.take_along_axis(sub, row_idx[:, :, None], axis=1)
        sub = np.take_along_axis(sub, col_idx[:, None, :], axis=2)  # (K, nr, nc)
        return cls(
            shape=(int(mat.shape[0]), int(mat.shape[1])),
            block=(int(block[0]), int(block[1])),
            row_order=order.astype(np.int32),
            block_ptr=ptr,
            block_col=cols.astype(np.int32),
            row_idx=row_idx.astype(np.int32).reshape(-1, n_r),
            col_idx=col_idx.astype(np.int32).reshape(-1, n_c),
            values=np.ascontiguousarray(sub.transpose(0, 2, 1), dtype=np.float32),
        )

    def to_dense(self) -> np.ndarray:
        """Unpack to the dense (O, I) matrix (exact round trip)."""
        r, c = self.block
        n_rows, n_cols = math.ceil(self.shape[0] / r), math.ceil(self.shape[1] / c)
        blocks = np.zeros((n_rows, n_cols, r, c), dtype=np.float32)
        packed_row = np.repeat(np.arange(n_rows), np.diff(self.block_ptr))
        rows, cols = self.row_order[packed_row], self.block_col
        for k in range(self.num_blocks):
            blocks[rows[k], cols[k]][np.ix_(self.row_idx[k], self.col_idx[k])] = self.values[k].T
        mat = blocks.transpose(0, 2, 1, 3).reshape(n_rows * r, n_cols * c)
        return mat[: self.shape[0], : self.shape[1]]

    @property
    def num_blocks(self) -> int:
        return int(self.block_col.shape[0])

    def kernel_args(self) -> list[np.ndarray]:
        """block_ptr, block_col, row_idx, col_idx, values, row_order (never empty)."""
        if self.num_blocks:
            return [self.block_ptr, self.block_col, self.row_idx, self.col_idx, self.values,
                    self.row_order]  # fmt: skip
        (n_r, n_c), one = self.kept, np.zeros(1, np.int32)
        return [self.block_ptr, one, np.zeros((1, n_r), np.int32), np.zeros((1, n_c), np.int32),
                np.zeros((1, n_c, n_r), np.float32), self.row_order]  # fmt: skip

    @property
    def num_rows(self) -> int:
        return int(self.row_order.shape[0])

    @property
    def kept(self) -> tuple[int, int]:
        """(nr, nc): rows and columns computed per block."""
        return int(self.row_idx.shape[1]), int(self.col_idx.shape[1])


# ------------------------------------------------------------------------------ cost model


@dataclass(frozen=True)
class CostTable:
    """Measured kernel costs on one CPU: ``entries[kind] = (overhead_ms, ms_per_unit)``.

    Kinds and their units: ``fc_dense`` multiply-adds; ``fc_bsr_RxC`` nonzero blocks x batch
    rows; ``fc_bcr_RxC`` sub-block multiply-adds (blocks x nr x nc) x batch rows;
    ``conv_dense`` multiply-adds; ``conv_pattern`` nonzero weights x output pixels;
    ``conv_bsr_RxC`` nonzero blocks x output pixels x images; ``conv_bcr_RxC`` sub-block
    multiply-adds x output pixels x images.
    """

    cpu: str
    entries: dict[str, tuple[float, float]]
    source: str = ""

    def estimate(self, kind: str, units: float) -> float | None:
        """Estimated milliseconds for ``units`` of ``kind`` work (None: not in the table)."""
        if kind not in self.entries:
            return None
        overhead, per_unit = self.entries[kind]
        return overhead + per_unit * units

    @classmethod
    def load(cls, path: str) -> CostTable:
        with open(path) as f:
            data = json.load(f)
        entries = {k: (float(v["overhead_ms"]), float(v["ms_per_unit"])) for k, v in
                   data["entries"].items()}  # fmt: skip
        return cls(cpu=data.get("cpu", "?"), entries=entries, source=path)


def cost_table_path(cpu: str) -> str:
    return os.path.join(COST_TABLE_DIR, f"{cpu or 'generic'}.json")


def pack_block_weight(weight: np.ndarray, fmt: str, block: Block, num_shares: int = 1):
    """``BSRWeight`` or ``BCRWeight`` (``fmt`` "bsr" / "bcr") and its (nr, nc) (None for BSR)."""
    if fmt == "bcr":
        packed = BCRWeight.from_dense(weight, block, num_shares)
        return packed, packed.kept
    return BSRWeight.from_dense(weight, block, num_shares), None


def load_cost_table(cpu: str = "", family: str = "") -> CostTable:
    """The table measured on ``cpu`` (LLVM CPU name), else the one of its ISA ``family``
    ("avx512", "avx2"; "neon" falls back to "avx2": no NEON CPU measured), else the first table
    shipped."""
    names = [cpu, family] + (["avx2"] if family == "neon" else [])
    for name in filter(None, names):
        if os.path.exists(cost_table_path(name)):
            return CostTable.load(cost_table_path(name))
    shipped = sorted(f for f in os.listdir(COST_TABLE_DIR) if f.endswith(".json")) if \
        os.path.isdir(COST_TABLE_DIR) else []  # fmt: skip
    if not shipped:
        return CostTable(cpu="none", entries={}, source="")
    return CostTable.load(os.path.join(COST_TABLE_DIR, shipped[0]))


@dataclass(frozen=True)
class BlockChoice:
    """What a layer becomes: ``format`` "bsr", "bcr" or the fallback ("dense" / "pattern")."""

    format: str
    block: Block | None
    stats: BlockSparsity | None
    estimates: dict[str, float]  # candidate ("dense", "bsr 8x1", ...) -> estimated ms
    reason: str


def _kind_name(block: Block) -> str:
    return f"{block[0]}x{block[1]}"


def bcr_work(weight: np.ndarray, block: Block) -> tuple[int, int, int]:
    """(nonzero blocks, nr, nc) of the ``BCRWeight`` packing: it computes nb x nr x nc MACs."""
    blocks = _blocks(as_matrix(weight) != 0, block)
    rows, cols = blocks.any(axis=3).sum(axis=2), blocks.any(axis=2).sum(axis=2)
    return int((rows > 0).sum()), int(rows.max(initial=0)), int(cols.max(initial=0))


# Above this fraction of nonzero weights no block kernel is tried: every block would be kept
# and computed at a fraction of the dense GEMM's speed (a 1024x512 1x1 conv with one zero weight
# went BSR 8x1 by a cost-table estimate of the pattern kernel's dense path: 1.8 vs 0.9 ms).
MOSTLY_DENSE = 0.7


def choose_block_format(
    weight: np.ndarray,
    costs: CostTable,
    op: str,
    work: int,
    fallback: str = "dense",
    fallback_units: float | None = None,
    blocks: tuple[Block, ...] = BLOCK_SHAPES,
    bcr_blocks: tuple[Block, ...] = BCR_SHAPES,
    margin: float = 1.0,
) -> BlockChoice:
    """Pick BSR / BCR (and the block shape) or the fallback for an FC / 1x1 conv weight, by cost.

    ``op`` is "fc", "linear" or "conv"; ``work`` the batch rows (fc, linear) or output pixels x
    images (conv) every block is applied to. ``fallback`` is what runs otherwise ("dense", or
    "pattern" for a 1x1 conv that RewriteConv2D would run on its pattern kernel) and
    ``fallback_units`` its cost-table units (default: dense multiply-adds). A block format must
    be estimated ``margin`` times faster than the fallback to be chosen.
    """
    mat = as_matrix(weight)
    if mat.all():  # a block kernel would compute every block: that is the dense kernel's job
        return BlockChoice(fallback, None, None, {}, "no zero weights: no block format")
    nonzero = np.count_nonzero(mat) / mat.size
    if nonzero > MOSTLY_DENSE:
        reason = f"{nonzero:.0%} nonzero: no block format"
        return BlockChoice(fallback, None, None, {}, reason)
    macs = mat.shape[0] * mat.shape[1] * work
    units = fallback_units if fallback_units is not None else macs
    fb_ms = costs.estimate(f"{op}_{fallback}", units)
    estimates: dict[str, float] = {}
    if fb_ms is not None:
        estimates[fallback] = fb_ms
    best: tuple[float, str, Block, BlockSparsity, str] | None = None
    # A kernel's least work (every block it keeps full) bounds its estimate from below: a
    # candidate whose bound loses to the fallback is not scanned (seconds on a VGG FC weight).
    nonzeros = int(np.count_nonzero(mat))
    skipped: list[tuple[float, str]] = []  # (lower bound ms, name) of candidates not scanned

    def hopeless(kind: str, least_units: int, name: str) -> bool:
        least = costs.estimate(kind, least_units * work)
        if fb_ms is not None and least * margin >= fb_ms:
            skipped.append((least, name))
            return True
        return False

    for block in blocks:
        kind = f"{op}_bsr_{_kind_name(block)}"
        if kind not in costs.entries:
            continue
        if hopeless(kind, -(-nonzeros // (block[0] * block[1])), f"bsr {_kind_name(block)}"):
            continue
        stats = block_sparsity(mat, block)
        ms = costs.estimate(kind, stats.nonzero_blocks * work)
        estimates[f"bsr {_kind_name(block)}"] = ms
        if best is None or ms < best[0]:
            best = (ms, "bsr", block, stats, f"{stats.block_density:.0%} of blocks")
    for block in bcr_blocks:
        kind = f"{op}_bcr_{_kind_name(block)}"
        if kind not in costs.entries:
            continue
        if hopeless(kind, nonzeros, f"bcr {_kind_name(block)}"):  # nb * nr * nc >= nonzeros
            continue
        n_blocks, n_r, n_c = bcr_work(mat, block)
        ms = costs.estimate(kind, n_blocks * n_r * n_c * work)
        estimates[f"bcr {_kind_name(block)}"] = ms
        if best is None or ms < best[0]:
            stats = block_sparsity(mat, block)
            what = f"{n_r}x{n_c} of each block, {stats.block_density:.0%} of blocks"
            best = (ms, "bcr", block, stats, what)
    if best is None and skipped:
        least, name = min(skipped)
        density = nonzeros / max(1, mat.size)
        reason = f"{fallback} by cost: est {fb_ms:.3g} ms vs {name} >= {least:.3g} ms"
        needs = f", needs {margin:g}x" if margin != 1.0 else ""
        return BlockChoice(
            fallback, None, None, estimates, f"{reason} ({density:.0%} nonzero{needs})"
        )
    if best is None:
        return BlockChoice(fallback, None, None, estimates, f"no cost table for {op} block kernels")
    ms, fmt, block, stats, what = best
    name = f"{fmt} {_kind_name(block)}"
    if fb_ms is not None and fb_ms <= ms * margin:
        needs = f", needs {margin:g}x" if margin != 1.0 else ""
        reason = f"{fallback} by cost: est {fb_ms:.3g} ms vs {name} {ms:.3g} ms ({what}{needs})"
        return BlockChoice(fallback, None, stats, estimates, reason)
    versus = f" vs {fallback} {fb_ms:.3g} ms" if fb_ms is not None else ""
    return BlockChoice(fmt, block, stats, estimates, f"{name}: {what}, est {ms:.3g} ms{versus}")


def choose_conv1x1_format(
    weight: np.ndarray, work: int, costs: CostTable
) -> tuple[BlockChoice, str, str]:
    """The decision for a 1x1 conv (OIHW ``weight``, ``work`` = images x output pixels): the
    block choice against what RewriteConv2D would run instead (its pattern kernel or its dense
    kernel), and the (format, reason) the compile report shows for the layer."""
    fmt, reason = choose_conv_format(conv_sparsity(weight))
    units = int((np.asarray(weight) != 0).sum()) * work if fmt == "pattern" else None
    choice = choose_block_format(weight, costs, "conv", work, fmt, units)
    if choice.format in ("bsr", "bcr"):
        return choice, choice.format, choice.reason
    return choice, fmt, f"{choice.reason}; {reason}"
