"""Building and measuring tuning candidates: realize templates before building, feed the
sparse kernels their real index arrays (random ones read out of bounds), cross-export for ARM."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.driver import build as tvm_build
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

from relay_passes.utils import const_value
from schedules.tunable import realize_module, tunable_block
from tvm_sparse import toolchain
from tvm_sparse.targets import ANDROID_TRIPLE, is_arm

Signature = tuple[tuple[str, tuple[int, ...]], ...]
ArgTable = dict[Signature, list]


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """MetaSchedule ``f_build``: realize templates, then TVM's build (without importing the
    tensor intrinsics, which alone takes ~30 s on 2 cores)."""
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(realize_module(mod))
    return tvm_build(mod, target=target)


def cross_export(target: str) -> Callable[[tvm.runtime.Module], str]:
    """MetaSchedule ``f_export`` for a cross target ("arm64" / "android"): a shared library
    linked by the toolchain ``tvm_sparse.toolchain`` finds (Android NDK, aarch64 gcc or clang +
    lld)."""

    def export(lib: tvm.runtime.Module) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="tvm-sparse-tune-"), "candidate.so")
        lib.export_library(path, fcompile=toolchain.fcompile_for(target))
        return path

    return export


def make_builder(target: tvm.target.Target, max_workers: int, timeout: float = 120.0):
    f_export = None
    if is_arm(target):
        android = str(target.attrs["mtriple"]) == ANDROID_TRIPLE
        f_export = cross_export("android" if android else "arm64")
    return ms.builder.LocalBuilder(
        max_workers=max_workers, timeout_sec=timeout, f_build=build_candidate, f_export=f_export
    )


def signature(args_info) -> Signature:
    """A kernel's argument signature, from MetaSchedule's JSON ``args_info`` or (dtype, shape)."""
    out = []
    for info in args_info:
        dtype, shape = (info[1], info[2]) if info and info[0] == "TENSOR" else info
        out.append((str(dtype), tuple(int(d) for d in shape)))
    return tuple(out)


def real_arguments(mod: tvm.IRModule) -> ArgTable:
    """For each template called by the (legalized) Relax module: its constant arguments (index
    arrays, values, bias) by argument signature; None where random data will do."""
    table: ArgTable = {}

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if call.op.same_as(tvm.ir.Op.get("relax.call_tir")):
                gv, args = call.args[0], list(call.args[1].fields)
                if tunable_block(mod[gv]) is not None:
                    infos = [(a.ty.dtype, [int(d) for d in a.ty.shape.values]) for a in args]
                    out = call.ty
                    infos.append((out.dtype, [int(d) for d in out.shape.values]))
                    values = [const_value(a) for a in args]
                    table.setdefault(signature(infos), [*values, None])
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Calls().visit_expr(func)
    return table


def _random(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)  # indices of TVM kernels: 0 is always in bounds


def _allocate(table: ArgTable, device, args_info, alloc_repeat: int) -> list:
    """Real arrays where the table has them, random ones elsewhere, generated here and copied
    to ``device`` (a device runtime, e.g. the Android RPC app, may lack TVM's random fill)."""
    real = table.get(signature(args_info), [None] * len(args_info))
    rng = np.random.default_rng(0)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info, value in zip(args_info, real, strict=True):
            if value is None:
                value = _random(str(info[1]), tuple(int(d) for d in info[2]), rng)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(value), device))
        repeated.append(args)
    return repeated


def local_alloc(table: ArgTable):
    """``f_alloc_argument`` for ``LocalRunner``: real index data, random tensors elsewhere."""

    def alloc(device, args_info, alloc_repeat):
        return _allocate(table, device, args_info, alloc_repeat)

    return alloc


def rpc_alloc(table: ArgTable):
    """``f_alloc_argument`` for ``RPCRunner`` (the session comes first)."""

    def alloc(_session, device, args_info, alloc_repeat):
        return _allocate(table, device, args_info, alloc_repeat)

    return alloc


EVALUATOR = ms.runner.EvaluatorConfig(number=5, repeat=1, min_repeat_ms=50)


def make_runner(table: ArgTable, rpc: tuple[str, int, str] | None = None, timeout: float = 60):
    """A local runner, or an RPC runner through the tracker ``(host, port, key)``."""
    if rpc is None:
        return ms.runner.LocalRunner(
            timeout_sec=timeout, evaluator_config=EVALUATOR, f_alloc_argument=local_alloc(table)
        )
    host, port, key = rpc
    config = ms.runner.RPCConfig(
        tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(timeout)
    )
    return ms.runner.RPCRunner(
        rpc_config=config,
        evaluator_config=EVALUATOR,
        max_workers=1,
        f_alloc_argument=rpc_alloc(table),
    )
