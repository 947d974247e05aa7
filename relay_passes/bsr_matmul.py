"""RewriteBSRMatmul: ``relax.matmul(x, W)`` planned for the block kernel -> BSR / BCR kernel.

A linear layer (x of any rank, its leading dims, tokens x batch, being the rows; a constant 2-D
float32 weight ``(K, N)`` as folded from ``linear``) whose weight, viewed as ``(N, K)``, is
block-sparse enough that the BSR kernel is estimated faster than the dense one
(``linear_plan``: the target's cost table, the block shape detected from the weight) is planned
as ``bsr_matmul``. The matmul and its epilogue (bias, residual add, ReLU / ReLU6, GELU) become
one ``call_tir`` to ``schedules.bsr_matmul``. Everything else is left for RewriteDenseMatmul.
"""

from __future__ import annotations

import tvm
from tvm import relax

from schedules.bsr_matmul import bsr_matmul_primfunc
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats.block import CostTable
from tvm_sparse.report import LayerRecord

from .block_choice import block_kernel_args, block_notes
from .epilogue import EpilogueMatch
from .layer_plan import BLOCK_LINEAR_KERNELS, LayerPlan, Plans, PlanTarget
from .plan_layers import planned_rewrite
from .utils import add_kernel


def RewriteBSRMatmul(  # noqa: N802 (TVM's pass naming)
    costs: CostTable,
    records: list[LayerRecord] | None = None,
    num_threads: int = 1,
    notes: list[tuple[str, str, str]] | None = None,
    plans: Plans | None = None,
) -> tvm.transform.Pass:
    """The pass. ``plans`` are the pipeline's (``plan_layers``); without them the pass plans the
    matmuls itself with ``costs``, appends the rows of those it rewrote to ``records`` and
    (op, shape, why) of the linear layers it left dense to ``notes``."""
    target = PlanTarget(cores=num_threads, costs=costs)
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit, plan: LayerPlan) -> relax.Expr:
        (lead, k, n), cfg, fmt = plan.geometry, plan.config, plan.format
        packed, kept, block = plan.packing
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        r, c = block
        name = f"{fmt}_matmul_{k}x{n}_{r}x{c}"
        kernel = add_kernel(
            bb, kernels, (lead, k, n, block, packed.num_blocks, epi, cfg, kept), name,
            lambda: bsr_matmul_primfunc(lead, k, n, block, packed.num_blocks, epi, cfg, name, kept),
        )  # fmt: skip
        args = block_kernel_args(match, visit, packed, r, n)
        return relax.call_tir(kernel, args, relax.TensorType((*lead, n), "float32"))

    return planned_rewrite(
        "RewriteBSRMatmul", "relax.matmul", BLOCK_LINEAR_KERNELS,
        plans, target, emit, channel_axis=-1,
        on_plans=block_notes(BLOCK_LINEAR_KERNELS, records, notes),
    )  # fmt: skip
