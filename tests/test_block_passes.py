"""RewriteBSRMatmul / RewriteBSRConv1x1 as a specification (Before / Expected, structural), and a
small model with BSR-pruned 1x1 convs and FC layers through ``tvm_sparse.compile`` vs PyTorch
(float32, rtol/atol 1e-4 of the output scale)."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_sparse
import tvm_sparse.pipeline as pipeline
from relay_passes.bsr_conv1x1 import RewriteBSRConv1x1
from relay_passes.bsr_matmul import RewriteBSRMatmul
from schedules.bsr_matmul import (
    BSRConvConfig,
    BSRMatmulConfig,
    Conv1x1Geometry,
    bsr_conv1x1_template,
    bsr_matmul_primfunc,
)
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats import BSRWeight, CostTable
from tvm_sparse.formats.block import BCR_SHAPES, BLOCK_SHAPES
from tvm_sparse.prune import project_bcr, project_bsr

# Every block kernel far cheaper than dense / pattern: the passes take every eligible layer
# (bigger blocks cheaper per weight; BCR per computed weight between BSR 4x1 and 8x1).
BSR_WINS = CostTable(
    "test",
    {"fc_dense": (0.0, 1.0), "conv_dense": (0.0, 1.0), "conv_pattern": (0.0, 1.0)}
    | {
        f"{op}_bsr_{r}x{c}": (0.0, 1e-3 * (r * c) ** 0.5)
        for op in ("fc", "conv")
        for r, c in BLOCK_SHAPES
    }
    | {f"{op}_bcr_{r}x{c}": (0.0, 5e-4) for op in ("fc", "conv") for r, c in BCR_SHAPES},
)
DENSE_WINS = CostTable("test", {"fc_dense": (0.0, 1e-9), "fc_bsr_8x1": (0.0, 1.0)})


def _bsr(rows, cols, block, keep, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return project_bsr(w, block, keep).numpy()


def _emit_chain(bb, ops):
    """Emit ops[0](None), ops[1](that), ...; the last one as the dataflow output."""
    y = None
    for i, op in enumerate(ops):
        y = (bb.emit_output if i == len(ops) - 1 else bb.emit)(op(y))
    return y


def _fc_before(w_kn, bias=None, relu=False, lead=(2,)):
    x = relax.Var("x", relax.TensorType((*lead, w_kn.shape[0]), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            ops = [lambda y: relax.op.matmul(x, relax.const(w_kn))]
            ops += [lambda y: relax.op.add(y, relax.const(bias))] if bias is not None else []
            ops += [relax.op.nn.relu] if relu else []
            y = _emit_chain(bb, ops)
        bb.emit_func_output(y)
    return bb.get()


def test_sparse_linear_with_bias_and_relu_becomes_one_bsr_call():
    w = _bsr(24, 32, (8, 1), 0.25, seed=0)  # linear weight (N, K); the matmul holds W.T
    b = np.arange(24, dtype="float32")
    before = _fc_before(np.ascontiguousarray(w.T), b, relu=True)

    cfg = BSRMatmulConfig(rows=2, shares=2)  # pinned: what default_bsr_matmul_config(2, 2) gives
    packed = BSRWeight.from_dense(w, (8, 1), num_shares=cfg.shares)
    name = "bsr_matmul_32x24_8x1"
    x = relax.Var("x", relax.TensorType((2, 32), "float32"))
    bb = relax.BlockBuilder()
    epi = Epilogue(True, False, "relu")
    gv = bb.add_func(
        bsr_matmul_primfunc(2, 32, 24, (8, 1), packed.num_blocks, epi, cfg, name), name
    )
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x] + [relax.const(a) for a in packed.kernel_args()] + [relax.const(b)]
            y = bb.emit_output(relax.call_tir(gv, args, relax.TensorType((2, 24), "float32")))
        bb.emit_func_output(y)
    expected = bb.get()

    records = []
    after = RewriteBSRMatmul(BSR_WINS, records, num_threads=2)(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r.format, r.epilogue) for r in records] == [("bsr", "bias+relu")]
    assert "bsr 8x1" in records[0].reason and "est" in records[0].reason


def test_linear_over_tokens_is_one_bsr_call_on_the_nd_tensors():
    """x (batch, tokens, K): the leading dims are the kernel's rows, no reshape around it."""
    w = _bsr(24, 32, (8, 1), 0.25, seed=4)
    before = _fc_before(np.ascontiguousarray(w.T), lead=(2, 5))

    cfg = BSRMatmulConfig(rows=8, shares=2)  # pinned (10 rows, 2 cores)
    packed = BSRWeight.from_dense(w, (8, 1), num_shares=cfg.shares)
    name = "bsr_matmul_32x24_8x1"
    x = relax.Var("x", relax.TensorType((2, 5, 32), "float32"))
    bb = relax.BlockBuilder()
    gv = bb.add_func(
        bsr_matmul_primfunc((2, 5), 32, 24, (8, 1), packed.num_blocks, Epilogue(), cfg, name),
        name,
    )
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x] + [relax.const(a) for a in packed.kernel_args()]
            out_ty = relax.TensorType((2, 5, 24), "float32")
            y = bb.emit_output(relax.call_tir(gv, args, out_ty))
        bb.emit_func_output(y)
    expected = bb.get()

    records = []
    after = RewriteBSRMatmul(BSR_WINS, records, num_threads=2)(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r.shape, r.format) for r in records] == [("32x24 (batch 10)", "bsr")]


