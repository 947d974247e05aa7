"""The plan of a linear layer, ``relax.matmul(x, W)`` with a constant 2-D weight ``(K, N)`` (as
folded from ``linear``; x of any rank, its leading dims, tokens x batch, being the rows).

A weight block-sparse enough that the BSR / BCR kernel is estimated faster than the dense one
(``formats.block.choose_block_format`` with the target's cost table) -> ``bsr_matmul``;
otherwise the dense GEMM from ``GEMM_MIN_ROWS`` rows (``linear_gemm``) or the GEMV, which
streams the weight once (``gemv``). Other matmuls (non-constant or batched weights) are left to
TVM.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from schedules.bsr_matmul import default_bsr_matmul_config
from schedules.dense_gemm import default_gemm_config, pack_columns
from schedules.dense_matmul import default_matmul_config, pack_weight
from tvm_sparse.formats.block import choose_block_format, pack_block_weight

from .block_choice import BLOCK_FORMATS
from .layer_plan import LEFT_TO_TVM, LayerPlan, PlanTarget
from .utils import const_value, static_shape

# Rows (tokens x batch) from which the GEMM's register tile beats the GEMV kernel, which
# streams the weight once: 16 x 512 -> 1000 ties; 128 tokens of a 768-wide encoder run
# 1.6-3x faster on the GEMM (Intel Xeon, AVX-512, one thread).
GEMM_MIN_ROWS = 16
# Over tokens a block format must be estimated this much faster than the dense GEMM. The table's
# BSR kernels run on weights that stay in cache; a model's do not: a 4-layer encoder (768 / 3072,
# 128 tokens) at 50 % of 16x1 blocks was estimated 1.12x faster than dense and ran 0.92x in the
# model (19.6 vs 18.0 ms, AMD Zen 5, AVX-512, 2 threads); at 80 % and 90 % BSR is 2-4x faster.
LINEAR_MARGIN = 1.25


def linear_unsupported(call: relax.Call) -> str | None:
    """Why the linear kernels cannot take this matmul: they take x of any rank (its leading
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


def matmul_shape(k: int, n: int, rows: int) -> str:
    """The report's shape text of a linear layer."""
    return f"{k}x{n} (batch {rows})"


def plan_matmul(call: relax.Call, index: int, target: PlanTarget) -> LayerPlan:
    """The plan of one matmul call (``index``: its position in graph order)."""
    reason = linear_unsupported(call)
    if reason is not None:
        shape = static_shape(call.args[1])
        text = "x".join(str(d) for d in shape) if shape is not None else "?"
        return LayerPlan(index, "matmul", text, LEFT_TO_TVM, LEFT_TO_TVM, f"left to TVM: {reason}")
    weight = const_value(call.args[1]).astype(np.float32)
    *lead, k = static_shape(call.args[0])
    lead, m, n = tuple(lead), math.prod(lead), weight.shape[1]
    dims = (lead, k, n)
    note = ""
    if target.sparse and target.costs is not None:
        matrix = np.ascontiguousarray(weight.T)  # (N, K)
        # over tokens the dense alternative is the GEMM: its own measured kinds where the table
        # has them ("linear_*", with LINEAR_MARGIN), else the batch-1 ones
        if m >= GEMM_MIN_ROWS and "linear_dense" in target.costs.entries:
            choice = choose_block_format(matrix, target.costs, "linear", m, margin=LINEAR_MARGIN)
        else:
            choice = choose_block_format(matrix, target.costs, "fc", work=m)
        if choice.format in BLOCK_FORMATS:
            cfg = default_bsr_matmul_config(m, target.cores)
            packed, kept = pack_block_weight(matrix, choice.format, choice.block, cfg.shares)
            kept_flops = 2 * m * packed.num_blocks * math.prod(kept or choice.block)
            return LayerPlan(
                index, "matmul", matmul_shape(k, n, m), choice.format, "bsr_matmul",
                choice.reason, float((matrix != 0).mean()), 2 * m * k * n, kept_flops,
                geometry=dims, packing=(packed, kept, choice.block), config=cfg,
            )  # fmt: skip
        note = choice.reason
    if m >= GEMM_MIN_ROWS or len(lead) > 1:
        cfg = default_gemm_config(target.lanes, target.registers)
        kernel, packing, why = (
            "linear_gemm",
            pack_columns(weight, cfg.width),
            "dense GEMM over the rows",
        )
    else:
        cfg = default_matmul_config(m, target.lanes)
        kernel, packing, why = "gemv", pack_weight(weight, cfg), "dense GEMV (weight streamed once)"
    return LayerPlan(
        index, "matmul", matmul_shape(k, n, m), "dense", kernel, why,
        float((weight != 0).mean()), 2 * m * k * n, 2 * m * k * n,
        geometry=dims, packing=packing, config=cfg, block_note=note,
    )  # fmt: skip
