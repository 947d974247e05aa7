"""A kernel operand read in place from another tensor's memory: ``OperandView``.

The operand is a 3-D (N, rows, cols) array whose element (h, r, c) lies at
``offset + lead(h) + r * row_stride + c * col_stride`` of its source buffer (flat), where
``lead(h)`` unravels h over the leading dims' (size, stride) pairs. A plain row-major tensor is
``OperandView.contiguous``; a head split of a fused QKV projection is a view of that
projection's output (``relay_passes.strided_view`` finds it), read without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx


@dataclass(frozen=True)
class OperandView:
    """Where an (N, rows, cols) operand's elements lie in its source (see the module)."""

    source: tuple[int, ...]
    offset: int
    lead: tuple[tuple[int, int], ...]  # (size, stride) of each leading dim, outermost first
    row_stride: int
    col_stride: int

    @staticmethod
    def contiguous(shape: tuple[int, ...]) -> OperandView:
        """A row-major tensor of ``shape`` (*lead, rows, cols) read as itself."""
        *lead, rows, cols = shape
        strides, step = [], rows * cols
        for size in reversed(lead):
            strides.insert(0, (size, step))
            step *= size
        return OperandView(tuple(shape), 0, tuple(strides), cols, 1)

    @property
    def heads(self) -> int:
        return math.prod(size for size, _ in self.lead)

    @property
    def is_contiguous(self) -> bool:
        return self == OperandView.contiguous(self.source)

    def at(self, h: tirx.PrimExpr, r: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        """The flat source index of element (h, r, c)."""
        index, rest = tirx.const(self.offset, "int32"), h
        for i, (size, stride) in enumerate(reversed(self.lead)):
            last = i == len(self.lead) - 1
            part = rest if last else tirx.floormod(rest, size)
            index = index + part * stride
            rest = rest if last else tirx.floordiv(rest, size)
        return index + r * self.row_stride + c * self.col_stride
