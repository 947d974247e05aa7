"""``relay_passes.strided_view.trace_view``: layout chains as strided views of their source
(the head split of a fused QKV projection), scalings folded, and chains that are no view."""

from __future__ import annotations

import numpy as np
from tvm import relax

from relay_passes.strided_view import trace_view
from schedules.operand_view import OperandView


def _chain(build):
    """(the chain's last value, var2val, the source var) of ``build(bb, x)`` on x (4, 18)."""
    x = relax.Var("x", relax.TensorType((4, 18), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    func = bb.get()["main"]
    return out, relax.analysis.get_var2val(func), func.params[0]


def test_head_split_of_a_qkv_projection_is_a_view():
    # (T=4, 3 * heads 3 * D 2) -> (3, T, 1, 6) -> take k -> (T, 3, 2) -> (3 heads, T, D) * 0.5
    def build(bb, x):
        y = bb.emit(relax.op.reshape(x, (4, 1, 3, 6)))
        y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
        y = bb.emit(relax.op.take(y, relax.const(1, "int64"), axis=0))
        y = bb.emit(relax.op.reshape(y, (4, 3, 2)))
        y = bb.emit(relax.op.permute_dims(y, [1, 0, 2]))
        return relax.op.multiply(y, relax.const(np.float32(0.5)))

    out, var2val, x = _chain(build)
    source, view, scale = trace_view(out, var2val)
    assert source.same_as(x) and scale == 0.5
    assert view == OperandView((4, 18), 6, ((3, 2),), 18, 1)
    data = np.arange(72).reshape(4, 18)
    expected = data[:, 6:12].reshape(4, 3, 2).transpose(1, 0, 2)
    got = np.array([[[data.flat[int(view.at(h, r, c))] for c in range(2)] for r in range(4)]
                    for h in range(3)])  # fmt: skip
    np.testing.assert_array_equal(got, expected)


def test_a_chain_that_is_no_strided_view_is_the_expression_itself():
    # a transpose, then a reshape merging the dims it separated
    def build(bb, x):
        y = bb.emit(relax.op.permute_dims(x, [1, 0]))
        return relax.op.reshape(y, (3, 24))

    out, var2val, _ = _chain(build)
    source, view, scale = trace_view(out, var2val)
    assert source.same_as(out) and view.is_contiguous and scale == 1.0
