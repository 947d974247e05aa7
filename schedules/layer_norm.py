"""LayerNorm over the last axis, optionally of a residual sum: ``out = (x [+ r] - mean) / sqrt(var +
eps) [* gamma] [+ beta]``. TIR kernel generator.

Jobs are chunks of rows; per row, in vectors: the sum ``x + r`` is written to ``out`` with its
running total, then ``sum((out - mean)^2)`` (two passes over a row in L1: the one-pass
``E[x^2] - mean^2`` loses digits when the mean is large), then the normalized row in place.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .tunable import SCHEDULED_ATTR
from .vector_math import row_map, row_reduce, span, splat


@dataclass(frozen=True)
class LayerNormShape:
    """Rows (the leading dims), the normalized width, epsilon, and what is fused."""

    lead: tuple[int, ...]
    width: int
    epsilon: float
    residual: bool = False
    scale: bool = True
    center: bool = True


def layer_norm_primfunc(
    shape: LayerNormShape, lanes: int = 16, cores: int = 1, name: str = "layer_norm"
) -> tirx.PrimFunc:
    """Arguments: x (*lead, E), [residual (*lead, E)], [gamma (E,)], [beta (E,)], out (*lead, E)."""
    g = shape
    rows, e = math.prod(g.lead), g.width
    jobs = max(1, min(rows, 8 * cores))
    per_job = math.ceil(rows / jobs)
    jobs = math.ceil(rows / per_job)
    f32 = "float32"
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        x_arg = T.arg("x", T.buffer((*g.lead, e), f32))
        r_arg = T.arg("residual", T.buffer((*g.lead, e), f32)) if g.residual else None
        gamma = T.arg("gamma", T.buffer((e,), f32)) if g.scale else None
        beta = T.arg("beta", T.buffer((e,), f32)) if g.center else None
        out_arg = T.arg("out", T.buffer((*g.lead, e), f32))
        x = T.decl_buffer((rows, e), f32, data=x_arg.data)
        res = T.decl_buffer((rows, e), f32, data=r_arg.data) if r_arg is not None else None
        out = T.decl_buffer((rows, e), f32, data=out_arg.data)
        with T.parallel(0, jobs) as job, T.serial(0, per_job) as i:
            row = job * per_job + i
            with T.If(row < rows), T.Then():

                def load_sum(at: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
                    value = x[row, span(at, width)]
                    if res is not None:
                        value = value + res[row, span(at, width)]
                    T.buffer_store(out, value, [row, span(at, width)])
                    return out[row, span(at, width)]

                total = row_reduce(e, lanes, 0.0, operator.add, load_sum)
                mean = T.Bind(total * tirx.const(1.0 / e, f32))

                def square(at: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
                    d = out[row, span(at, width)] - splat(mean, width)
                    return d * d

                var = row_reduce(e, lanes, 0.0, operator.add, square) * tirx.const(1.0 / e, f32)
                rstd = T.Bind(tirx.const(1.0, f32) / tirx.sqrt(var + tirx.const(g.epsilon, f32)))

                def normalize(at: tirx.PrimExpr, width: int) -> None:
                    where = span(at, width)
                    value = (out[row, where] - splat(mean, width)) * splat(rstd, width)
                    if gamma is not None:
                        value = value * gamma[where]
                    if beta is not None:
                        value = value + beta[where]
                    T.buffer_store(out, value, [row, where])

                row_map(e, lanes, normalize)
    return ib.get().without_attr("global_symbol")


__all__ = ["LayerNormShape", "layer_norm_primfunc"]
