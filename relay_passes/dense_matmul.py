"""RewriteDenseMatmul: ``relax.matmul(x, W)`` with a constant 2-D weight -> a scheduled kernel.

Fully connected layers (``linear`` imports as ``matmul(x, permute_dims(W))``, folded to a
constant (K, N) weight) otherwise run on TVM's untuned default loops. The matmul and its
epilogue (bias, residual add, ReLU / ReLU6) become one ``call_tir`` to
``schedules.dense_matmul``; anything else (non-constant weight, batched or N-D operands) is left
to TVM. Block-sparse weights are a later, separate pass.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from schedules.dense_gemm import (
    GemmConfig,
    default_gemm_config,
    linear_gemm_primfunc,
    pack_columns,
    padded,
)
from schedules.dense_matmul import (
    default_matmul_config,
    dense_matmul_primfunc,
    pack_weight,
    padded_columns,
)
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch, describe
from .rewrite import anchored_rewrite_pass
from .utils import add_kernel, const_value, static_shape


def linear_unsupported(call: relax.Call) -> str | None:
    """Why the dense kernels cannot take this matmul: they take x of any rank (its leading
    dims are rows: tokens x batch) times a constant 2-D weight."""
    weight = const_value(call.args[1])
    if weight is None:
        return "weight is not a constant"
    x_shape = static_shape(call.args[0])
    if weight.ndim != 2 or x_shape is None or len(x_shape) < 2:
        return f"operands {x_shape} x {weight.shape} (only N-D x constant 2-D)"
    if weight.dtype != np.float32 or call.args[0].ty.dtype != "float32":
        return "dtype (only float32)"
    return None


# Rows (tokens x batch) from which the GEMM's register tile beats the GEMV kernel, which
# streams the weight once: 16 x 512 -> 1000 ties; 128 tokens of a 768-wide encoder run
# 1.6-3x faster on the GEMM (Intel Xeon, AVX-512, one thread).
GEMM_MIN_ROWS = 16


def RewriteDenseMatmul(  # noqa: N802 (TVM's pass naming)
    records: list[LayerRecord] | None = None,
    lanes: int = 16,
    registers: int = 32,
    cores: int = 1,
) -> tvm.transform.Pass:
    """The pass; ``lanes`` / ``registers`` are the target's fp32 vector width and vector
    registers, ``cores`` the threads the GEMM's jobs are balanced over."""
    records = records if records is not None else []
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit) -> relax.Expr:
        call = match.anchor
        *lead, k = static_shape(call.args[0])
        m = math.prod(lead)
        weight = const_value(call.args[1]).astype(np.float32)
        n = weight.shape[1]
        if m >= GEMM_MIN_ROWS or len(lead) > 1:
            cfg = default_gemm_config(lanes, registers)
            out = _emit_gemm(bb, kernels, visit, match, weight, cfg, cores)
            records.append(_record(len(records), match, weight, m, "dense GEMM over the rows"))
            return out
        cfg = default_matmul_config(m, lanes)
        n_pad = padded_columns(n, cfg)
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        name = f"dense_matmul_{k}x{n}"
        kernel = add_kernel(
            bb, kernels, (m, k, n, epi, cfg), name,
            lambda: dense_matmul_primfunc(m, k, n, epi, cfg, name),
        )  # fmt: skip
        args = [visit(call.args[0]), relax.const(pack_weight(weight, cfg))]
        if match.bias is not None:
            args.append(relax.const(np.pad(match.bias, (0, n_pad - n))))
        if match.residual is not None:
            args.append(visit(match.residual))
        records.append(_record(len(records), match, weight, m, "dense GEMV (weight streamed once)"))
        return relax.call_tir(kernel, args, relax.TensorType((m, n), "float32"))

    return anchored_rewrite_pass(
        "RewriteDenseMatmul", "relax.matmul", linear_unsupported, emit, channel_axis=-1
    )


def _emit_gemm(
    bb: relax.BlockBuilder,
    kernels: dict,
    visit,
    match: EpilogueMatch,
    weight: np.ndarray,
    cfg: GemmConfig,
    cores: int,
) -> relax.Expr:
    """``x @ W`` (+ epilogue) as ``schedules.dense_gemm``'s linear GEMM, W packed per tile."""
    x = match.anchor.args[0]
    *lead, k = static_shape(x)
    lead, n = tuple(lead), weight.shape[1]
    epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
    name = f"dense_linear_{k}x{n}"
    kernel = add_kernel(
        bb, kernels, ("gemm", lead, k, n, epi, cfg), name,
        lambda: linear_gemm_primfunc(lead, k, n, epi, cfg, cores, name),
    )  # fmt: skip
    args = [visit(x), relax.const(pack_columns(weight, cfg.width))]
    if match.bias is not None:
        args.append(relax.const(np.pad(match.bias, (0, padded(n, cfg) - n))))
    if match.residual is not None:
        args.append(visit(match.residual))
    return relax.call_tir(kernel, args, relax.TensorType((*lead, n), "float32"))


def _record(
    index: int, match: EpilogueMatch, weight: np.ndarray, m: int, kernel: str
) -> LayerRecord:
    """The report row of a rewritten matmul."""
    k, n = weight.shape
    return LayerRecord(
        name=f"matmul_{index}",
        op="matmul",
        shape=f"{k}x{n} (batch {m})",
        format="dense",
        density=float((weight != 0).mean()),
        flops_dense=2 * m * k * n,
        flops_kept=2 * m * k * n,
        reason=kernel,
        epilogue=describe(match),
    )
