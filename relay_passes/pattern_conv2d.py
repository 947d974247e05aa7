"""RewriteConv2D: a ``relax.nn.conv2d`` planned for one of ``CONV_KERNELS`` -> that kernel.

Each conv2d whose plan (``conv_plan.plan_conv2d``) names one of ``CONV_KERNELS`` is replaced,
together with its epilogue (bias add, residual add, ReLU / ReLU6 / clip, GELU), by one
``call_tir``:

- ``pattern``: ``schedules.pattern_conv2d`` on the ``PatternWeight`` (a dense weight is one full
  pattern: a direct conv with a sound vectorized schedule instead of TVM's untuned default);
- ``lanes``: ``schedules.pattern_conv2d_lanes``, a group of filters in the vector lanes;
- ``conv_gemm``: a dense pointwise conv as ``schedules.dense_gemm``'s packed GEMM (a strided
  k x k one: the GEMM over its windows gathered from the input);
- ``dense_conv``: a dense k x k conv on few input channels (a stem) as
  ``schedules.dense_conv2d``'s GEMM over phase-split input rows;
- ``depthwise``: ``schedules.depthwise_conv2d``, one filter per channel, read in place;
- ``winograd``: a dense 3x3 stride-1 conv as ``schedules.winograd_conv2d``'s three calls (input
  transform, batched GEMM, output transform with the epilogue).

Convs planned for the block kernel are ``RewriteBSRConv1x1``'s; the rest stay on TVM's path.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from schedules.dense_conv2d import dense_conv2d_template
from schedules.dense_gemm import conv1x1_gemm_template
from schedules.depthwise_conv2d import depthwise_conv2d_template
from schedules.pattern_conv2d import Epilogue, pattern_conv2d_template
from schedules.pattern_conv2d_lanes import pattern_conv2d_lanes_template
from schedules.winograd_conv2d import (
    POSITIONS,
    winograd_gemm_template,
    winograd_input_primfunc,
    winograd_output_primfunc,
    winograd_tiles,
)
from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch
from .layer_plan import CONV_KERNELS, LEFT_TO_TVM, LayerPlan, Plans, PlanTarget
from .plan_layers import planned_rewrite
from .utils import add_kernel


def _emit_gemm(
    bb: relax.BlockBuilder,
    kernels: dict,
    visit,
    plan: LayerPlan,
    epilogue: tuple[Epilogue, EpilogueMatch],
    cores: int,
) -> relax.Expr:
    """A dense 1x1 conv as ``schedules.dense_gemm``'s packed GEMM template, a strided or
    k x k conv's panels gathered from its input map."""
    geom, cfg = plan.geometry, plan.config
    epi, match = epilogue
    dims, stride = (geom.out_height, geom.out_width), geom.stride[0]
    (kh, kw), padding = geom.kernel, tuple(geom.padding[:2])
    in_dims = (geom.height, geom.width)  # a plain 1x1 conv's are its out_dims
    o, c = geom.out_channels, geom.in_channels
    key = ("gemm", geom.batch, c, o, dims, epi, cfg, stride, in_dims, geom.kernel, padding)
    name = f"dense_conv1x1_{o}x{c}" if kh * kw == 1 else f"window_gemm_conv2d_{o}x{c}x{kh}x{kw}"
    args = (geom.batch, c, o, dims, epi, cfg, cores, name, stride, in_dims)
    kernel = add_kernel(
        bb, kernels, key, name,
        lambda: conv1x1_gemm_template(*args, kernel=geom.kernel, padding=padding),
    )  # fmt: skip
    operands = [visit(match.anchor.args[0]), relax.const(plan.packing), *match.operands(visit)]
    return relax.call_tir(kernel, operands, relax.TensorType((geom.batch, o, *dims), "float32"))


def _emit_direct(
    bb: relax.BlockBuilder,
    kernels: dict,
    visit,
    plan: LayerPlan,
    epilogue: tuple[Epilogue, EpilogueMatch],
) -> relax.Expr:
    """A depthwise conv as ``schedules.depthwise_conv2d``'s template, a few-channel dense conv
    as ``schedules.dense_conv2d``'s: the input as it is, the packed weight, the epilogue's."""
    geom, cfg = plan.geometry, plan.config
    epi, match = epilogue
    kh, kw = geom.kernel
    if plan.kernel == "depthwise":
        name, build = f"depthwise_conv2d_{geom.out_channels}x1x{kh}x{kw}", depthwise_conv2d_template
    else:
        name = f"dense_conv2d_{geom.out_channels}x{geom.in_channels}x{kh}x{kw}"
        build = dense_conv2d_template
    kernel = add_kernel(
        bb, kernels, (plan.kernel, geom, epi, cfg), name, lambda: build(geom, epi, cfg, name)
    )
    args = [visit(match.anchor.args[0]), relax.const(plan.packing), *match.operands(visit)]
    out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
    return relax.call_tir(kernel, args, relax.TensorType(out_shape, "float32"))


