"""The epilogue matcher: which ``act?(anchor [+ bias] [+ residual])`` chains fuse into one call.

A stand-in pass (``anchored_rewrite_pass`` with an ``emit`` writing one packed call named after
what was fused, with the anchor's operands, the residual and the 1-D bias) shows each match as
a plain Relax module.
"""

import numpy as np
import tvm
from tvm import relax, topi
from tvm.script import ir as I
from tvm.script import relax as R

from relay_passes.epilogue import EpilogueMatch, describe
from relay_passes.rewrite import anchored_rewrite_pass

BIAS = np.arange(4, dtype="float32")
CONV_BIAS = BIAS.reshape(1, 4, 1, 1)
FULL = np.ones((1, 4, 8, 8), "float32")  # same shape as the conv's output: not per channel
ZERO, SIX = np.array(0, "float32"), np.array(6, "float32")


def _emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit) -> relax.Expr:
    args = [visit(a) for a in match.anchor.args]
    args += [visit(match.residual)] if match.residual is not None else []
    args += [relax.const(match.bias)] if match.bias is not None else []
    name = "fused." + (describe(match) or "plain")
    return relax.op.call_pure_packed(name, *args, ty_args=match.anchor.ty)


def _check(op_name: str, channel_axis: int, before: tvm.IRModule, expected: tvm.IRModule):
    fuse = anchored_rewrite_pass("Fuse", op_name, lambda call: None, _emit, channel_axis)
    tvm.ir.assert_structural_equal(fuse(before), expected)


def test_conv_bias_residual_relu_fuse():
    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            w: R.Tensor((4, 4, 3, 3), "float32"),
            r: R.Tensor((1, 4, 8, 8), "float32"),
        ):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.add(a, R.const(CONV_BIAS))
                c = R.add(b, r)
                d = R.nn.relu(c)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(
            x: R.Tensor((1, 4, 8, 8), "float32"),
            w: R.Tensor((4, 4, 3, 3), "float32"),
            r: R.Tensor((1, 4, 8, 8), "float32"),
        ):
            with R.dataflow():
                d = R.call_pure_packed(
                    "fused.bias+residual+relu",
                    x,
                    w,
                    r,
                    R.const(BIAS),
                    ty_args=R.Tensor((1, 4, 8, 8), "float32"),
                )
                R.output(d)
            return d

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_matmul_bias_clip_fuses_as_relu6():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 4), "float32")):
            with R.dataflow():
                a = R.matmul(x, w)
                b = R.add(R.const(BIAS), a)
                c = R.clip(b, R.prim_value(0), R.prim_value(6))
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 4), "float32")):
            with R.dataflow():
                c = R.call_pure_packed(
                    "fused.bias+relu6", x, w, R.const(BIAS), ty_args=R.Tensor((2, 4), "float32")
                )
                R.output(c)
            return c

    _check("relax.matmul", -1, Before, Expected)


def test_matmul_bias_gelu_and_gelu_tanh_fuse():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 4), "float32")):
            with R.dataflow():
                a = R.matmul(x, w)
                b = R.add(a, R.const(BIAS))
                c = R.nn.gelu(b)
                d = R.matmul(c, R.const(np.ones((4, 4), "float32")))
                e = R.nn.gelu_tanh(d)
                R.output(e)
            return e

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 8), "float32"), w: R.Tensor((8, 4), "float32")):
            with R.dataflow():
                c = R.call_pure_packed(
                    "fused.bias+gelu", x, w, R.const(BIAS), ty_args=R.Tensor((2, 4), "float32")
                )
                e = R.call_pure_packed(
                    "fused.gelu_tanh", c, R.const(np.ones((4, 4), "float32")),
                    ty_args=R.Tensor((2, 4), "float32"),
                )  # fmt: skip
                R.output(e)
            return e

    _check("relax.matmul", -1, Before, Expected)


