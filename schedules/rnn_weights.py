"""The recurrent weight ``W_hh`` of a layer direction, packed for the recurrence kernel.

Two formats, chosen from the weight (``pack_recurrent``):

- dense: per phase (tiles, H, phase gates, width), k-major per tile of hidden units, so each
  k of the step's matvec reads one contiguous run of gates x tile width;
- block-sparse (BSR): blocks of ``units`` hidden units (one gate) x ``cols`` consecutive
  columns; a block row is one gate's ``units``-unit slice of a tile, rows ordered (tile, gate,
  slice), so a tile's blocks are contiguous and a job streams them in order. Per phase:
  ``block_ptr`` (rows + 1,) int32, ``block_col`` (blocks,) int32 (first column of the block),
  ``block_values`` (blocks, cols, units) float32 (``[b, j, u] = W[unit u, col + j]``). Blocks
  that are all zero are not stored; the tile's units (and the gate epilogue) stay fused.

The choice is by estimated time per step (``RECURRENT_COSTS``): the dense kernel's multiply-
adds at the rate of the cache level ``W_hh`` fits in, against every block shape's stored
block columns. A weight without zero blocks stays dense; an all-zero one packs no block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .rnn_geometry import RecurrentConfig, RecurrentGeometry, hidden_padded, phase_gates

Block = tuple[int, int]  # (hidden units, columns)
BLOCK_SHAPES: tuple[Block, ...] = ((16, 8), (8, 8), (16, 1), (8, 1))


@dataclass(frozen=True)
class RecurrentCosts:
    """ns per step of the recurrence kernel's matvec, 2 threads (see ``RECURRENT_COSTS``)."""

    dense_mac: tuple[tuple[int, float], ...]  # (weight bytes up to, ns per multiply-add)
    dense_mac_memory: float  # ns per multiply-add, a weight larger than every cache level
    block_column: dict[Block, float]  # ns per stored column of a block, blocks within L2
    beyond_l2: float  # the factor on ``block_column`` when the stored blocks are not
    l2_bytes: int
    max_density: float  # no block format above this fraction of stored weights

    def dense(self, macs: int) -> float:
        per = next((ns for size, ns in self.dense_mac if 4 * macs <= size), self.dense_mac_memory)
        return macs * per

    def sparse(self, blocks: int, block: Block) -> float:
        stored = blocks * block[0] * block[1]
        factor = self.beyond_l2 if 4 * stored > self.l2_bytes else 1.0
        return blocks * block[1] * self.block_column[block] * factor


# Measured on AMD EPYC Zen 5 (AVX-512, 1 MB L2 per core, 32 MB L3, 2 threads), GRU, 100
# steps, batch 1, tile of 64 units, kernel alone; a step's gate math and barrier (~0.5 us at
# H=256, ~2.2 us at H=1024) paid by both formats left out. Dense: 0.0134 ns per multiply-add
# at H=256 (0.6 MB), 0.0187 at H=1024 (12.6 MB, from L3); Intel Xeon's 54 GB/s from memory is
# 0.074. Block-sparse at H=1024, per stored column of a block: 8x8 0.13 ns at 10 % of the
# blocks (1.3 MB, in L2), 0.185 from 30 % to 90 % (L3); 8x1 0.165, 16x1 0.18 at 10 %; 16x8
# 0.27 (2.4 MB). 8x8 blocks against dense, a step: H=1024 50.9 vs 58.9 us at 70 % stored,
# 65.5 at 90 %; H=256 2.4 vs 3.2 us at 50 %, 3.6 at 80 %: the crossover is ~60-80 %.
RECURRENT_COSTS = RecurrentCosts(
    dense_mac=((2 << 20, 0.0134), (32 << 20, 0.0187)),
    dense_mac_memory=0.074,
    block_column={(8, 8): 0.13, (16, 8): 0.19, (8, 1): 0.165, (16, 1): 0.18},
    beyond_l2=1.4,
    l2_bytes=2 << 20,
    max_density=0.75,
)


@dataclass(frozen=True)
class BlockLayout:
    """A block-sparse ``W_hh``: the block shape and the stored blocks of each phase."""

    block: Block
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class PackedRecurrent:
    """``W_hh`` packed for the kernel: ``arrays`` are its arguments, in order."""

    layout: BlockLayout | None  # None: dense
    density: float  # stored weights (zero-padded blocks included) / gates * H * H
    arrays: tuple[np.ndarray, ...]

    @property
    def format(self) -> str:
        """``"dense"`` or ``"bsr 8x8"`` (units x columns per block)."""
        if self.layout is None:
            return "dense"
        return f"bsr {self.layout.block[0]}x{self.layout.block[1]}"


def _per_gate(weight: np.ndarray, geom: RecurrentGeometry, h_pad: int, cols: int) -> np.ndarray:
    """``R`` (gates * H, H) -> (gates, h_pad, cols) float32, zero-padded units and columns."""
    h = geom.hidden
    if weight.shape != (geom.gates * h, h):
        raise ValueError(
            f"recurrent weight of a {geom.cell} layer with {h} hidden units must be "
            f"({geom.gates * h}, {h}), got {weight.shape}"
        )
    padded = np.zeros((geom.gates, h_pad, cols), "float32")
    padded[:, :h, :h] = weight.reshape(geom.gates, h, h)
    return padded


