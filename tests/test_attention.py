"""Fused attention (``schedules.attention``, ``relay_passes.fuse_attention``): the kernel against
PyTorch's ``scaled_dot_product_attention`` on every x86 ISA this host runs (odd sizes,
broadcast masks, fully masked rows), the pass as Before / Expected, chains it must leave alone,
and Transformer layers through ``tvm_sparse.compile`` (torch.export and ONNX) vs PyTorch.
Tolerance: 1e-4 of the output scale (float32, another summation order, a polynomial exp)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS
from tvm import relax

import tvm_sparse
from relay_passes.fuse_attention import ATTENTION_ATTR, FuseAttention
from schedules.attention import AttentionShape, attention_primfunc
from schedules.dense_gemm import GemmConfig, default_gemm_config
from schedules.operand_view import OperandView
from tvm_sparse.benchmarking import onnx_bytes
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers

TOL = 1e-4
PINNED_GEMM = GemmConfig(rows=8, vectors=3, lanes=16)  # default_gemm_config(16, 32)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL * scale)


def _run_kernel(shape: AttentionShape, target: str, args: list[np.ndarray]) -> np.ndarray:
    tgt = tvm.target.Target(resolve_target(target))
    cfg = default_gemm_config(vector_lanes(tgt), vector_registers(tgt))
    func = attention_primfunc(shape, cfg, cores=2).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tgt).jit()
    out = tvm.runtime.tensor(np.zeros((shape.heads, shape.queries, shape.value_depth), "float32"))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.integers(1, 5),
    queries=st.integers(1, 41),
    keys=st.integers(1, 41),
    depth=st.integers(1, 33),
    value_depth=st.integers(1, 70),
    mask=st.sampled_from([None, "full", "per_key", "per_head_key"]),
    safe=st.booleans(),
)
def test_kernel_matches_sdpa(target, heads, queries, keys, depth, value_depth, mask, safe):
    rng = np.random.default_rng(heads * 1000 + queries * 10 + keys)
    q = rng.standard_normal((heads, queries, depth)).astype("float32")
    k = rng.standard_normal((heads, keys, depth)).astype("float32")
    v = rng.standard_normal((heads, keys, value_depth)).astype("float32")
    dims = {None: None, "full": (heads, queries), "per_key": (1, 1), "per_head_key": (heads, 1)}
    mask_dims = dims[mask]
    args = [q, k.transpose(0, 2, 1), v]
    full_mask = None
    if mask_dims is not None:
        m = np.where(rng.random((*mask_dims, keys)) < 0.3, -np.inf, rng.standard_normal())
        m = m.astype("float32")
        if safe:
            m[0, 0, :] = -np.inf  # a query that sees no key
        args.append(m)
        full_mask = torch.from_numpy(np.broadcast_to(m, (heads, queries, keys)).copy())
    shape = AttentionShape(
        heads, queries, keys, depth, value_depth, OperandView.contiguous(q.shape),
        OperandView.contiguous((heads, depth, keys)), OperandView.contiguous(v.shape), (heads,),
        scale=0.3, mask=mask_dims, safe=safe,
    )  # fmt: skip
    got = _run_kernel(shape, target, args)
    ref = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), attn_mask=full_mask,
        scale=0.3,
    ).numpy()  # fmt: skip
    if safe or mask_dims is None:  # PyTorch's SDPA is the safe rule: a fully masked row is 0
        _close(got, ref)
    else:  # plain softmax: a query that sees no key gets NaN (PyTorch's SDPA gives 0 there)
        seen = np.isfinite(full_mask.numpy()).any(-1)
        assert np.isnan(got[~seen]).all()
        _close(got[seen], ref[seen])


def _sdpa_before(mask_shape: tuple[int, ...] | None, scale_op: str = "multiply") -> tvm.IRModule:
    """q (2, 3, 5, 8) @ kt (2, 3, 8, 7), scaled, [+ mask], softmax, @ v (2, 3, 7, 4)."""
    q = relax.Var("q", relax.TensorType((2, 3, 5, 8), "float32"))
    kt = relax.Var("kt", relax.TensorType((2, 3, 8, 7), "float32"))
    v = relax.Var("v", relax.TensorType((2, 3, 7, 4), "float32"))
    params = [q, kt, v]
    if mask_shape is not None:
        params.append(relax.Var("mask", relax.TensorType(mask_shape, "float32")))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, kt))
            c = relax.const(np.float32(0.5 if scale_op == "multiply" else 2.0))
            s = bb.emit(getattr(relax.op, scale_op)(s, c))
            if mask_shape is not None:
                s = bb.emit(relax.op.add(s, params[3]))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            out = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(out)
    return bb.get()


def _attention_expected() -> tvm.IRModule:
    """``_sdpa_before(None)`` as the pass should leave it: one call to the kernel."""
    views = [OperandView.contiguous(s) for s in ((2, 3, 5, 8), (2, 3, 8, 7), (2, 3, 7, 4))]
    shape = AttentionShape(6, 5, 7, 8, 4, *views, (2, 3), scale=0.5)
    kernel = attention_primfunc(shape, PINNED_GEMM, 2, "attention_0")
    geometry = {"heads": 6, "queries": 5, "keys": 7, "depth": 8, "value_depth": 4, "masked": 0}
    q = relax.Var("q", relax.TensorType((2, 3, 5, 8), "float32"))
    kt = relax.Var("kt", relax.TensorType((2, 3, 8, 7), "float32"))
    v = relax.Var("v", relax.TensorType((2, 3, 7, 4), "float32"))
    bb = relax.BlockBuilder()
    gv = bb.add_func(kernel.with_attr(ATTENTION_ATTR, geometry), "attention_0")
    with bb.function("main", [q, kt, v]):
        with bb.dataflow():
            out_ty = relax.TensorType((2, 3, 5, 4), "float32")
            out = bb.emit_output(relax.call_tir(gv, [q, kt, v], out_ty))
        bb.emit_func_output(out)
    return bb.get()


def test_pass_fuses_scaled_softmax_attention():
    after = FuseAttention(16, 32, 2)(_sdpa_before(None))
    tvm.ir.assert_structural_equal(after, _attention_expected())


@pytest.mark.parametrize(
    ("mask_shape", "dims"),
    [((2, 3, 5, 7), (6, 5)), ((1, 1, 1, 7), (1, 1)), ((2, 1, 1, 7), (6, 1)), ((7,), (1, 1))],
)
def test_pass_takes_broadcast_masks_and_matches_numpy(mask_shape, dims):
    before = _sdpa_before(mask_shape, "divide")
    after = FuseAttention(16, 32, 2)(before)
    calls = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(calls) == 1 and calls[0].attrs[ATTENTION_ATTR]["masked"] == 1
    rng = np.random.default_rng(0)
    shapes = [[int(d) for d in p.ty.shape.values] for p in before["main"].params]
    inputs = [rng.standard_normal(shape).astype("float32") for shape in shapes]
    results = []
    for mod in (before, after):
        ex = tvm.compile(mod, target=resolve_target("x86"))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        results.append(vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy())
    _close(results[1], results[0])


def test_pass_leaves_softmax_over_another_axis():
    q = relax.Var("q", relax.TensorType((3, 5, 8), "float32"))
    kt = relax.Var("kt", relax.TensorType((3, 8, 5), "float32"))
    v = relax.Var("v", relax.TensorType((3, 5, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, kt, v]):
        with bb.dataflow():
            s = bb.emit(relax.op.matmul(q, kt))
            p = bb.emit(relax.op.nn.softmax(s, axis=1))
            out = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(out)
    before = bb.get()
    tvm.ir.assert_structural_equal(FuseAttention()(before), before)


class SelfAttention(torch.nn.Module):
    """nn.MultiheadAttention with its mask given as an input: ``mask_arg`` names it, an additive
    float ``attn_mask`` or a boolean ``key_padding_mask`` (True: a padded key)."""

    def __init__(self, mask_arg: str = "attn_mask") -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(48, 4, batch_first=True)
        self.mask_arg = mask_arg

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False, **{self.mask_arg: mask})[0]


def _attention_rows(cm: tvm_sparse.CompiledModel) -> list:
    return [r for r in cm.layers if r.op == "attention"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_compiles_to_fused_attention(batch_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=batch_first)
    net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    shape = (2, 13, 64) if batch_first else (13, 2, 64)  # odd token count, batch 2
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    cm = tvm_sparse.compile(net, (x,))
    with torch.no_grad():
        _close(cm(x), net(torch.from_numpy(x)).numpy())
    rows = _attention_rows(cm)
    assert len(rows) == 2 and rows[0].shape == "8x13x13, depth 16"


def test_masked_multihead_attention_matches_torch():
    torch.manual_seed(1)
    net = SelfAttention().eval()
    x = np.random.default_rng(1).standard_normal((2, 9, 48)).astype("float32")
    mask = np.triu(np.full((9, 9), -np.inf, "float32"), 1)  # causal
    mask[:, 7:] = -np.inf  # and the last two keys padding (the first query sees key 0)
    mask[0, 0] = 0.0
    cm = tvm_sparse.compile(net, (x, mask))
    with torch.no_grad():
        ref = net(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    _close(cm(x, mask), ref)
    assert [r.epilogue for r in _attention_rows(cm)] == ["mask"]


def test_onnx_encoder_layer_compiles_to_fused_attention():
    torch.manual_seed(2)
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = np.random.default_rng(2).standard_normal((1, 11, 32)).astype("float32")
    cm = tvm_sparse.compile(onnx.load_from_string(onnx_bytes(net, (x,))), (x,))
    with torch.no_grad():
        _close(cm(x), net(torch.from_numpy(x)).numpy())
    assert len(_attention_rows(cm)) == 1


@pytest.mark.parametrize("target", ISA_TARGETS)
def test_kernel_reads_a_fused_qkv_projection_in_place(target):
    """q, kt, v as strided views of one (T, 3 * heads * D) tensor (kt's keys 3 * heads * D
    apart: the kernel copies each head's keys), vs SDPA."""
    heads, t, d = 3, 11, 8
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((t, 3 * heads * d)).astype("float32")
    row = 3 * heads * d
    q_view = OperandView(qkv.shape, 0, ((heads, d),), row, 1)
    kt_view = OperandView(qkv.shape, heads * d, ((heads, d),), 1, row)
    v_view = OperandView(qkv.shape, 2 * heads * d, ((heads, d),), row, 1)
    shape = AttentionShape(heads, t, t, d, d, q_view, kt_view, v_view, (heads,), scale=0.5)
    assert shape.transposes_keys
    got = _run_kernel(shape, target, [qkv, qkv, qkv])
    q, k, v = (qkv[:, i * heads * d : (i + 1) * heads * d].reshape(t, heads, d).transpose(1, 0, 2)
               for i in range(3))  # fmt: skip
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v)), scale=0.5
    ).numpy()
    _close(got, ref)


def test_boolean_key_padding_mask_is_fused_and_masks_the_padded_keys():
    """Sequences of 7 and 4 tokens in a batch of 7: the padded keys get no weight (the
    output of the short one's real tokens equals it computed alone)."""
    torch.manual_seed(0)
    net = SelfAttention("key_padding_mask").eval()
    x = np.random.default_rng(0).standard_normal((2, 7, 48)).astype("float32")
    padded = np.zeros((2, 7), bool)
    padded[1, 4:] = True
    cm = tvm_sparse.compile(net, (x, padded))
    got = cm(x, padded)
    with torch.no_grad():
        _close(got, net(torch.from_numpy(x), torch.from_numpy(padded)).numpy())
        alone = net(torch.from_numpy(x[1:, :4]), torch.zeros((1, 4), dtype=torch.bool))
    _close(got[1:, :4], alone.numpy())
    assert [r.shape for r in _attention_rows(cm)] == ["8x7x7, depth 12"]
