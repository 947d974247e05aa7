"""FoldBatchedWeights: Before / Expected modules."""

import numpy as np
import tvm
from tvm.script import relax as R

from relay_passes.fold_batched_weight import FoldBatchedWeights

W = np.arange(6 * 4, dtype="float32").reshape(6, 4)


def _before(weight: np.ndarray) -> tvm.IRModule:
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 6), "float32")):
            with R.dataflow():
                out = R.matmul(x, R.const(weight))
                R.output(out)
            return out

    return Before


def test_a_batch_of_copies_of_one_weight_becomes_the_weight():
    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 6), "float32")):
            with R.dataflow():
                out = R.matmul(x, R.const(W))
                R.output(out)
            return out

    batched = np.broadcast_to(W, (2, 6, 4)).copy()
    tvm.ir.assert_structural_equal(FoldBatchedWeights(_before(batched)), Expected)


def test_different_weights_per_batch_are_left_alone():
    before = _before(np.stack([W, W + 1]))
    tvm.ir.assert_structural_equal(FoldBatchedWeights(before), before)
