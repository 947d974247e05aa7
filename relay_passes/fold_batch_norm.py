"""FoldBatchNorm: ``batch_norm(conv2d(x, W) [+ b])[0]`` with constant statistics -> one conv.

TVM's own ``FoldBatchnormToConv2D`` only matches a conv directly followed by batch_norm; a conv
with a bias (VGG-BN, most ONNX exports) slips through and BatchNorm is then decomposed into four
elementwise passes per layer. Here the scale is folded into the OIHW weight per output channel
(zeros stay zeros, so pattern sparsity survives) and the shift into a bias add, computed in numpy.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, wildcard

from .utils import const_value, rewrite_calls


def _pattern():
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    bias = is_const()
    source = conv | is_op("relax.add")(conv, bias)
    stats = [is_const() for _ in range(4)]  # gamma, beta, mean, var
    norm = is_op("relax.nn.batch_norm")(source, *stats)
    return TupleGetItemPattern(norm, 0), conv, bias, norm, stats


@tvm.transform.module_pass(opt_level=0, name="FoldBatchNorm")
def FoldBatchNorm(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """The pass (module-level; rewrites every Relax function)."""
    pattern, conv_p, bias_p, norm_p, stats_p = _pattern()

    def rewrite(expr: relax.Expr, matches: dict) -> relax.Expr:
        conv = matches[conv_p]
        if conv.attrs.kernel_layout != "OIHW" or int(matches[norm_p].attrs.axis) != 1:
            return expr
        gamma, beta, mean, var = (const_value(matches[p]).astype(np.float64) for p in stats_p)
        scale = gamma / np.sqrt(var + float(matches[norm_p].attrs.epsilon))
        weight = const_value(conv.args[1]).astype(np.float64)
        bias = np.zeros_like(mean)
        if bias_p in matches:
            given = const_value(matches[bias_p])
            if given.size != mean.size:
                return expr
            bias = given.reshape(-1).astype(np.float64)
        folded_w = (weight * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        folded_b = ((bias - mean) * scale + beta).astype(np.float32).reshape(1, -1, 1, 1)
        folded = relax.Call(conv.op, (conv.args[0], relax.const(folded_w)), conv.attrs)
        return relax.op.add(folded, relax.const(folded_b))

    return rewrite_calls(mod, pattern, rewrite)
