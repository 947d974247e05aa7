"""Vector building blocks of the generated kernels: reductions along a row in vectors."""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .buffers import allocated_view
from .dense_gemm import span, splat

Combine = Callable[["tirx.PrimExpr", "tirx.PrimExpr"], "tirx.PrimExpr"]
Element = Callable[["tirx.PrimExpr", int], "tirx.PrimExpr"]  # (start, width) -> value(s)


def row_reduce(
    length: int, lanes: int, init: float, combine: Combine, body: Element
) -> tirx.PrimExpr:
    """``combine`` of ``body(start, width)`` over ``[0, length)`` as one float32 scalar: whole
    vectors into a vector accumulator (reduced across its lanes at the end), then the tail
    element by element. ``body`` may emit statements (a store) before returning its value."""
    full, rest = divmod(length, lanes)
    lane_acc, scalar = allocated_view((lanes,)), allocated_view((1,))
    every = span(0, lanes)
    T.buffer_store(lane_acc, splat(tirx.const(init, "float32"), lanes), [every])
    with T.serial(0, full) as j:
        T.buffer_store(lane_acc, combine(lane_acc[every], body(j * lanes, lanes)), [every])
    T.buffer_store(scalar, tirx.const(init, "float32"), [0])
    with T.serial(0, lanes) as e:
        T.buffer_store(scalar, combine(scalar[0], lane_acc[e]), [0])
    with T.serial(0, rest) as e:
        T.buffer_store(scalar, combine(scalar[0], body(full * lanes + e, 1)), [0])
    return scalar[0]


def row_map(length: int, lanes: int, body: Callable[[tirx.PrimExpr, int], None]) -> None:
    """``body(start, width)`` over ``[0, length)``: whole vectors, then the tail one by one."""
    full, rest = divmod(length, lanes)
    with T.serial(0, full) as j:
        body(j * lanes, lanes)
    with T.serial(0, rest) as e:
        body(full * lanes + e, 1)


def add(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return a + b
