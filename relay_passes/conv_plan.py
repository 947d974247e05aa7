"""The plan of a ``relax.nn.conv2d`` layer: which kernel runs it, on which packed weight.

In order, for an NCHW / OIHW conv with a constant float32 weight (groups 1 or depthwise,
dilation 1, static shapes; anything else is left to TVM):

1. a 1x1 conv whose weight is block-sparse enough that the BSR / BCR kernel is estimated faster
   than what would run instead (``formats.block.choose_conv1x1_format``, the target's cost
   table) -> ``bsr_conv1x1`` (``schedules.bsr_matmul``);
2. a depthwise conv (one filter per channel) -> ``depthwise`` (``schedules.depthwise_conv2d``);
3. otherwise the weight's format (``formats.sparsity.choose_conv_format``: pattern or dense),
   packed as ``PatternWeight``, and its kernel:
   the packed GEMM (``conv_gemm``; on AVX2 over K in passes, ``dense_gemm.gemm_k_block``) for
   dense pointwise convs, the GEMM over phase-split input
   rows (``dense_conv``) for dense k x k convs on at most ``FEW_CHANNELS`` input channels (a
   stem); on 16-register targets (AVX2) Winograd F(2x2, 3x3) (``winograd``,
   ``schedules.winograd_conv2d``) for the dense 3x3 stride-1 convs where it pays
   (``winograd_pays``), the packed GEMM over gathered windows (``conv_gemm``, an implicit
   GEMM: ``schedules.gemm_panels.Window``) for the strided ones, and the flat-rows GEMM
   (``dense_conv``) for the other dense k x k convs its rows fit
   (``dense_conv2d.flat_rows_fit``); the filters-in-lanes kernel (``lanes``) where the
   filters share kernels in groups of the target's lanes (``_lanes_format``), else the
   per-pixel pattern kernel (``pattern``).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from schedules.bsr_matmul import Conv1x1Geometry, default_bsr_conv_config
from schedules.dense_conv2d import (
    default_dense_conv_config,
    default_flat_conv_config,
    flat_rows_fit,
    pack_dense_conv,
)
from schedules.dense_gemm import GemmConfig, conv1x1_gemm_config, pack_rows
from schedules.depthwise_conv2d import default_depthwise_config, pack_depthwise
from schedules.pattern_conv2d import ConvGeometry, default_config, tile_defaults
from schedules.pattern_conv2d_lanes import lanes_default_config
from schedules.winograd_conv2d import (
    default_winograd_config,
    pack_winograd_weight,
    winograd_fits,
    winograd_pays,
)
from tvm_sparse.formats import PatternWeight, choose_conv_format, conv_sparsity
from tvm_sparse.formats.block import choose_conv1x1_format, pack_block_weight

from .block_choice import BLOCK_FORMATS
from .layer_plan import LEFT_TO_TVM, LayerPlan, PlanTarget
from .utils import const_value, static_shape


def conv2d_unsupported(call: relax.Call) -> str | None:
    """Why tvm-sparse's conv kernels cannot take this conv2d, or None if they can."""
    attrs = call.attrs
    if const_value(call.args[1]) is None:
        return "weight is not a constant"
    if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "OIHW") or attrs.out_layout != "NCHW":
        return f"layout {attrs.data_layout}/{attrs.kernel_layout} (only NCHW/OIHW)"
    groups = int(attrs.groups)
    o, c_per_group = static_shape(call.args[1])[:2]
    if groups != 1 and not (c_per_group == 1 and o == groups):
        return f"groups={groups} (grouped conv; only depthwise with multiplier 1 is taken)"
    if any(int(d) != 1 for d in attrs.dilation):
        return f"dilation={tuple(int(d) for d in attrs.dilation)}"
    if static_shape(call.args[0]) is None or len(static_shape(call.args[0])) != 4:
        return "input shape is not static"
    if call.args[0].ty.dtype != "float32" or str(attrs.out_dtype) not in (
        "float32",
        "",
        "None",
        "void",
    ):
        return f"dtype {call.args[0].ty.dtype} -> {attrs.out_dtype} (only float32)"
    return None


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


def conv_geometry(call: relax.Call) -> ConvGeometry:
    n, c, h, w = static_shape(call.args[0])
    o, _, kh, kw = static_shape(call.args[1])
    attrs = call.attrs
    return ConvGeometry(
        batch=n,
        in_channels=c,
        height=h,
        width=w,
        out_channels=o,
        kernel=(kh, kw),
        stride=tuple(int(s) for s in attrs.strides),
        padding=tuple(int(p) for p in attrs.padding),
    )


