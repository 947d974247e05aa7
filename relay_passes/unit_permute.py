"""UnitPermutesToReshapes: ``permute_dims`` that moves only unit dims -> ``reshape`` (no copy).

A (batch 1, tokens, features) model exported from a sequence-first module permutes between
(1, T, E) and (T, 1, E) around every attention block; TVM builds each as a copy kernel, though
the memory order of the elements does not change when the dims that move have size 1. As a
reshape it is a view (and the chains around it stay fusable).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, wildcard

from .utils import rewrite_calls, static_shape


def moves_only_unit_dims(shape: tuple[int, ...], axes: list[int]) -> bool:
    """Whether permuting ``shape`` by ``axes`` keeps the dims larger than 1 in their order."""
    kept = [a for a in axes if shape[a] != 1]
    return kept == sorted(kept)


@tvm.transform.module_pass(opt_level=0, name="UnitPermutesToReshapes")
def UnitPermutesToReshapes(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """The pass (module-level; rewrites every Relax function)."""
    pattern = is_op("relax.permute_dims")(wildcard())

    def rewrite(expr: relax.Expr, _matches: dict) -> relax.Expr:
        if not isinstance(expr, relax.Call):  # rewrite_call may hand over the bound var
            return expr
        shape, out = static_shape(expr.args[0]), static_shape(expr)
        if shape is None or out is None:
            return expr
        axes = expr.attrs.axes
        axes = list(reversed(range(len(shape)))) if axes is None else [int(a) for a in axes]
        if not moves_only_unit_dims(shape, axes):
            return expr
        return relax.op.reshape(expr.args[0], out)

    return rewrite_calls(mod, pattern, rewrite)