def test_linear_kept_dense_by_cost_is_left_alone_with_a_note():
    before = _fc_before(np.ascontiguousarray(_bsr(24, 32, (8, 1), 0.5, seed=1).T))
    records, notes = [], []
    after = RewriteBSRMatmul(DENSE_WINS, records, notes=notes)(before)
    tvm.ir.assert_structural_equal(after, before)
    assert records == [] and notes[0][:2] == ("matmul", "32x24 (batch 2)")
    assert notes[0][2].startswith("dense by cost")


X_SHAPE = (1, 16, 6, 6)


def _conv_before(weight, residual=False, relu=False, stride=1, padding=0):
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    o = weight.shape[0]
    size = (6 - 1) // stride + 1 if padding == 0 else 6
    params = [x]
    if residual:
        params.append(relax.Var("r", relax.TensorType((1, o, size, size), "float32")))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            conv = relax.op.nn.conv2d(x, relax.const(weight), strides=stride, padding=padding)
            ops = [lambda y: conv]
            ops += [lambda y: relax.op.add(y, params[1])] if residual else []
            ops += [relax.op.nn.relu] if relu else []
            y = _emit_chain(bb, ops)
        bb.emit_func_output(y)
    return bb.get()


def test_sparse_1x1_conv_with_residual_and_relu_becomes_one_bsr_call():
    w = _bsr(32, 16, (8, 1), 0.25, seed=2).reshape(32, 16, 1, 1)
    before = _conv_before(w, residual=True, relu=True)

    geom = Conv1x1Geometry(1, 16, 6, 6, 32)
    cfg = BSRConvConfig(vector=16, vectors=2, shares=2, parallel=True)  # pinned
    packed = BSRWeight.from_dense(w, (8, 1), num_shares=cfg.shares)
    name = "bsr_conv1x1_32x16_8x1"
    epi = Epilogue(False, True, "relu")
    x = relax.Var("x", relax.TensorType(X_SHAPE, "float32"))
    r = relax.Var("r", relax.TensorType((1, 32, 6, 6), "float32"))
    bb = relax.BlockBuilder()
    kernel = bsr_conv1x1_template(geom, (8, 1), packed.num_blocks, epi, cfg, name, None, 16, 2)
    gv = bb.add_func(kernel, name)
    with bb.function("main", [x, r]):
        with bb.dataflow():
            args = [x] + [relax.const(a) for a in packed.kernel_args()] + [r]
            out_ty = relax.TensorType((1, 32, 6, 6), "float32")
            y = bb.emit_output(relax.call_tir(gv, args, out_ty))
        bb.emit_func_output(y)
    expected = bb.get()

    records = []
    after = RewriteBSRConv1x1(BSR_WINS, records, num_threads=2, lanes=16)(before)
    tvm.ir.assert_structural_equal(after, expected)
    assert [(r.op, r.format, r.epilogue) for r in records] == [("conv2d", "bsr", "residual+relu")]
    assert records[0].shape == "32x16x1x1 s1 on 6x6"


