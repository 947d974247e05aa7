"""RewriteDenseMatmul: ``relax.matmul(x, W)`` planned dense -> the GEMM or the GEMV kernel.

Fully connected layers (``linear`` imports as ``matmul(x, permute_dims(W))``, folded to a
constant (K, N) weight) otherwise run on TVM's untuned default loops. A matmul planned
``linear_gemm`` / ``gemv`` (``linear_plan``) and its epilogue (bias, residual add, ReLU / ReLU6,
GELU) become one ``call_tir`` to ``schedules.dense_gemm`` / ``schedules.dense_matmul``;
anything else (non-constant weight, batched operands) is left to TVM.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from schedules.dense_linear import linear_gemm_template, padded
from schedules.dense_matmul import dense_matmul_primfunc, padded_columns
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch
from .layer_plan import LINEAR_KERNELS, LayerPlan, Plans, PlanTarget
from .plan_layers import planned_rewrite
from .utils import add_kernel


def RewriteDenseMatmul(  # noqa: N802 (TVM's pass naming)
    records: list[LayerRecord] | None = None,
    lanes: int = 16,
    registers: int = 32,
    cores: int = 1,
    plans: Plans | None = None,
) -> tvm.transform.Pass:
    """The pass; ``lanes`` / ``registers`` are the target's fp32 vector width and vector
    registers, ``cores`` the threads the GEMM's jobs are balanced over. ``plans`` are the
    pipeline's (``plan_layers``); without them the pass plans the matmuls itself (no block
    formats) and appends their report rows to ``records``."""
    target = PlanTarget(lanes, registers, cores)
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit, plan: LayerPlan) -> relax.Expr:
        (lead, k, n), cfg, x = plan.geometry, plan.config, match.anchor.args[0]
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        if plan.kernel == "linear_gemm":
            name, n_pad = f"dense_linear_{k}x{n}", padded(n, cfg)
            kernel = add_kernel(
                bb, kernels, ("gemm", lead, k, n, epi, cfg), name,
                lambda: linear_gemm_template(lead, k, n, epi, cfg, cores, name),
            )  # fmt: skip
        else:
            m, name, n_pad = lead[0], f"dense_matmul_{k}x{n}", padded_columns(n, cfg)
            kernel = add_kernel(
                bb, kernels, (m, k, n, epi, cfg), name,
                lambda: dense_matmul_primfunc(m, k, n, epi, cfg, name),
            )  # fmt: skip
        pad = (0, n_pad - n)
        args = [
            visit(x),
            relax.const(plan.packing),
            *match.operands(visit, lambda b: np.pad(b, pad)),
        ]
        return relax.call_tir(kernel, args, relax.TensorType((*lead, n), "float32"))

    def report(planned: list[LayerPlan]) -> None:
        if records is not None:
            records.extend(p.record() for p in planned if p.kernel in LINEAR_KERNELS)

    return planned_rewrite(
        "RewriteDenseMatmul", "relax.matmul", LINEAR_KERNELS,
        plans, target, emit, channel_axis=-1, on_plans=report,
    )  # fmt: skip
