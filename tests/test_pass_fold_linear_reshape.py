"""FoldLinearReshapes: Before / Expected modules."""

import numpy as np
import tvm
from tvm.script import relax as R

from relay_passes.fold_linear_reshape import FoldLinearReshapes

W = np.arange(6 * 4, dtype="float32").reshape(6, 4)
B = np.arange(4, dtype="float32")


def _before(out_shape: tuple) -> tvm.IRModule:
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 6), "float32")):
            with R.dataflow():
                flat = R.reshape(x, R.shape([6, 6]))
                y = R.matmul(flat, R.const(W))
                z = R.add(R.const(B), y)
                out = R.reshape(z, R.shape(list(out_shape)))
                R.output(out)
            return out

    return Before


def test_flatten_linear_unflatten_becomes_one_matmul_on_the_tokens():
    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 6), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.const(W))
                out = R.add(y, R.const(B))
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(FoldLinearReshapes(_before((2, 3, 4))), Expected)


def test_a_reshape_to_other_dims_is_left_alone():
    before = _before((3, 2, 4))  # not the inverse of the flatten
    tvm.ir.assert_structural_equal(FoldLinearReshapes(before), before)