def test_strided_1x1_conv_is_one_call_on_the_4d_tensors():
    w = _bsr(8, 16, (4, 1), 0.5, seed=3).reshape(8, 16, 1, 1)
    after = RewriteBSRConv1x1(BSR_WINS, num_threads=2)(_conv_before(w, stride=2))
    [call] = [b.value for b in after["main"].body.blocks[0].bindings]
    assert call.op.name == "relax.call_tir"
    assert tuple(int(d) for d in call.args[1].fields[0].ty.shape.values) == X_SHAPE
    assert tuple(int(d) for d in call.ty.shape.values) == (1, 8, 3, 3)


def test_3x3_and_padded_convs_are_left_for_rewrite_conv2d():
    w3 = np.ones((8, 16, 3, 3), "float32")
    for before in (_conv_before(w3, padding=1), _conv_before(w3[:, :, :1, :1], padding=1)):
        tvm.ir.assert_structural_equal(RewriteBSRConv1x1(BSR_WINS)(before), before)


class BlockNet(nn.Module):
    """A 3x3 stem, block-pruned 1x1 convs (plain, strided, BCR residual) and FC layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 64, 1)
        self.down = nn.Conv2d(64, 32, 1, stride=2)
        self.project = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 48)
        self.head = nn.Linear(48, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.nn.functional.relu6(self.expand(x))
        x = torch.relu(self.down(x))
        x = torch.relu(self.project(x) + x)
        return self.head(torch.relu(self.fc(x.mean(dim=(2, 3)))))


def _block_net() -> BlockNet:
    torch.manual_seed(0)
    net = BlockNet()
    with torch.no_grad():
        for layer, block in ((net.expand, (8, 1)), (net.down, (8, 1)), (net.fc, (16, 1)),
                             (net.head, (1, 1))):  # fmt: skip
            layer.weight.copy_(project_bsr(layer.weight, block, 0.2))
        net.project.weight.copy_(project_bcr(net.project.weight, (8, 8), 0.5, 0.5))
    return net.eval()


def _check(cm, net, x):
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(cm(x), ref, rtol=1e-4, atol=1e-4 * scale)


def test_block_pruned_model_compiles_to_bsr_and_matches_torch(monkeypatch):
    monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: BSR_WINS)
    net = _block_net()
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype("float32")
    cm = tvm_sparse.compile(net, (x,))
    _check(cm, net, x)
    block = [(r.op, r.format, r.epilogue) for r in cm.layers if r.format in ("bsr", "bcr")]
    assert block == [
        ("conv2d", "bsr", "bias+relu6"),  # torch's relu6 imports as clip(0, 6): fused
        ("conv2d", "bsr", "bias+relu"),
        ("conv2d", "bcr", "bias+residual+relu"),
        ("matmul", "bsr", "bias+relu"),
        ("matmul", "bsr", ""),
    ]
    assert "bcr 8x8" in cm.report()


def test_block_pruned_model_with_the_shipped_cost_table():
    """Whatever the table picks per layer, the numbers match and each FC / 1x1 says why."""
    net = _block_net()
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype("float32")
    cm = tvm_sparse.compile(net, (x,))
    _check(cm, net, x)
    block_layers = [r for r in cm.layers if r.op == "matmul" or "x1x1" in r.shape]
    assert len(block_layers) == 5
    assert all("est" in r.reason for r in block_layers)


class TokenNet(nn.Module):
    """Linear layers over (batch, tokens, features): BSR 16x1 with ReLU, BCR 8x8 with a
    residual, an odd output width (block rows cut short)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.mix = nn.Linear(96, 96)
        self.out = nn.Linear(96, 37)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        h = self.mix(h) + h
        return self.out(h)


def test_block_pruned_linears_over_tokens_match_torch(monkeypatch):
    monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: BSR_WINS)
    torch.manual_seed(1)
    net = TokenNet()
    with torch.no_grad():
        net.up.weight.copy_(project_bsr(net.up.weight, (16, 1), 0.3))
        net.mix.weight.copy_(project_bcr(net.mix.weight, (8, 8), 0.5, 0.5))
        net.out.weight.copy_(project_bsr(net.out.weight, (8, 1), 0.3))
    net.eval()
    for shape in ((1, 7, 48), (2, 13, 48)):  # odd token counts, batch 2
        x = np.random.default_rng(2).standard_normal(shape).astype("float32")
        cm = tvm_sparse.compile(net, (x,))
        _check(cm, net, x)
        formats = [(r.format, r.epilogue) for r in cm.layers if r.op == "matmul"]
        assert formats == [("bsr", "bias+relu"), ("bcr", "bias+residual"), ("bsr", "bias")]
