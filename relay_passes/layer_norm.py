"""RewriteLayerNorm: ``layer_norm([a + b | x], gamma, beta)`` over the last axis -> one
``call_tir`` to ``schedules.layer_norm`` (the residual add fused; TVM's own LayerNorm builds
as a serial reduction, ~8x slower at 128 x 768).

The add is fused when both operands have the output's shape (no broadcast); a sum used
elsewhere too is then computed twice (an add, next to a LayerNorm pass over the row).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from schedules.layer_norm import LayerNormShape, layer_norm_primfunc

from .utils import rewrite_functions, static_shape


def RewriteLayerNorm(lanes: int = 16, cores: int = 1) -> tvm.transform.Pass:  # noqa: N802
    """The pass; ``lanes`` the vector width, ``cores`` the jobs' share."""
    a, b, gamma, beta = wildcard(), wildcard(), is_const(), is_const()
    total = is_op("relax.add")(a, b)
    x = wildcard()
    pattern = is_op("relax.nn.layer_norm")(total | x, gamma, beta)

    @tvm.transform.module_pass(opt_level=0, name="RewriteLayerNorm")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels: dict[LayerNormShape, tvm.ir.GlobalVar] = {}

        def fuse(bb: relax.BlockBuilder, func: relax.Function) -> relax.Function:
            def rewrite(expr: relax.Expr, matches: dict) -> relax.Expr:
                out = static_shape(expr)
                attrs = expr.attrs
                axes = [int(ax) for ax in attrs.axes]
                if out is None or expr.ty.dtype != "float32" or axes not in ([-1], [len(out) - 1]):
                    return expr
                if any(static_shape(matches[p]) != (out[-1],) for p in (gamma, beta)):
                    return expr
                operands = [expr.args[0]]
                if total in matches and all(static_shape(matches[p]) == out for p in (a, b)):
                    operands = [matches[a], matches[b]]
                shape = LayerNormShape(
                    out[:-1], out[-1], float(attrs.epsilon), len(operands) == 2,
                    bool(attrs.scale), bool(attrs.center),
                )  # fmt: skip
                if shape not in kernels:
                    name = "layer_norm_residual" if shape.residual else "layer_norm"
                    func = layer_norm_primfunc(shape, lanes, cores, name)
                    kernels[shape] = bb.add_func(func, name)
                params = [matches[gamma]] * shape.scale + [matches[beta]] * shape.center
                return relax.call_tir(kernels[shape], [*operands, *params], expr.ty)

            return rewrite_call(pattern, rewrite, func)

        return rewrite_functions(mod, fuse)

    return transform
