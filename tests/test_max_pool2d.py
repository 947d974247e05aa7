"""The stride-2 max-pool kernel against PyTorch, and RewriteMaxPool2d as Before / Expected."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from relay_passes.max_pool2d import RewriteMaxPool2d
from schedules.max_pool2d import PoolGeometry, max_pool2d_primfunc
from tvm_sparse.targets import resolve_target

# (batch, channels, height, width, kernel, padding (top, left, bottom, right), lanes)
CASES = [
    (1, 64, 112, 112, (3, 3), (1, 1, 1, 1), 16),  # ResNet's pool after the stem
    (2, 3, 33, 37, (3, 3), (1, 1, 1, 1), 16),  # odd sizes: a last chunk overlapping
    (1, 5, 32, 32, (3, 3), (1, 1, 1, 1), 16),  # one output chunk exactly
    (1, 4, 18, 40, (2, 2), (0, 0, 0, 0), 16),  # 2x2/2, no padding
    (1, 2, 21, 34, (3, 2), (2, 1, 0, 1), 8),  # uneven window and padding, 8 lanes
    (1, 3, 16, 12, (3, 3), (1, 1, 1, 1), 4),  # NEON's 4 lanes
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_torch(case):
    n, c, h, w, kernel, pad, lanes = case
    geom = PoolGeometry(n, c, h, w, kernel, pad)
    func = max_pool2d_primfunc(geom, lanes).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86")).jit()["main"]
    # Every value negative: padding read as 0 instead of -inf would show.
    x = -np.abs(np.random.default_rng(c + w).standard_normal((n, c, h, w))).astype("float32")
    out = tvm.runtime.tensor(np.zeros((n, c, geom.out_height, geom.out_width), "float32"))
    lib(tvm.runtime.tensor(x), out)
    padded = torch.nn.functional.pad(
        torch.from_numpy(x), (pad[1], pad[3], pad[0], pad[2]), value=float("-inf")
    )
    ref = torch.nn.functional.max_pool2d(padded, kernel, 2).numpy()
    np.testing.assert_array_equal(out.numpy(), ref)  # a max is exact


def _module(shape, **pool):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(x, **pool))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    return bb.get()


def test_pass_rewrites_stride_2_pool():
    before = _module((1, 8, 40, 40), pool_size=3, strides=2, padding=1)
    geom = PoolGeometry(1, 8, 40, 40, (3, 3), (1, 1, 1, 1))
    bb = relax.BlockBuilder()
    kernel = bb.add_func(max_pool2d_primfunc(geom, 16, 2), "max_pool2d_s2")
    x = relax.Var("x", relax.TensorType((1, 8, 40, 40), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(kernel, [x], relax.TensorType((1, 8, 20, 20), "float32")))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(RewriteMaxPool2d(16, 2)(before), bb.get())


@pytest.mark.parametrize(
    "shape, pool",
    [
        ((1, 8, 40, 40), {"pool_size": 3, "strides": 1, "padding": 1}),  # stride 1
        ((1, 8, 40, 40), {"pool_size": 3, "strides": 2, "padding": 1, "ceil_mode": True}),
        ((1, 8, 40, 40), {"pool_size": 3, "strides": 2, "dilation": 2}),
        ((1, 8, 12, 12), {"pool_size": 3, "strides": 2, "padding": 1}),  # 6 outputs < 16 lanes
        ((1, 40, 40, 8), {"pool_size": 3, "strides": 2, "padding": 1, "layout": "NHWC"}),
    ],
)
def test_pass_leaves_other_pools_to_tvm(shape, pool):
    before = _module(shape, **pool)
    tvm.ir.assert_structural_equal(RewriteMaxPool2d(16, 2)(before), before)


def test_resnet_stem_and_pool_in_a_compiled_model():
    """A 7x7/2 stem, ReLU and the 3x3/2 pool compiled whole (batch 2): the pool runs on the
    kernel, the output matches PyTorch."""
    import tvm_sparse

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)
    ).eval()
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype("float32")
    cm = tvm_sparse.compile(net, (x,))
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cm(x), ref, rtol=1e-4, atol=1e-4)
    names = [k.name for k in cm.profile(x, runs=1).kernels]
    assert any(name.startswith("max_pool2d_s2") for name in names), names


def test_tuning_leaves_the_pool_kernel_alone():
    """The kernel is final (``tirx.is_scheduled``): no tuning task (MetaSchedule's FLOP
    estimator has no rule for its shuffles), while TVM's own kernels and templates stay."""
    from tvm_sparse.pipeline import lower, prepare
    from tvm_sparse.tuning import tuning_tasks

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, 2, 3), torch.nn.MaxPool2d(3, 2, 1), torch.nn.Sigmoid()
    ).eval()
    x = np.zeros((1, 3, 64, 64), "float32")
    target = resolve_target("x86")
    mod = lower(prepare(net, (x,), target, True)[0], target)
    assert "max_pool2d_s2" in [gv.name_hint for gv in mod.get_global_vars()]
    names = [t.task_name for t in tuning_tasks(mod, target)]
    assert any("conv2d" in n for n in names) and any("sigmoid" in n for n in names), names
    assert not any("pool" in n for n in names), names
