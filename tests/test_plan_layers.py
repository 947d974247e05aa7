"""plan_layers: one decision per conv2d / matmul layer, in graph order, with pinned kernels;
the compile report is the plans' rows; the rewrites emit exactly the planned kernels (the
compiled model checked against PyTorch, rtol / atol 1e-4 of the output scale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax

import tvm_sparse
from relay_passes.layer_plan import LEFT_TO_TVM, PlanTarget, planned_calls
from relay_passes.plan_layers import plan_layers
from tvm_sparse.formats import CostTable
from tvm_sparse.formats.block import BLOCK_SHAPES
from tvm_sparse.frontend import import_model
from tvm_sparse.pipeline import plan_target, sparse_pipeline
from tvm_sparse.targets import resolve_target
from tvm_sparse.testing import random_bsr, random_pattern_weight

# Block kernels far cheaper than dense ones: every block-sparse layer goes to BSR.
BSR_WINS = CostTable(
    "test",
    {"fc_dense": (0.0, 1.0), "conv_dense": (0.0, 1.0), "conv_pattern": (0.0, 1.0)}
    | {f"{op}_bsr_{r}x{c}": (0.0, 1e-3) for op in ("fc", "conv") for r, c in BLOCK_SHAPES},
)


class Mixed(nn.Module):
    """One layer for each kernel: pattern 3x3, dense 1x1 (GEMM), BSR 1x1, depthwise, dilated
    (left to TVM), BSR FC and dense FC."""

    def __init__(self) -> None:
        super().__init__()
        self.pattern = nn.Conv2d(8, 16, 3, padding=1)
        self.pattern.weight.data = torch.from_numpy(random_pattern_weight(16, 8, seed=1))
        self.dense1x1 = nn.Conv2d(16, 32, 1)
        self.block1x1 = nn.Conv2d(32, 32, 1, bias=False)
        bsr = random_bsr(32, 32, (8, 1), 0.2, seed=2)
        self.block1x1.weight.data = torch.from_numpy(bsr[:, :, None, None])
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.dilated = nn.Conv2d(32, 16, 3, padding=2, dilation=2)
        self.fc_block = nn.Linear(16, 64)
        self.fc_block.weight.data = torch.from_numpy(random_bsr(64, 16, (8, 1), 0.25, seed=3))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.pattern(x))
        y = torch.relu(self.block1x1(self.dense1x1(y)))
        y = self.dilated(torch.relu(self.depthwise(y)))
        return self.fc(torch.relu(self.fc_block(y.mean((2, 3)))))


X = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype("float32")
EXPECTED = [  # (op, format, kernel), graph order
    ("conv2d", "pattern", "pattern"),
    ("conv2d", "dense", "conv_gemm"),
    ("conv2d", "bsr", "bsr_conv1x1"),
    ("conv2d", "depthwise", "depthwise"),
    ("conv2d", LEFT_TO_TVM, LEFT_TO_TVM),
    ("matmul", "bsr", "bsr_matmul"),
    ("matmul", "dense", "gemv"),
]


@pytest.fixture(scope="module")
def imported() -> tvm.IRModule:
    return import_model(Mixed().eval(), (torch.from_numpy(X),)).mod


def test_each_layer_is_planned_once_in_graph_order(imported):
    target = PlanTarget(lanes=8, registers=16, cores=2, costs=BSR_WINS)
    plans = plan_layers(imported, target)
    ordered = sorted(plans.values(), key=lambda plan: plan.index)
    assert [(p.op, p.format, p.kernel) for p in ordered] == EXPECTED
    assert [p.index for p in ordered] == list(range(len(EXPECTED)))
    assert ordered[4].reason == "left to TVM: dilation=(2, 2)"
    # the dense FC had no block format: its report row says why first
    assert ordered[6].block_note == "no zero weights: no block format"
    assert ordered[6].record().reason.startswith(ordered[6].block_note + "; dense GEMV")
    # a plan carries the packed weight and the config its kernel runs with
    packed, _kept, block = ordered[2].packing
    want = Mixed().block1x1.weight.detach().numpy()[:, :, 0, 0]
    assert block in BLOCK_SHAPES and np.array_equal(packed.to_dense(), want)


def test_without_a_cost_table_no_layer_is_block_sparse(imported):
    plans = plan_layers(imported, PlanTarget(lanes=8, registers=16, cores=2, costs=None))
    kernels = [p.kernel for p in sorted(plans.values(), key=lambda plan: plan.index)]
    # the block-pruned 1x1 is sparse per group of 8 filters: the lanes kernel takes it
    assert kernels == ["pattern", "conv_gemm", "lanes", "depthwise", "tvm", "gemv", "gemv"]


def test_dense_baseline_plans_every_conv_dense(imported):
    plans = plan_layers(imported, PlanTarget(lanes=8, registers=16, cores=2, sparse=False))
    formats = [p.format for p in sorted(plans.values(), key=lambda plan: plan.index)]
    assert formats == ["dense", "dense", "dense", "depthwise", "tvm", "dense", "dense"]


@pytest.mark.parametrize("size", [7, 28])
def test_dense_convs_kernel_per_isa(size):
    """Dense 1x1 convs on the GEMM; 3x3 in lanes on AVX-512, on AVX2 (32 channels: too few for
    Winograd) on the flat-rows GEMM where its rows fit (28 wide), else in lanes; 7x7 in lanes on
    AVX-512 only."""
    avx2_3x3 = "dense_conv" if size >= 28 else "lanes"
    expected = {1: ("conv_gemm",) * 2, 3: ("lanes", avx2_3x3), 7: ("lanes", "pattern")}
    for k, kernels in expected.items():
        conv = nn.Conv2d(32, 32, k, padding=k // 2).eval()
        mod = import_model(conv, (torch.randn(1, 32, size, size),)).mod
        for (lanes, registers), kernel in zip(((16, 32), (8, 16)), kernels, strict=True):
            (plan,) = plan_layers(mod, PlanTarget(lanes, registers, 2)).values()
            assert plan.kernel == kernel, (k, lanes)


def test_the_pipeline_plans_once_and_the_rewrites_follow_the_plans(imported, monkeypatch):
    monkeypatch.setattr("tvm_sparse.pipeline.load_cost_table", lambda *args: BSR_WINS)
    tgt = resolve_target("x86-avx2")
    plans: dict = {}
    mod = sparse_pipeline(tgt, True, plans)(imported)
    assert plans.keys() == plan_layers(imported, plan_target(tgt, True)).keys()
    kernels = {
        str(gv.name_hint) for gv, f in mod.functions.items() if not isinstance(f, relax.Function)
    }
    assert {k.split("_")[0] for k in kernels} >= {"pattern", "dense", "bsr", "depthwise"}
    # every planned layer is gone but the one left to TVM
    assert not planned_calls(mod, {v: p for v, p in plans.items() if p.kernel != LEFT_TO_TVM})
    remaining = [c for c in planned_calls(mod, plans)]
    assert len(remaining) == 1 and remaining[0].op == tvm.ir.Op.get("relax.nn.conv2d")


def test_compiled_mixed_model_matches_pytorch_and_reports_its_plans(monkeypatch):
    monkeypatch.setattr("tvm_sparse.pipeline.load_cost_table", lambda *args: BSR_WINS)
    model = Mixed().eval()
    cm = tvm_sparse.compile(model, (torch.from_numpy(X),), target="x86-avx2")
    with torch.no_grad():
        want = model(torch.from_numpy(X)).numpy()
    got = cm(X)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    rows = [(r.op, r.format) for r in cm.layers if r.op in ("conv2d", "matmul")]
    assert rows == [(op, fmt) for op, fmt, _ in EXPECTED]
