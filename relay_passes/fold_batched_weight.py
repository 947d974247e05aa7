"""FoldBatchedWeights: ``matmul(x, W)`` with a constant W of shape (*lead, K, N) whose leading
slices are all equal -> ``matmul(x, W[0, ..., 0])``.

``torch.export`` turns a linear applied to a non-contiguous view (Hugging Face BERT's attention
output projection) into ``expand`` + ``bmm``: the weight becomes a batch of copies of itself,
which no linear kernel takes. With x of rank >= 3 carrying those leading dims, the product is
the same with the 2-D weight broadcast by matmul itself.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .utils import const_value, rewrite_calls, static_shape


@tvm.transform.module_pass(opt_level=0, name="FoldBatchedWeights")
def FoldBatchedWeights(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """The pass (module-level; rewrites every Relax function)."""
    weight_p = is_const()
    pattern = is_op("relax.matmul")(wildcard(), weight_p)

    def rewrite(expr: relax.Expr, matches: dict) -> relax.Expr:
        if not isinstance(expr, relax.Call):  # rewrite_call may hand over the bound var
            return expr
        weight = const_value(matches[weight_p])
        x_shape, out = static_shape(expr.args[0]), static_shape(expr)
        if weight is None or weight.ndim < 3 or x_shape is None or out is None:
            return expr
        lead = weight.shape[:-2]
        if x_shape[:-2][-len(lead) :] != lead or len(x_shape) < weight.ndim:
            return expr
        first = weight.reshape(-1, *weight.shape[-2:])
        if not np.all(first == first[:1]):
            return expr
        return relax.Call(expr.op, (expr.args[0], relax.const(first[0])), expr.attrs)

    return rewrite_calls(mod, pattern, rewrite)