def pack_recurrent_weight(
    weight: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig
) -> list[np.ndarray]:
    """Dense: ``R`` (gates * H, H) -> one array per phase, (tiles, H, phase gates, width),
    zero-padded units (a tile's slab is contiguous, k-major)."""
    h_pad = hidden_padded(geom, cfg)
    padded = _per_gate(weight, geom, h_pad, geom.hidden)
    packed = []
    for gates in phase_gates(geom):
        sel = padded[gates].reshape(len(gates), h_pad // cfg.width, cfg.width, geom.hidden)
        packed.append(np.ascontiguousarray(sel.transpose(1, 3, 0, 2)))
    return packed


def _phase_blocks(padded: np.ndarray, cfg: RecurrentConfig, block: Block) -> np.ndarray:
    """(gates, h_pad, cols) -> (tiles, gates, slices, column blocks, cols, units) blocks."""
    units, cols = block
    g, h_pad, width = padded.shape[0], padded.shape[1], padded.shape[2]
    split = padded.reshape(g, h_pad // cfg.width, cfg.width // units, units, width // cols, cols)
    return split.transpose(1, 0, 2, 4, 5, 3)


def pack_block_recurrent(
    weight: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig, block: Block
) -> PackedRecurrent:
    """BSR: per phase ``block_ptr``, ``block_col``, ``block_values`` (module docstring). A phase
    with no block keeps one zero block, never read, so no argument is empty."""
    units, cols = block
    if cfg.width % units or cfg.width % cols:
        raise ValueError(f"block {block} does not divide the kernel's tile of {cfg.width} units")
    h_pad = hidden_padded(geom, cfg)
    padded = _per_gate(weight, geom, h_pad, math.ceil(geom.hidden / cols) * cols)
    arrays: list[np.ndarray] = []
    counts = []
    for gates in phase_gates(geom):
        blocks = _phase_blocks(padded[gates], cfg, block)
        kept = blocks.any(axis=(4, 5))  # (tiles, gates, slices, column blocks)
        where = np.nonzero(kept)  # (tile, gate, slice) rows in order, columns ascending
        ptr = np.zeros(kept[..., 0].size + 1, "int32")
        ptr[1:] = np.cumsum(kept.reshape(-1, kept.shape[-1]).sum(axis=1))
        values = np.ascontiguousarray(blocks[where], "float32")
        col = (where[3] * cols).astype("int32")
        counts.append(len(col))
        if not len(col):
            col, values = np.zeros(1, "int32"), np.zeros((1, cols, units), "float32")
        arrays += [ptr, col, values]
    density = sum(counts) * units * cols / (geom.gates * geom.hidden * geom.hidden)
    return PackedRecurrent(BlockLayout(block, tuple(counts)), density, tuple(arrays))


def count_blocks(
    weight: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig, block: Block
) -> int:
    """Blocks of ``block`` shape the packing would store (every phase)."""
    units, cols = block
    padded = _per_gate(weight, geom, hidden_padded(geom, cfg), math.ceil(geom.hidden / cols) * cols)
    return int(_phase_blocks(padded, cfg, block).any(axis=(4, 5)).sum())


def choose_recurrent_block(
    weight: np.ndarray,
    geom: RecurrentGeometry,
    cfg: RecurrentConfig,
    costs: RecurrentCosts = RECURRENT_COSTS,
) -> Block | None:
    """The block shape of least estimated time, or None when the dense kernel is faster."""
    best, best_ns = None, costs.dense(geom.gates * hidden_padded(geom, cfg) * geom.hidden)
    for block in BLOCK_SHAPES:
        if cfg.width % block[0] or cfg.width % block[1]:
            continue
        blocks = count_blocks(weight, geom, cfg, block)
        if blocks * block[0] * block[1] > costs.max_density * weight.size:
            continue
        ns = costs.sparse(blocks, block)
        if ns < best_ns:
            best, best_ns = block, ns
    return best


def pack_recurrent(
    weight: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig
) -> PackedRecurrent:
    """``W_hh`` in the format its zeros make fastest (``choose_recurrent_block``)."""
    weight = np.asarray(weight, "float32")
    block = choose_recurrent_block(weight, geom, cfg)
    if block is not None:
        return pack_block_recurrent(weight, geom, cfg, block)
    return PackedRecurrent(None, 1.0, tuple(pack_recurrent_weight(weight, geom, cfg)))


def pad_gate_rows(values: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig) -> np.ndarray:
    """(gates * H, ...) -> (gates * hidden_padded, ...), zeros in the padding: for ``W_ih`` and
    the input projection's bias, so ``xp``'s gate blocks line up with the kernel's tiles."""
    h, h_pad = geom.hidden, hidden_padded(geom, cfg)
    per_gate = values.reshape(geom.gates, h, *values.shape[1:])
    pad = [(0, 0), (0, h_pad - h)] + [(0, 0)] * (values.ndim - 1)
    return np.pad(per_gate, pad).reshape(geom.gates * h_pad, *values.shape[1:])
