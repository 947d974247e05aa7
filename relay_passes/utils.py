"""Small helpers shared by the rewrite passes: constants, static shapes, use counts, kernels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, rewrite_call


def const_value(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a Relax constant, or None."""
    value = getattr(expr, "value", None)
    if isinstance(expr, relax.Var) or value is None or not hasattr(value, "numpy"):
        return None
    return value.numpy()


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The static shape of a tensor-typed expression, or None if unknown."""
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):
        return None


def count_uses(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each var is referenced in ``func`` (its definition not counted)."""
    counts: dict[relax.Var, int] = {}

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_var_(self, var: relax.Var) -> None:
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var: relax.Var) -> None:
            counts[var] = counts.get(var, 0) + 1

    _Counter().visit_expr(func)
    return counts


def add_kernel(
    bb: relax.BlockBuilder, cache: dict, key: tuple, name: str, make: Callable[[], object]
) -> tvm.ir.GlobalVar:
    """Add the PrimFunc ``make()`` once per ``key`` (layers with equal kernels share one)."""
    if key not in cache:
        cache[key] = bb.add_func(make(), name)
    return cache[key]


def rewrite_functions(
    mod: tvm.IRModule, rewrite: Callable[[relax.BlockBuilder, relax.Function], relax.Function]
) -> tvm.IRModule:
    """``rewrite(bb, func)`` on every Relax function of ``mod``; the kernels it adds with
    ``bb.add_func`` are in the result."""
    bb = relax.BlockBuilder(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            bb.update_func(gv, rewrite(bb, func))
    return bb.get()


def rewrite_calls(
    mod: tvm.IRModule, pattern: DFPattern, rewrite: Callable[[relax.Expr, dict], relax.Expr]
) -> tvm.IRModule:
    """``relax.dpl.rewrite_call(pattern, rewrite, func)`` on every Relax function of ``mod``
    (in place), for passes that add no kernels."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod


def scalar_value(expr: relax.Expr) -> float | None:
    """The value of a one-element constant, else None."""
    value = const_value(expr)
    return float(value.reshape(())) if value is not None and value.size == 1 else None
