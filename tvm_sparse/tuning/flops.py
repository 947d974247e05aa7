"""FLOP counts of tvm-sparse's templates, in the form MetaSchedule reads them.

Every tuning task's FLOPs come from ``s_tir.analysis.EstimateTIRFlops`` on the task module: the
``TaskRecord`` of ``tune_tasks``' scheduler calls it once per task (its GFLOP/s column). The
estimator walks the TIR and has no rule for vector nodes (``Shuffle``, ``Broadcast``, ``Ramp``):
a template whose analysed body is vector code (AVX2's 8-lane paths, the segmented staging, the
filters-in-lanes kernel) stops it with ``Do not have a default for prim.Shuffle``. A PrimFunc
attribute ``estimated_flops`` (an int) replaces the walk, so each template carries its useful
FLOPs: 2 x the multiply-adds of its kept weights, read from the packed weight the model passes
it (for the same reason, the walk's count over data-dependent loops is meaningless anyway).

The attribute is part of the workload MetaSchedule keys records by, so every path that tunes
or applies records annotates the lowered module with ``annotate_flops``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, s_tir, tirx

from relay_passes.utils import const_value
from schedules.bsr_matmul import Conv1x1Geometry
from schedules.pattern_conv2d import ConvGeometry
from schedules.tunable import FLOPS_ATTR, PARAMS_ATTR, kernel_name, tunable_block

__all__ = ["FLOPS_ATTR", "UntunableKernelWarning", "annotate_flops", "estimate_flops"]


class UntunableKernelWarning(UserWarning):
    """A kernel MetaSchedule cannot analyse is left out of tuning (built at its default)."""


def _pattern_conv(params: dict, args: list[relax.Expr]) -> int:
    """2 x (multiply-adds per output pixel) x pixels; per pixel, each kept kernel contributes
    its pattern's taps (``kernel_ptr``, the call's second argument, counts the kernels of each
    (filter, pattern)); without the constant, every kernel counts its padded ``max_taps``."""
    geom = ConvGeometry.from_json(params["geom"])
    ptr = const_value(args[1]) if len(args) > 1 else None
    sizes = [len(p) for p in params["patterns"]]
    if ptr is not None and ptr.ndim == 2 and ptr.shape[1] == len(sizes) + 1:
        taps = int(np.diff(ptr.astype(np.int64), axis=1).sum(0) @ np.array(sizes, np.int64))
    else:
        taps = params["num_kernels"] * params["max_taps"]
    return 2 * geom.batch * geom.out_height * geom.out_width * taps


def _bsr_conv1x1(params: dict, _args: list[relax.Expr]) -> int:
    """2 x pixels x the stored blocks' entries (BCR: the kept rows x columns of each block)."""
    g = params["geom"]
    geom = Conv1x1Geometry(**{**g, "stride": tuple(g["stride"])})
    entries = math.prod(params["kept"] or params["block"])
    return 2 * geom.batch * geom.pixels * params["num_blocks"] * entries


def _dense_conv1x1(params: dict, _args: list[relax.Expr]) -> int:
    """2 x pixels x the weight's entries (the dense GEMM computes every one, a k x k conv's
    taps too); Winograd's GEMM carries the direct conv's."""
    if "useful_flops" in params:
        return params["useful_flops"]
    pixels, taps = math.prod(params["out_dims"]), math.prod(params.get("kernel", (1, 1)))
    return 2 * params["batch"] * pixels * params["out_channels"] * params["in_channels"] * taps


def _dense_linear(params: dict, _args: list[relax.Expr]) -> int:
    """2 x tokens x the weight's entries."""
    return 2 * math.prod(params["lead"]) * params["k"] * params["n"]


def _direct_conv(geom: ConvGeometry, channels_per_filter: int) -> int:
    """2 x output pixels x filters x the taps of each filter's channels (every one computed)."""
    kh, kw = geom.kernel
    pixels = geom.batch * geom.out_height * geom.out_width
    return 2 * pixels * geom.out_channels * channels_per_filter * kh * kw


def _depthwise_conv(params: dict, _args: list[relax.Expr]) -> int:
    """One channel per filter."""
    return _direct_conv(ConvGeometry.from_json(params["geom"]), 1)


def _dense_conv(params: dict, _args: list[relax.Expr]) -> int:
    """Every input channel per filter."""
    geom = ConvGeometry.from_json(params["geom"])
    return _direct_conv(geom, geom.in_channels)


FLOP_COUNTS: dict[str, Callable[[dict, list[relax.Expr]], int]] = {
    "pattern_conv2d": _pattern_conv,
    "pattern_conv2d_lanes": _pattern_conv,
    "bsr_conv1x1": _bsr_conv1x1,
    "dense_conv1x1": _dense_conv1x1,
    "dense_linear": _dense_linear,
    "depthwise_conv2d": _depthwise_conv,
    "dense_conv2d": _dense_conv,
}


def template_flops(func: tirx.PrimFunc, args: list[relax.Expr]) -> int | None:
    """A template's FLOPs for a call with ``args`` (None: not a template, or of a kind with no
    count here). At least 1, as MetaSchedule clamps its estimates."""
    block = tunable_block(func)
    count = FLOP_COUNTS.get(kernel_name(block)) if block is not None else None
    if count is None:
        return None
    return max(1, int(count(json.loads(str(func.attrs[PARAMS_ATTR])), args)))


def _template_calls(mod: tvm.IRModule) -> dict[tvm.ir.GlobalVar, list[relax.Expr]]:
    """Each template of ``mod`` called from a Relax function: the arguments of its first call."""
    calls: dict[tvm.ir.GlobalVar, list[relax.Expr]] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            if call.op.same_as(call_tir) and tunable_block(mod[call.args[0]]) is not None:
                calls.setdefault(call.args[0], list(call.args[1].fields))
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Calls().visit_expr(func)
    return calls


def annotate_flops(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` (lowered) with each template's FLOPs as its ``estimated_flops`` attribute."""
    updates = {}
    for gv, args in _template_calls(mod).items():
        flops = template_flops(mod[gv], args)
        if flops is not None:
            updates[gv] = mod[gv].with_attr(FLOPS_ATTR, flops)
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


def estimate_flops(task_mod: tvm.IRModule) -> float:
    """What MetaSchedule's task scheduler estimates for a task module (its ``TaskRecord``:
    ``max(1, EstimateTIRFlops(mod))``); raises ``tvm.error.TVMError`` where it cannot."""
    return max(1.0, float(s_tir.analysis.estimate_tir_flops(task_mod)))