def conv1x1_geometry(call: relax.Call) -> Conv1x1Geometry:
    n, c, h, w = static_shape(call.args[0])
    o = static_shape(call.args[1])[0]
    return Conv1x1Geometry(n, c, h, w, o, tuple(int(s) for s in call.attrs.strides))


def conv_shape(geom: ConvGeometry | Conv1x1Geometry, depthwise: bool = False) -> str:
    """The report's shape text of a conv."""
    kh, kw = getattr(geom, "kernel", (1, 1))
    c = 1 if depthwise else geom.in_channels
    return f"{geom.out_channels}x{c}x{kh}x{kw} s{geom.stride[0]} on {geom.height}x{geom.width}"


# Dense k x k convs on at most this many input channels run on ``schedules.dense_conv2d``. AMD
# Zen 5, 2 threads, kernels alone + bias + ReLU against the filters-in-lanes kernel: ResNet's
# 7x7 stem (3 -> 64, stride 2) 0.72 -> 0.53 ms (447 GFLOP/s, 88 % of the FMA peak), AVX2 build
# 1.64 -> 1.10 ms (82 % of the AVX2 peak); MobileNetV2's 3 -> 32 3x3 stride 2 0.157 -> 0.056 ms;
# VGG's 3 -> 64 3x3 on 224x224 1.35 -> 0.42 ms.
FEW_CHANNELS = 4

# Dense k x k convs on targets of at most this many vector registers (AVX2) run on the flat-rows
# GEMM where its rows fit (``dense_conv2d.flat_rows_fit``, which has the measurements): there
# the filters-in-lanes kernel's tile (8 pixels of 8 filters, 9 tap weights) outgrows the
# registers. With 32 (AVX-512, NEON) the lanes kernel keeps them (not measured on the GEMM).
FLAT_ROWS_REGISTERS = 16

# Dense 3x3 stride-1 convs on targets of at most this many vector registers (AVX2) run as
# Winograd F(2x2, 3x3) where it pays. With 32 (AVX-512, NEON) not measured: the lanes kernel
# reads 1.5-2.6x ORT on AVX-512.
WINOGRAD_REGISTERS = 16

# Dense strided k x k convs of at least this many filters on targets of at most this many
# vector registers (AVX2) run as the packed GEMM over their windows, gathered per job and pass
# over K (``_window_gemm``): the gather's scalar copy per element is shared by the filters.
WINDOW_GEMM_REGISTERS = 16
WINDOW_GEMM_MIN_FILTERS = 256

LANES_KERNEL_LANES = (8, 16)  # AVX2 and AVX-512 (NEON's 4 lanes not measured)


def _lanes_format(fmt: str, geom: ConvGeometry, lanes: int) -> bool:
    """Whether a conv packed as ``fmt`` (its filters grouped by the target's 16 or 8 lanes) runs
    on the filters-in-lanes kernel: pattern-sparse ones; dense ones but 1x1 convs, which are a
    GEMM, and at 8 lanes (AVX2) only dense 3x3 convs.

    Against the per-pixel kernel: AVX2 build (8 lanes) on AMD Zen 5, 2 threads, ResNet-18's 3x3
    layers pattern-pruned per group of 8 filters 1.0-2.3x, dense 1.05-3.1x (150-190 GFLOP/s,
    65-80 % of the AVX2 FMA peak), but the dense 7x7 stem (3 -> 64, stride 2, + bias) 0.38x
    (3.37 vs 1.28 ms; PyTorch pinned to AVX2 1.10); AVX-512 VM, 2 threads, dense 3x3 layers
    1.5-2.6x (350-400 GFLOP/s), the 7x7 stem 1.34x. Against the packed GEMM, dense 1x1 convs
    with + ReLU on AMD Zen 5, AVX-512, 2 threads: on 7x7 maps the GEMM is 1.2-1.6x faster
    (ResNet-50's 512x2048 0.297 vs 0.445 ms, ONNX Runtime 0.277; MobileNetV2's 1280x320 0.105
    vs 0.164 ms, ORT 0.107), as for stride 2 to 7x7 (2048x1024 from 14x14: 0.506 vs 0.743 ms;
    ResNet-18's 512x256: 0.047 vs 0.057 ms); on AVX2 0.37-0.64x on 7x7 maps."""
    if fmt == "pattern":
        return True
    if fmt != "dense" or geom.kernel == (1, 1):
        return False
    return lanes == 16 or geom.kernel == (3, 3)


