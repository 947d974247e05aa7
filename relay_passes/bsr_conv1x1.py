"""RewriteBSRConv1x1: a 1x1 ``relax.nn.conv2d`` with a block-sparse constant weight -> BSR kernel.

Takes NCHW / OIHW 1x1 convs (groups 1, no padding, any stride, float32, static shapes) whose
weight, viewed as ``(O, C)``, is block-sparse enough that the BSR kernel is estimated faster than
what RewriteConv2D would run instead (its dense kernel, or its pattern kernel for an
unstructured-sparse 1x1 weight): ``formats.block.choose_block_format`` with the target's cost
table, block shape detected from the weight. The conv and its epilogue (bias, residual add,
ReLU / ReLU6) become one ``call_tir`` to a tunable ``schedules.bsr_matmul.bsr_conv1x1_template``.
Everything else is left for RewriteConv2D (which runs after this pass); ``notes`` get why.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from schedules.bsr_matmul import Conv1x1Geometry, bsr_conv1x1_template, default_bsr_conv_config
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats.block import (
    BlockChoice,
    CostTable,
    choose_conv1x1_format,
    pack_block_weight,
)
from tvm_sparse.report import LayerRecord

from .block_choice import BlockDecisions, block_kernel_args
from .epilogue import EpilogueMatch, describe
from .pattern_conv2d import conv2d_unsupported
from .rewrite import anchored_rewrite_pass
from .utils import add_kernel, const_value, static_shape

NOT_CHOSEN = "kept for RewriteConv2D: "


def conv1x1_unsupported(call: relax.Call) -> str | None:
    """Why the BSR kernel cannot take this conv2d, or None if it can."""
    reason = conv2d_unsupported(call)
    if reason is not None:
        return reason
    if int(call.attrs.groups) != 1:  # (a depthwise weight (O, 1, 1, 1) is no (O, C) matrix)
        return f"groups={int(call.attrs.groups)} (depthwise: RewriteConv2D's kernel)"
    if static_shape(call.args[1])[2:] != (1, 1) or any(int(p) for p in call.attrs.padding):
        return "not a 1x1 conv without padding"
    return None


def _geometry(call: relax.Call) -> Conv1x1Geometry:
    n, c, h, w = static_shape(call.args[0])
    o = static_shape(call.args[1])[0]
    stride = tuple(int(s) for s in call.attrs.strides)
    return Conv1x1Geometry(n, c, h, w, o, stride)


def conv_shape(call: relax.Call) -> str:
    """The report's shape text for a conv (the same as RewriteConv2D's)."""
    geom = _geometry(call)
    return f"{geom.out_channels}x{geom.in_channels}x1x1 s{geom.stride[0]} on {geom.height}x" \
        f"{geom.width}"  # fmt: skip


def RewriteBSRConv1x1(  # noqa: N802 (TVM's pass naming)
    costs: CostTable,
    records: list[LayerRecord] | None = None,
    num_threads: int = 1,
    lanes: int = 16,
    notes: list[tuple[str, str, str]] | None = None,
) -> tvm.transform.Pass:
    """The pass; ``lanes`` is the target's fp32 vector width, ``num_threads`` its cores."""
    records = records if records is not None else []
    notes = notes if notes is not None else []
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def choose(call: relax.Call) -> tuple[BlockChoice, np.ndarray]:
        weight = const_value(call.args[1]).astype(np.float32)
        geom = _geometry(call)
        choice, _, _ = choose_conv1x1_format(weight, geom.batch * geom.pixels, costs)
        return choice, weight.reshape(weight.shape[0], -1)

    decisions = BlockDecisions("conv2d", conv1x1_unsupported, choose, conv_shape, NOT_CHOSEN, notes)

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit) -> relax.Expr:
        conv = match.anchor
        choice, matrix = decisions.decide(conv)
        geom = _geometry(conv)
        r, c = choice.block
        fmt = choice.format
        cfg = default_bsr_conv_config(geom, r, lanes, num_threads, bcr=fmt == "bcr")
        packed, kept = pack_block_weight(matrix, fmt, choice.block, cfg.shares)
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        o, ch, p = geom.out_channels, geom.in_channels, geom.pixels
        name = f"{fmt}_conv1x1_{o}x{ch}_{r}x{c}"
        kernel = add_kernel(
            bb, kernels, (geom, choice.block, packed.num_blocks, epi, cfg, kept), name,
            lambda: bsr_conv1x1_template(
                geom, choice.block, packed.num_blocks, epi, cfg, name, kept, lanes, num_threads
            ),
        )  # fmt: skip
        args = block_kernel_args(match, visit, packed, r, o)
        records.append(
            LayerRecord(
                name=f"conv2d_{len(records)}",
                op="conv2d",
                shape=conv_shape(conv),
                format=fmt,
                density=float((matrix != 0).mean()),
                flops_dense=2 * geom.batch * p * o * ch,
                flops_kept=2 * geom.batch * p * packed.num_blocks * math.prod(kept or (r, c)),
                reason=choice.reason,
                epilogue=describe(match),
            )
        )
        out_shape = (geom.batch, o, geom.out_height, geom.out_width)
        return relax.call_tir(kernel, args, relax.TensorType(out_shape, "float32"))

    return anchored_rewrite_pass(
        "RewriteBSRConv1x1", "relax.nn.conv2d", decisions.unsupported, emit, channel_axis=1,
        on_fallback=decisions.fallback,
    )  # fmt: skip
