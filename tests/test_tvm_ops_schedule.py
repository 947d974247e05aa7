"""DefaultCPUSchedules: TVM's own kernels get parallel / vector loops and keep their numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import tirx as T

from schedules.tvm_ops import DefaultCPUSchedules
from tvm_sparse.frontend import import_model
from tvm_sparse.pipeline import lower
from tvm_sparse.targets import resolve_target

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _loop_kinds(text: str) -> set[str]:
    """The kinds of the loops in a function's TVMScript."""
    return {kind for kind in ("parallel", "vectorized") if f"T.{kind}(" in text}


class Pools(torch.nn.Module):
    def forward(self, x):
        a = torch.nn.functional.max_pool2d(x, 3, 2, 1)
        b = torch.nn.functional.avg_pool2d(x, 2)
        m = x.mean(dim=(2, 3))
        return torch.relu(a[:, :, :4, :4] + b[:, :, :4, :4]), torch.softmax(m, dim=1)


@pytest.fixture(scope="module")
def scheduled():
    x = torch.randn(2, 32, 64, 64)
    target = resolve_target("x86")
    mod = lower(import_model(Pools().eval(), (x,)).mod, target)
    before = {gv.name_hint: func.script() for gv, func in mod.functions_items()}
    with target:
        return x, before, DefaultCPUSchedules()(mod), target


def test_pool_kernels_become_parallel_and_vectorized(scheduled):
    _, before, after, _ = scheduled
    pools = [name for name in before if "pool" in name]
    assert len(pools) == 2
    for name in pools:
        assert _loop_kinds(before[name]) == set()
        func = after[name]
        assert _loop_kinds(func.script()) == {"parallel", "vectorized"}, func.script()
        assert func.attrs["tirx.is_scheduled"]


def test_scheduled_module_matches_torch(scheduled):
    x, _, after, target = scheduled
    vm = relax.VirtualMachine(tvm.compile(after, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    ref = Pools()(x)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.numpy(), r.numpy(), **TOL)


@T.prim_func(private=True)
def hand_kernel(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
    for i in T.parallel(64):
        b[i] = a[i] * T.float32(2)


def test_hand_scheduled_kernels_are_left_alone():
    mod = tvm.IRModule({"hand": hand_kernel})
    with resolve_target("x86"):
        out = DefaultCPUSchedules()(mod)
    tvm.ir.assert_structural_equal(out["hand"], hand_kernel)