def _winograd(geom: ConvGeometry, target: PlanTarget) -> bool:
    """Whether a dense conv runs as Winograd F(2x2, 3x3) (``schedules.winograd_conv2d``): a 3x3
    stride-1 one on targets of at most ``WINOGRAD_REGISTERS`` vector registers where it pays
    (``winograd_pays``, which has the measurements)."""
    return target.registers <= WINOGRAD_REGISTERS and winograd_fits(geom) and winograd_pays(geom)


def _window_gemm(geom: ConvGeometry, target: PlanTarget) -> bool:
    """Whether a dense k x k conv runs as the packed GEMM over its gathered windows
    (``dense_gemm.conv1x1_gemm_primfunc``'s ``kernel``): a strided one (the same stride both
    ways) of at least ``WINDOW_GEMM_MIN_FILTERS`` filters on targets of at most
    ``WINDOW_GEMM_REGISTERS`` vector registers.

    AMD EPYC Zen 3 (AVX2 only), 2 threads, ResNet-50's stride-2 3x3 convs + bias + ReLU alone
    through the VM, one process, 11 interleaved rounds: 256x256 on 28x28 121 GFLOP/s against
    the flat rows' 101 (ONNX Runtime 114), 512x512 on 14x14 104 against the filters-in-lanes
    kernel's 101 (107); the kernels alone, 7 rounds: 114-122 against 93, 108-118 against
    68-102. 128x128 on 56x56 122 against the flat rows' 122: it stays there (fewer filters
    share each gathered element)."""
    sh, sw = geom.stride
    many = geom.out_channels >= WINDOW_GEMM_MIN_FILTERS
    return target.registers <= WINDOW_GEMM_REGISTERS and sh == sw > 1 and many


def _pointwise(geom: ConvGeometry) -> bool:
    """A 1x1 conv without padding: a GEMM over the (strided) input's pixels."""
    return geom.kernel == (1, 1) and not any(geom.padding) and geom.stride[0] == geom.stride[1]


def _packed_gemm(
    weight: np.ndarray, geom: ConvGeometry, target: PlanTarget
) -> tuple[GemmConfig, np.ndarray, str]:
    """A dense pointwise conv's GEMM, or a k x k one's over its gathered windows: its tile, its
    packed (O, C * kh * kw) weight and how it runs; on 16-register targets K over
    ``dense_gemm.K_BLOCK`` (windows: ``WINDOW_K_BLOCK``) in passes (``gemm_k_block``), 4 k per
    iteration of the tile loop (``gemm_unroll``)."""
    pixels, taps = geom.out_height * geom.out_width, math.prod(geom.kernel)
    depth = geom.in_channels * taps
    cfg = conv1x1_gemm_config(target.lanes, target.registers, pixels, depth, taps)
    how = "packed GEMM" + (" over the gathered windows" if taps > 1 else "")
    how += f", K in passes of {cfg.k_block}" if cfg.k_block else ""
    return cfg, pack_rows(weight.reshape(weight.shape[0], -1), cfg.rows), how


def plan_conv2d(call: relax.Call, index: int, target: PlanTarget) -> LayerPlan:
    """The plan of one conv2d call (``index``: its position in graph order)."""
    reason = conv2d_unsupported(call)
    if reason is not None:
        shape = "x".join(str(d) for d in static_shape(call.args[1]) or ())
        return LayerPlan(index, "conv2d", shape, LEFT_TO_TVM, LEFT_TO_TVM, f"left to TVM: {reason}")
    weight = const_value(call.args[1]).astype(np.float32)
    note = ""
    if target.sparse and target.costs is not None and conv1x1_unsupported(call) is None:
        geom = conv1x1_geometry(call)
        choice, _, _ = choose_conv1x1_format(weight, geom.batch * geom.pixels, target.costs)
        if choice.format in BLOCK_FORMATS:
            return _block_plan(index, geom, weight.reshape(weight.shape[0], -1), choice, target)
        note = choice.reason
    if int(call.attrs.groups) > 1:
        return _depthwise_plan(index, conv_geometry(call), weight, target)
    plan = _pattern_plan(index, conv_geometry(call), weight, target)
    plan.block_note = note
    return plan


def _depthwise_plan(
    index: int, geom: ConvGeometry, weight: np.ndarray, target: PlanTarget
) -> LayerPlan:
    """A depthwise conv (one filter per channel) on the depthwise kernel, read in place."""
    pixels = geom.batch * geom.out_height * geom.out_width
    taps = int(np.prod(weight.shape))
    return LayerPlan(
        index, "conv2d", conv_shape(geom, depthwise=True), "depthwise", "depthwise",
        "depthwise conv read in place (no staging)", density=1.0,
        flops_dense=2 * pixels * taps, flops_kept=2 * pixels * taps,
        geometry=geom, packing=pack_depthwise(weight),
        config=default_depthwise_config(geom, target.lanes),
    )  # fmt: skip


