"""A recurrent layer direction's shape and the recurrence kernel's knobs (no TIR here).

Shared by the kernel generator (``rnn_sequence.py``), the weight packing (``rnn_weights.py``)
and the compile report, which reads a kernel's geometry back from its ``RECURRENT_ATTR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CELLS = {"gru": 3, "lstm": 4, "rnn": 1}  # gates per cell, in ONNX order: zrh / iofc / i
ACCUMULATOR_REGISTERS = 24  # of AVX-512's 32 vector registers, the rest for weights / h
RECURRENT_ATTR = "tvm_sparse.recurrence"  # the kernel's geometry, for the compile report


@dataclass(frozen=True)
class RecurrentGeometry:
    """One direction of one recurrent layer: ``steps`` x ``batch`` inputs, ``hidden`` units."""

    cell: str
    steps: int
    batch: int
    hidden: int
    reverse: bool = False
    linear_before_reset: bool = True  # GRU only

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    @property
    def two_phase(self) -> bool:
        """GRU with ``linear_before_reset=0``: ``R_n`` applies to ``r * h``, a second phase."""
        return self.cell == "gru" and not self.linear_before_reset


def describe_recurrence(geom: RecurrentGeometry) -> str:
    """``"gru 1024 hidden, 100 steps x batch 1, reverse"``: the report's shape of a layer."""
    reverse = ", reverse" if geom.reverse else ""
    return f"{geom.cell} {geom.hidden} hidden, {geom.steps} steps x batch {geom.batch}{reverse}"


def recurrence_flops(geom: RecurrentGeometry) -> int:
    """2 x the multiply-adds of the recurrent weight over every step (h x W_hh^T)."""
    return 2 * geom.steps * geom.batch * geom.gates * geom.hidden * geom.hidden


@dataclass(frozen=True)
class RecurrentConfig:
    """Knobs: vector lanes, vectors of hidden units per tile, batch rows per register tile."""

    lanes: int = 16
    vectors: int = 4
    rows: int = 1
    one_launch: bool = True  # False: a thread-pool launch per phase, no barriers

    @property
    def width(self) -> int:
        return self.lanes * self.vectors


def default_recurrent_config(
    geom: RecurrentGeometry, lanes: int = 16, cores: int = 2
) -> RecurrentConfig:
    """Batch rows first (each row reuses the tile's weights), then as many vectors as the
    accumulators allow, but no wider than leaves every core a tile."""
    rows = min(geom.batch, 4)
    vectors = max(1, min(4, ACCUMULATOR_REGISTERS // (geom.gates * rows)))
    vectors = min(vectors, max(1, math.ceil(geom.hidden / lanes / cores)))
    return RecurrentConfig(lanes=lanes, vectors=vectors, rows=rows)


def hidden_padded(geom: RecurrentGeometry, cfg: RecurrentConfig) -> int:
    """Hidden units rounded up to whole tiles: the width of ``xp`` per gate and of the outputs."""
    return math.ceil(geom.hidden / cfg.width) * cfg.width


def recurrent_unsupported(geom: RecurrentGeometry, cfg: RecurrentConfig) -> str | None:
    """Why the kernel cannot take this layer, or None."""
    if geom.cell not in CELLS:
        return f"unknown recurrent cell {geom.cell!r} (one of {', '.join(CELLS)})"
    if min(geom.steps, geom.batch, geom.hidden) < 1:
        return f"empty sequence, batch or hidden size ({geom})"
    if cfg.lanes < 1 or cfg.vectors < 1 or cfg.rows < 1:
        return f"invalid config {cfg}"
    return None


def phase_gates(geom: RecurrentGeometry) -> list[list[int]]:
    """The gates (ONNX order) whose ``h @ R^T`` each phase of a step computes."""
    if geom.two_phase:
        return [[0, 1], [2]]
    return [list(range(geom.gates))]
