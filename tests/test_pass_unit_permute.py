"""UnitPermutesToReshapes: Before / Expected modules, and the rule on shapes."""

import tvm
from tvm.script import relax as R

from relay_passes.unit_permute import UnitPermutesToReshapes, moves_only_unit_dims


def test_sequence_first_swap_of_batch_one_becomes_a_reshape():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 5, 8), "float32")):
            with R.dataflow():
                t = R.permute_dims(x, axes=[1, 0, 2])
                out = R.add(t, t)
                R.output(out)
            return out

    @tvm.script.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 5, 8), "float32")):
            with R.dataflow():
                t = R.reshape(x, R.shape([5, 1, 8]))
                out = R.add(t, t)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(UnitPermutesToReshapes(Before), Expected)


def test_a_real_transpose_is_left_alone():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 5, 8), "float32")):
            with R.dataflow():
                out = R.permute_dims(x, axes=[1, 0, 2])
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(UnitPermutesToReshapes(Before), Before)


def test_the_rule():
    assert moves_only_unit_dims((1, 128, 1, 3, 768), [1, 0, 2, 3, 4])
    assert moves_only_unit_dims((4, 1, 6), [1, 0, 2])
    assert not moves_only_unit_dims((1, 128, 1, 3, 768), [3, 1, 2, 0, 4])  # 3 before 128
    assert not moves_only_unit_dims((2, 3), [1, 0])
