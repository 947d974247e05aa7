"""LayerNorm (``schedules.layer_norm``, ``relay_passes.layer_norm``): the kernel against PyTorch
on every x86 ISA this host runs (odd widths, a large mean, with and without the residual sum,
gamma and beta), the pass as Before / Expected and what it leaves alone. Tolerance: 1e-5 of
the output scale plus float32 rounding of a 100-mean input (two-pass variance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS
from tvm.script import relax as R

from relay_passes.layer_norm import RewriteLayerNorm
from schedules.layer_norm import LayerNormShape, layer_norm_primfunc
from tvm_sparse.targets import resolve_target, vector_lanes


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.sampled_from([(1,), (7,), (2, 13), (1, 128)]),
    width=st.integers(1, 300),
    residual=st.booleans(),
    affine=st.booleans(),
)
def test_kernel_matches_torch(target, lead, width, residual, affine):
    tgt = tvm.target.Target(resolve_target(target))
    shape = LayerNormShape(lead, width, 1e-5, residual, affine, affine)
    func = layer_norm_primfunc(shape, vector_lanes(tgt), 2).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt).jit()
    rng = np.random.default_rng(width)
    x = (rng.standard_normal((*lead, width)) * 3 + 100).astype("float32")
    r = rng.standard_normal((*lead, width)).astype("float32")
    gamma, beta = (rng.standard_normal(width).astype("float32") for _ in range(2))
    args = [x] + [r] * residual + [gamma, beta] * affine + [np.zeros_like(x)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*tensors)
    ref = torch.nn.functional.layer_norm(
        torch.from_numpy(x + r if residual else x), (width,),
        torch.from_numpy(gamma) if affine else None, torch.from_numpy(beta) if affine else None,
        1e-5,
    ).numpy()  # fmt: skip
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(tensors[-1].numpy(), ref, rtol=1e-4, atol=2e-5 * scale)


G = np.linspace(0.5, 1.5, 8, dtype="float32")
B = np.linspace(-1, 1, 8, dtype="float32")


def test_residual_sum_and_layer_norm_become_one_call():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((3, 8), "float32"), y: R.Tensor((3, 8), "float32")):
            with R.dataflow():
                s = R.add(x, y)
                out = R.nn.layer_norm(s, R.const(G), R.const(B), axes=[-1], epsilon=1e-5)
                R.output(out)
            return out

    shape = LayerNormShape((3,), 8, 1e-5, residual=True)
    bb = tvm.relax.BlockBuilder()
    gv = bb.add_func(layer_norm_primfunc(shape, 16, 2, "layer_norm_residual"),
                     "layer_norm_residual")  # fmt: skip
    x = tvm.relax.Var("x", tvm.relax.TensorType((3, 8), "float32"))
    y = tvm.relax.Var("y", tvm.relax.TensorType((3, 8), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            args = [x, y, tvm.relax.const(G), tvm.relax.const(B)]
            out_ty = tvm.relax.TensorType((3, 8), "float32")
            out = bb.emit_output(tvm.relax.call_tir(gv, args, out_ty))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(RewriteLayerNorm(16, 2)(Before), bb.get())


def test_a_broadcast_add_stays_and_layer_norm_over_another_axis_is_left_alone():
    @tvm.script.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((3, 8), "float32"), y: R.Tensor((8,), "float32")):
            with R.dataflow():
                s = R.add(x, y)
                a = R.nn.layer_norm(s, R.const(G), R.const(B), axes=[-1], epsilon=1e-5)
                b = R.nn.layer_norm(a, R.const(G[:3]), R.const(B[:3]), axes=[0], epsilon=1e-5)
                R.output(b)
            return b

    after = RewriteLayerNorm(16, 2)(Before)
    ops = [b.value.op.name for b in after["main"].body.blocks[0].bindings]
    assert ops == ["relax.add", "relax.call_tir", "relax.nn.layer_norm"]
