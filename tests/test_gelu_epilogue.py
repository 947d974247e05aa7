"""GELU (erf and tanh forms) fused into the kernels' epilogue: linear layers over tokens (dense
GEMM, BSR), batch-1 FC (GEMV) and a conv, through ``tvm_sparse.compile`` vs PyTorch on every
x86 ISA this host runs (tolerance 1e-4 of the output scale: the erf / tanh approximations are
within 1e-6), and the vector functions themselves on [-12, 12] and NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from kernel_utils import ISA_TARGETS
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

import tvm_sparse
import tvm_sparse.pipeline as pipeline
from schedules.vector_math import vector_gelu, vector_gelu_tanh
from tvm_sparse.formats import CostTable
from tvm_sparse.prune import project_bsr
from tvm_sparse.targets import resolve_target

BSR_WINS = CostTable("test", {"fc_dense": (0.0, 1.0), "fc_bsr_16x1": (0.0, 1e-6)})


class GeluNet(torch.nn.Module):
    """Two linears with GELU (erf, then tanh), a conv with GELU before them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up = torch.nn.Linear(width, 48)
        self.down = torch.nn.Linear(48, 40)

    def forward(self, img: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.nn.functional.gelu(self.up(x))
        y = torch.nn.functional.gelu(self.down(y), approximate="tanh")
        return torch.nn.functional.gelu(self.conv(img)), y


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize("tokens", [(1,), (2, 17)])  # GEMV at batch 1, GEMM over tokens
@pytest.mark.parametrize("sparse", [False, True])
def test_gelu_fuses_and_matches_torch(monkeypatch, target, tokens, sparse):
    torch.manual_seed(0)
    net = GeluNet(32).eval()
    if sparse:
        monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: BSR_WINS)
        with torch.no_grad():
            net.up.weight.copy_(project_bsr(net.up.weight, (16, 1), 0.3))
    rng = np.random.default_rng(1)
    img = rng.standard_normal((1, 3, 10, 10)).astype("float32")
    x = (rng.standard_normal((*tokens, 32)) * 3).astype("float32")
    cm = tvm_sparse.compile(net, (img, x), target=target)
    with torch.no_grad():
        refs = net(torch.from_numpy(img), torch.from_numpy(x))
    for got, ref in zip(cm(img, x), refs, strict=True):
        ref = ref.numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    fused = {r.epilogue for r in cm.layers}
    assert {"bias+gelu", "bias+gelu_tanh"} <= fused
    if sparse:
        assert [r.format for r in cm.layers if r.epilogue == "bias+gelu" and r.op == "matmul"] == [
            "bsr"
        ]


@pytest.mark.parametrize(("fn", "approximate"), [(vector_gelu, "none"), (vector_gelu_tanh, "tanh")])
@pytest.mark.parametrize("lanes", [1, 8, 16])
def test_vector_gelu_matches_torch(fn, approximate, lanes):
    n = 4096
    with IRBuilder() as ib, T.prim_func():
        T.func_name("main")
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        a = T.arg("a", T.buffer((n,), "float32"))
        b = T.arg("b", T.buffer((n,), "float32"))
        with T.serial(0, n // lanes) as i:
            at = tvm.tirx.Ramp(i * lanes, 1, lanes) if lanes > 1 else i
            T.buffer_store(b, fn(a[at]), [at])
    lib = tvm.compile(tvm.IRModule({"main": ib.get()}), target=resolve_target("x86")).jit()
    x = np.linspace(-12, 12, n).astype("float32")
    x[5] = np.nan
    out = tvm.runtime.tensor(np.zeros(n, "float32"))
    lib["main"](tvm.runtime.tensor(x), out)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    got = out.numpy()
    assert np.isnan(got[5])
    np.testing.assert_allclose(np.delete(got, 5), np.delete(ref, 5), rtol=1e-5, atol=2e-6)