def _emit_winograd(
    bb: relax.BlockBuilder,
    kernels: dict,
    visit,
    plan: LayerPlan,
    epilogue: tuple[Epilogue, EpilogueMatch],
    cores: int,
) -> relax.Expr:
    """A dense 3x3 stride-1 conv as Winograd F(2x2, 3x3): the input transform and the batched
    GEMM bound to their own vars, the output transform (with the epilogue) returned."""
    geom, cfg = plan.geometry, plan.config
    epi, match = epilogue
    n, c, o = geom.batch, geom.in_channels, geom.out_channels
    tiles = winograd_tiles(geom)
    name_in, name_gemm, name_out = (
        f"winograd_conv2d_{o}x{c}x3x3_{part}" for part in ("input", "gemm", "output")
    )
    k_in = add_kernel(
        bb, kernels, ("winograd_input", geom, cfg.lanes), name_in,
        lambda: winograd_input_primfunc(geom, cfg.lanes, name_in),
    )  # fmt: skip
    k_gemm = add_kernel(
        bb, kernels, ("winograd_gemm", geom, cfg, cores), name_gemm,
        lambda: winograd_gemm_template(geom, cfg, cores, name_gemm),
    )  # fmt: skip
    k_out = add_kernel(
        bb, kernels, ("winograd_output", geom, epi, cfg.lanes), name_out,
        lambda: winograd_output_primfunc(geom, epi, cfg.lanes, name_out),
    )  # fmt: skip
    v_type = relax.TensorType((n * POSITIONS, c, *tiles), "float32")
    v = bb.emit(relax.call_tir(k_in, [visit(match.anchor.args[0])], v_type))
    m_type = relax.TensorType((n * POSITIONS, o, *tiles), "float32")
    m = bb.emit(relax.call_tir(k_gemm, [v, relax.const(plan.packing)], m_type))
    out_shape = (n, o, geom.out_height, geom.out_width)
    args = [m, *match.operands(visit)]
    return relax.call_tir(k_out, args, relax.TensorType(out_shape, "float32"))


def RewriteConv2D(  # noqa: N802 (TVM's pass naming)
    num_threads: int = 1,
    sparse: bool = True,
    records: list[LayerRecord] | None = None,
    registers: int = 16,
    lanes: int = 8,
    plans: Plans | None = None,
) -> tvm.transform.Pass:
    """The pass. ``plans`` are the pipeline's (``plan_layers``); without them the pass plans
    the convs itself for ``num_threads`` cores (filters are balanced over them) and the
    target's ``registers`` / ``lanes`` (AVX2 16 / 8, AVX-512 32 / 16, NEON 32 / 4), with no
    block formats, ``sparse=False`` running every conv on the dense kernels (the dense
    baseline), and appends the convs' report rows to ``records``."""
    target = PlanTarget(lanes, registers, num_threads, None, sparse)
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit, plan: LayerPlan) -> relax.Expr:
        conv, geom, cfg = match.anchor, plan.geometry, plan.config
        epi = Epilogue(
            bias=match.bias is not None,
            residual=match.residual is not None,
            activation=match.activation,
        )
        if plan.kernel == "conv_gemm":
            return _emit_gemm(bb, kernels, visit, plan, (epi, match), num_threads)
        if plan.kernel == "winograd":
            return _emit_winograd(bb, kernels, visit, plan, (epi, match), num_threads)
        if plan.kernel in ("depthwise", "dense_conv"):
            return _emit_direct(bb, kernels, visit, plan, (epi, match))
        packed = plan.packing
        max_taps = packed.kernel_values.shape[1]
        nonempty = packed.num_kernels > 0
        kh, kw = geom.kernel
        name = f"{plan.format}_conv2d_{geom.out_channels}x{geom.in_channels}x{kh}x{kw}"
        if plan.kernel == "lanes":
            values = packed.lane_values(lanes)
            key = ("lanes", geom, packed.patterns, packed.num_kernels, max_taps, epi, cfg, lanes)

            def build():
                return pattern_conv2d_lanes_template(
                    geom, packed.patterns, packed.num_kernels, max_taps, lanes, epi, cfg, name
                )
        else:
            group = packed.filter_group
            values = packed.kernel_values if nonempty else np.zeros((1, max_taps), "float32")
            key = (geom, packed.patterns, packed.num_kernels, max_taps, epi, cfg, group, lanes)

            def build():
                return pattern_conv2d_template(
                    geom, packed.patterns, packed.num_kernels, max_taps, epi, cfg, name, group,
                    lanes,
                )  # fmt: skip

        kernel = add_kernel(bb, kernels, key, name, build)
        args = [
            visit(conv.args[0]),
            relax.const(packed.kernel_ptr),
            relax.const(packed.kernel_channel if nonempty else np.zeros(1, "int32")),
            relax.const(values),
            relax.const(packed.filter_order),
            *match.operands(visit, lambda bias: bias[packed.filter_order]),
        ]
        out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
        return relax.call_tir(kernel, args, relax.TensorType(out_shape, "float32"))

    def report(planned: list[LayerPlan]) -> None:
        if records is not None:
            mine = [p for p in planned if p.kernel in (*CONV_KERNELS, LEFT_TO_TVM)]
            records.extend(p.record() for p in mine if p.op == "conv2d")

    return planned_rewrite(
        "RewriteConv2D", "relax.nn.conv2d", CONV_KERNELS,
        plans, target, emit, channel_axis=1, on_plans=report,
    )  # fmt: skip