def test_onnx_clip_0_6_fuses_as_relu6_and_maximum_0_as_relu():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.maximum(a, R.const(ZERO))
                c = R.minimum(b, R.const(SIX))
                d = R.nn.conv2d(c, w, padding=1)
                e = R.maximum(d, R.const(ZERO))
                R.output(e)
            return e

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                c = R.call_pure_packed(
                    "fused.relu6", x, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                e = R.call_pure_packed(
                    "fused.relu", c, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                R.output(e)
            return e

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_onnx_clip_as_topi_call_tir_fuses_as_relu6():
    # (how TVM's ONNX frontend imports Clip(0, 6): emit_te of TOPI's maximum, then minimum)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((4, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            b = bb.emit_te(topi.maximum, a, relax.const(ZERO))
            c = bb.emit_te(topi.minimum, b, relax.const(SIX))
            out = bb.emit_output(c)
        bb.emit_func_output(out)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                c = R.call_pure_packed(
                    "fused.relu6", x, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                out = c
                R.output(out)
            return out

    _check("relax.nn.conv2d", 1, bb.get(), Expected)


def test_call_tir_of_another_kernel_is_no_clamp():
    # a call_tir of (x, 0) is taken for maximum only where it calls TOPI's maximum
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((4, 4, 3, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, w, padding=1))
            out = bb.emit_output(bb.emit_te(topi.add, a, relax.const(ZERO)))
        bb.emit_func_output(out)

    text = anchored_rewrite_pass("Fuse", "relax.nn.conv2d", lambda call: None, _emit, 1)(
        bb.get()
    ).script()
    assert '"fused.plain"' in text and "R.call_tir(cls.add" in text


def test_clip_bounds_other_than_scalar_0_6_are_not_fused():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.maximum(a, R.const(ZERO))
                c = R.minimum(b, R.const(np.full((1, 4, 1, 1), 6, "float32")))
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                b = R.call_pure_packed(
                    "fused.relu", x, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                c = R.minimum(b, R.const(np.full((1, 4, 1, 1), 6, "float32")))
                R.output(c)
            return c

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_shared_intermediate_is_not_fused():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.add(a, R.const(CONV_BIAS))
                c = R.nn.relu(b)
                d = R.add(c, b)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                b = R.call_pure_packed(
                    "fused.bias", x, w, R.const(BIAS), ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                c = R.nn.relu(b)
                d = R.add(c, b)
                R.output(d)
            return d

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_broadcasting_residual_is_not_fused():
    # x + conv(mean(x)): the add broadcasts the conv's (1, 4, 1, 1) output up to x's shape
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                m = R.mean(x, axis=[2, 3], keepdims=True)
                a = R.nn.conv2d(m, w)
                b = R.add(x, a)
                c = R.nn.relu(b)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                m = R.mean(x, axis=[2, 3], keepdims=True)
                a = R.call_pure_packed(
                    "fused.plain", m, w, ty_args=R.Tensor((1, 4, 1, 1), "float32")
                )
                b = R.add(x, a)
                c = R.nn.relu(b)
                R.output(c)
            return c

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_non_per_channel_bias_is_not_fused():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.add(a, R.const(FULL))
                c = R.nn.relu(b)
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.call_pure_packed(
                    "fused.plain", x, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                b = R.add(a, R.const(FULL))
                c = R.nn.relu(b)
                R.output(c)
            return c

    _check("relax.nn.conv2d", 1, Before, Expected)


def test_residual_add_takes_the_other_operand_where_the_first_does_not_fuse():
    # add(conv1 + full-shape const, conv2): conv1's chain is refused, so conv2 is the anchor
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, w, padding=1)
                b = R.add(a, R.const(FULL))
                c = R.nn.conv2d(x, w, padding=1)
                d = R.add(b, c)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((4, 4, 3, 3), "float32")):
            with R.dataflow():
                a = R.call_pure_packed(
                    "fused.plain", x, w, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                b = R.add(a, R.const(FULL))
                d = R.call_pure_packed(
                    "fused.residual", x, w, b, ty_args=R.Tensor((1, 4, 8, 8), "float32")
                )
                R.output(d)
            return d

    _check("relax.nn.conv2d", 1, Before, Expected)
