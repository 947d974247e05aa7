"""The strided view behind a chain of layout ops: where an expression's elements lie in the
memory of the tensor the chain starts from.

``trace_view(expr, var2val)`` walks from ``expr`` back through ``reshape`` / ``expand_dims`` /
``squeeze`` / ``permute_dims`` / ``take`` (a constant scalar index) / ``broadcast_to``, and
through a multiply or divide by a scalar constant (returned as a scale: it commutes with the
layout), to the first other op. The chain is replayed on an index array (NumPy) and the
source offset of each element fitted to ``offset + sum(i_d * stride_d)``; a chain that is not
such a view (a reshape merging dims a permute separated) gives the expression itself.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from schedules.operand_view import OperandView

from .utils import const_value, scalar_value, static_shape

RESHAPES = ("relax.reshape", "relax.expand_dims", "relax.squeeze")
MAX_ELEMENTS = 1 << 24  # sources larger than this are not replayed


def _step(value: relax.Call) -> tuple[relax.Expr, float] | None:
    """(the op's input, its scale) when ``value`` is a layout op or a scalar scaling."""
    name = value.op.name if isinstance(value.op, tvm.ir.Op) else ""
    if name in (*RESHAPES, "relax.permute_dims", "relax.broadcast_to"):
        return value.args[0], 1.0
    if name == "relax.take" and const_value(value.args[1]) is not None:
        return (value.args[0], 1.0) if const_value(value.args[1]).ndim == 0 else None
    if name in ("relax.multiply", "relax.divide"):
        c = scalar_value(value.args[1])
        if c is not None and c != 0.0:
            return value.args[0], (c if name == "relax.multiply" else 1.0 / c)
    return None


def _replay(index: np.ndarray, op: relax.Call) -> np.ndarray:
    name = op.op.name
    if name in ("relax.multiply", "relax.divide"):
        return index
    out = static_shape(op)
    if name in RESHAPES:
        return index.reshape(out)
    if name == "relax.permute_dims":
        axes = None if op.attrs.axes is None else [int(a) for a in op.attrs.axes]
        return index.transpose(axes)
    if name == "relax.take":
        return np.take(index, int(const_value(op.args[1])), axis=int(op.attrs.axis))
    return np.broadcast_to(index, out)  # broadcast_to


def trace_view(expr: relax.Expr, var2val: dict) -> tuple[relax.Expr, OperandView, float]:
    """(source, ``expr`` as a view of it, scale) for a static-shape ``expr`` of rank >= 3."""
    shape = static_shape(expr)
    chain, node, scale = [], expr, 1.0
    while True:
        value = var2val.get(node, node)
        step = _step(value) if isinstance(value, relax.Call) else None
        if step is None or static_shape(value) is None:
            break
        chain.append(value)
        node, factor = step
        scale *= factor
    source = static_shape(node)
    if not chain or source is None or math.prod(source) > MAX_ELEMENTS:
        return expr, OperandView.contiguous(shape), 1.0
    index = np.arange(math.prod(source), dtype=np.int64).reshape(source)
    for op in reversed(chain):
        index = _replay(index, op)
    view = _fit(index, source)
    if view is None:
        return expr, OperandView.contiguous(shape), 1.0
    return node, view, scale


def _fit(index: np.ndarray, source: tuple[int, ...]) -> OperandView | None:
    """``index`` (*lead, rows, cols) as offset + strides, or None if it is not affine."""
    offset = int(index.flat[0])
    strides = []
    for d, size in enumerate(index.shape):
        unit = [0] * index.ndim
        unit[d] = 1 if size > 1 else 0
        strides.append(int(index[tuple(unit)]) - offset if size > 1 else 0)
    grid = np.indices(index.shape, dtype=np.int64)
    expected = offset + sum(g * s for g, s in zip(grid, strides, strict=True))
    if not np.array_equal(expected, index):
        return None
    lead = tuple(zip(index.shape[:-2], strides[:-2], strict=True))
    return OperandView(tuple(source), offset, lead, strides[-2], strides[-1])
