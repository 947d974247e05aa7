"""Dense FC kernel and RewriteDenseMatmul: numerics vs numpy (rtol/atol 1e-4), Before/Expected."""

import numpy as np
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from relay_passes.dense_matmul import RewriteDenseMatmul
from schedules.dense_gemm import GemmConfig, pack_columns
from schedules.dense_linear import linear_gemm_template
from schedules.dense_matmul import (
    MatmulConfig,
    dense_matmul_primfunc,
    pack_weight,
    padded_columns,
)
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.targets import resolve_target


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 6),
    k=st.integers(1, 40),
    n=st.integers(1, 70),
    bias=st.booleans(),
    residual=st.booleans(),
    act=st.sampled_from(["none", "relu", "relu6"]),
    rows=st.sampled_from([1, 2, 4]),
    vector=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 999),
)
def test_kernel_matches_numpy(m, k, n, bias, residual, act, rows, vector, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype("float32")
    w = rng.standard_normal((k, n)).astype("float32")
    b = rng.standard_normal(n).astype("float32")
    r = rng.standard_normal((m, n)).astype("float32")
    cfg = MatmulConfig(rows=rows, vector=vector, vectors=2)
    n_pad = padded_columns(n, cfg)
    func = dense_matmul_primfunc(m, k, n, Epilogue(bias, residual, act), cfg)
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=resolve_target("x86"),
    ).jit()
    args = [x, pack_weight(w, cfg)]
    args += [np.pad(b, (0, n_pad - n))] if bias else []
    args += [r] if residual else []
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    ref = x @ w + (b if bias else 0) + (r if residual else 0)
    ref = np.maximum(ref, 0) if act != "none" else ref
    ref = np.minimum(ref, 6) if act == "relu6" else ref
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_linear_with_bias_and_relu_becomes_one_call():
    w = np.random.default_rng(0).standard_normal((32, 10)).astype("float32")
    b = np.arange(10, dtype="float32")
    x = relax.Var("x", relax.TensorType((2, 32), "float32"))

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            y = bb.emit(relax.op.add(y, relax.const(b)))
            y = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(y)
    before = bb.get()

    cfg = MatmulConfig(rows=2, vector=16, vectors=4)  # pinned: default_matmul_config(2, 16)
    n_pad = padded_columns(10, cfg)
    bb = relax.BlockBuilder()
    gv = bb.add_func(
        dense_matmul_primfunc(2, 32, 10, Epilogue(True, False, "relu"), cfg, "dense_matmul_32x10"),
        "dense_matmul_32x10",
    )
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, relax.const(pack_weight(w, cfg)),
                    relax.const(np.pad(b, (0, n_pad - 10)))]  # fmt: skip
            y = bb.emit_output(relax.call_tir(gv, args, relax.TensorType((2, 10), "float32")))
        bb.emit_func_output(y)
    expected = bb.get()

    records = []
    tvm.ir.assert_structural_equal(RewriteDenseMatmul(records, lanes=16)(before), expected)
    assert records[0].epilogue == "bias+relu"


def test_linear_over_tokens_with_bias_and_gelu_becomes_one_gemm_template_call():
    """(2, 16) tokens x a 32x40 weight: the GEMM over the rows, as its MetaSchedule template
    (default tile pinned: 8 rows x 3 vectors of 16, the weight packed 48 columns wide)."""
    w = np.random.default_rng(1).standard_normal((32, 40)).astype("float32")
    b = np.arange(40, dtype="float32")
    x = relax.Var("x", relax.TensorType((2, 16, 32), "float32"))

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            y = bb.emit(relax.op.add(y, relax.const(b)))
            y = bb.emit_output(relax.op.nn.gelu(y))
        bb.emit_func_output(y)
    before = bb.get()

    cfg, name = GemmConfig(8, 3, 16), "dense_linear_32x40"
    kernel = linear_gemm_template((2, 16), 32, 40, Epilogue(True, False, "gelu"), cfg, 2, name)
    bb = relax.BlockBuilder()
    gv = bb.add_func(kernel, name)
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, relax.const(pack_columns(w, 48)), relax.const(np.pad(b, (0, 8)))]
            y = bb.emit_output(relax.call_tir(gv, args, relax.TensorType((2, 16, 40), "float32")))
        bb.emit_func_output(y)

    records = []
    after = RewriteDenseMatmul(records, lanes=16, registers=32, cores=2)(before)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert records[0].epilogue == "bias+gelu" and "GEMM" in records[0].reason


def test_non_constant_weight_is_left_to_tvm():
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(y)
    before = bb.get()
    tvm.ir.assert_structural_equal(RewriteDenseMatmul()(before), before)
