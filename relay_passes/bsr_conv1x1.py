"""RewriteBSRConv1x1: a 1x1 ``relax.nn.conv2d`` planned for the block kernel -> BSR / BCR kernel.

A 1x1 conv (NCHW / OIHW, groups 1, no padding, any stride, float32, static shapes) whose weight,
viewed as ``(O, C)``, is block-sparse enough that the BSR / BCR kernel is estimated faster than
what RewriteConv2D would run instead (``conv_plan``: the target's cost table, block shape
detected from the weight) is planned as ``bsr_conv1x1``. The conv and its epilogue (bias,
residual add, ReLU / ReLU6) become one ``call_tir`` to a tunable
``schedules.bsr_matmul.bsr_conv1x1_template``. Everything else is left for RewriteConv2D.
"""

from __future__ import annotations

import tvm
from tvm import relax

from schedules.bsr_matmul import bsr_conv1x1_template
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats.block import CostTable
from tvm_sparse.report import LayerRecord

from .block_choice import block_kernel_args, block_notes
from .epilogue import EpilogueMatch
from .layer_plan import BLOCK_CONV_KERNELS, LayerPlan, Plans, PlanTarget
from .plan_layers import planned_rewrite
from .utils import add_kernel


def RewriteBSRConv1x1(  # noqa: N802 (TVM's pass naming)
    costs: CostTable,
    records: list[LayerRecord] | None = None,
    num_threads: int = 1,
    lanes: int = 16,
    notes: list[tuple[str, str, str]] | None = None,
    plans: Plans | None = None,
) -> tvm.transform.Pass:
    """The pass; ``lanes`` is the target's fp32 vector width, ``num_threads`` its cores.
    ``plans`` are the pipeline's (``plan_layers``); without them the pass plans the convs
    itself with ``costs``, appends the rows of the convs it rewrote to ``records`` and
    (op, shape, why) of the 1x1 convs it left to ``notes``."""
    target = PlanTarget(lanes=lanes, cores=num_threads, costs=costs)  # (registers: other kernels)
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit, plan: LayerPlan) -> relax.Expr:
        geom, cfg, fmt = plan.geometry, plan.config, plan.format
        packed, kept, block = plan.packing
        r, c = block
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        o, ch = geom.out_channels, geom.in_channels
        name = f"{fmt}_conv1x1_{o}x{ch}_{r}x{c}"
        kernel = add_kernel(
            bb, kernels, (geom, block, packed.num_blocks, epi, cfg, kept), name,
            lambda: bsr_conv1x1_template(
                geom, block, packed.num_blocks, epi, cfg, name, kept, lanes, num_threads
            ),
        )  # fmt: skip
        args = block_kernel_args(match, visit, packed, r, o)
        out_shape = (geom.batch, o, geom.out_height, geom.out_width)
        return relax.call_tir(kernel, args, relax.TensorType(out_shape, "float32"))

    return planned_rewrite(
        "RewriteBSRConv1x1", "relax.nn.conv2d", BLOCK_CONV_KERNELS,
        plans, target, emit, channel_axis=1,
        on_plans=block_notes(BLOCK_CONV_KERNELS, records, notes),
    )  # fmt: skip