def _block_plan(
    index: int, geom: Conv1x1Geometry, matrix: np.ndarray, choice, target: PlanTarget
) -> LayerPlan:
    """A 1x1 conv on the BSR / BCR kernel."""
    fmt, (r, c) = choice.format, choice.block
    cfg = default_bsr_conv_config(geom, r, target.lanes, target.cores, bcr=fmt == "bcr")
    packed, kept = pack_block_weight(matrix, fmt, choice.block, cfg.shares)
    work = geom.batch * geom.pixels
    return LayerPlan(
        index, "conv2d", conv_shape(geom), fmt, "bsr_conv1x1", choice.reason,
        density=float((matrix != 0).mean()),
        flops_dense=2 * work * matrix.size,
        flops_kept=2 * work * packed.num_blocks * math.prod(kept or (r, c)),
        geometry=geom, packing=(packed, kept, choice.block), config=cfg,
    )  # fmt: skip


def _pattern_plan(
    index: int, geom: ConvGeometry, weight: np.ndarray, target: PlanTarget
) -> LayerPlan:
    """A conv on the GEMM (dense pointwise convs: ``_lanes_format`` never takes them), the
    few-channel dense kernel, Winograd, the flat rows, the lanes or the pattern kernel, the
    latter two on its weight packed as ``PatternWeight`` (which the GEMMs do not need: ~0.9 s
    for a 2048x1024 weight)."""
    stats = conv_sparsity(weight)
    fmt, reason = choose_conv_format(stats) if target.sparse else ("dense", "sparse=False")
    o, c = weight.shape[:2]
    lanes = target.lanes
    if fmt == "dense" and _pointwise(geom):
        cfg, packing, how = _packed_gemm(weight, geom, target)
        kernel, kept_taps = "conv_gemm", o * c
        reason += f"; {how}"
    elif fmt == "dense" and c <= FEW_CHANNELS:
        cfg = default_dense_conv_config(geom, lanes, target.registers)
        kernel, packing = "dense_conv", pack_dense_conv(weight, cfg.gemm.rows)
        kept_taps = weight.size
        reason += f"; {c} input channels: GEMM over phase-split input rows"
    elif fmt == "dense" and _winograd(geom, target):
        cfg = default_winograd_config(geom, lanes, target.registers)
        kernel, packing = "winograd", pack_winograd_weight(weight, cfg.gemm.rows)
        kept_taps = weight.size
        reason += "; Winograd F(2x2, 3x3): a GEMM per position of the transformed tile"
    elif fmt == "dense" and _window_gemm(geom, target):
        cfg, packing, how = _packed_gemm(weight, geom, target)
        kernel, kept_taps = "conv_gemm", weight.size
        reason += f"; {how}"
    elif fmt == "dense" and target.registers <= FLAT_ROWS_REGISTERS and flat_rows_fit(geom):
        cfg = default_flat_conv_config(geom, lanes, target.registers, target.cores)
        kernel, packing = "dense_conv", pack_dense_conv(weight, cfg.gemm.rows)
        kept_taps = weight.size
        reason += "; GEMM over the job's input rows back to back"
    else:
        packed = PatternWeight.from_dense(
            weight, num_shares=target.cores, keep_zeros=fmt == "dense"
        )
        group = packed.filter_group
        if group > 1 and fmt == "pattern":
            reason += f"; filters share kernels in groups of {group} (one load feeds {group})"
        grouped = lanes in LANES_KERNEL_LANES and group % lanes == 0
        if grouped and _lanes_format(fmt, geom, lanes):
            kernel, packing, kept_taps = "lanes", packed, packed.num_taps
            reason += "; filters computed in vector lanes"
            kernels_per_filter = packed.num_kernels / o
            cfg = lanes_default_config(
                geom, target.registers, target.cores, kernels_per_filter, fmt == "dense"
            )
        else:
            kernel, packing, kept_taps = "pattern", packed, packed.num_taps
            tile = tile_defaults(geom, target.registers, lanes)
            cfg = default_config(geom, filter_group=group, shares=target.cores, **tile)
    pixels = geom.batch * geom.out_height * geom.out_width
    kh, kw = geom.kernel
    return LayerPlan(
        index, "conv2d", conv_shape(geom), fmt, kernel, reason, density=stats.density,
        flops_dense=2 * pixels * o * kh * kw * c,
        flops_kept=2 * pixels * kept_taps,
        geometry=geom, packing=packing, config=cfg,
    )  # fmt: skip
