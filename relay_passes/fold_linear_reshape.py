"""FoldLinearReshapes: ``reshape(matmul(reshape(x, (M, K)), W) [+ b], x.shape[:-1] + (N,))`` ->
``matmul(x, W) [+ b]`` on x's own rank.

``torch.export`` decomposes ``nn.Linear`` on a (batch, tokens, features) tensor into a flatten,
an ``addmm`` and an unflatten. The unflatten stands between the matmul and what follows it (a
residual add, an activation), so the epilogue matcher would stop at the bias. Relax's matmul
takes any leading dims against a 2-D weight: folded, the whole chain fuses into one kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .utils import rewrite_calls, static_shape


def _pattern():
    x = wildcard()
    flat = is_op("relax.reshape")(x, wildcard())
    product = is_op("relax.matmul")(flat, is_const())
    bias = is_const()
    source = product | is_op("relax.add")(product, bias) | is_op("relax.add")(bias, product)
    return is_op("relax.reshape")(source, wildcard()), x, flat, product, bias


@tvm.transform.module_pass(opt_level=0, name="FoldLinearReshapes")
def FoldLinearReshapes(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """The pass (module-level; rewrites every Relax function)."""
    pattern, x_p, flat_p, product_p, bias_p = _pattern()

    def rewrite(expr: relax.Expr, matches: dict) -> relax.Expr:
        x, product = matches[x_p], matches[product_p]
        x_shape, flat, out = static_shape(x), static_shape(matches[flat_p]), static_shape(expr)
        weight = static_shape(product.args[1])
        if None in (x_shape, flat, out, weight) or len(flat) != 2 or len(weight) != 2:
            return expr
        if flat[1] != x_shape[-1] or out != (*x_shape[:-1], weight[1]):
            return expr  # not a flatten of the leading dims and its inverse
        folded = relax.Call(product.op, (x, product.args[1]), product.attrs)
        if bias_p not in matches:
            return folded
        bias = matches[bias_p]
        if static_shape(bias) not in ((weight[1],), (1, weight[1])):
            return expr
        return relax.op.add(folded, bias)

    return rewrite_calls(mod, pattern, rewrite)
