"""RewriteConv2D: ``relax.nn.conv2d`` with a constant weight -> the pattern conv kernel.

Each NCHW / OIHW conv2d (groups 1, dilation 1, float32, static shapes) whose weight is a constant
is replaced, together with its epilogue (bias add, residual add, ReLU / ReLU6), by a ``call_tir``
to a kernel from ``schedules.pattern_conv2d``:

- a pattern-sparse weight (few distinct tap sets, most FLOPs pruned) is packed as ``PatternWeight``;
  where its filters share kernels in groups of the target's lanes (16 AVX-512, 8 AVX2), the
  kernel from ``schedules.pattern_conv2d_lanes`` computes a group's filters in vector lanes;
- any other weight runs the same kernels with one full pattern (a dense direct conv with a sound
  vectorized schedule instead of TVM's untuned default; in lanes where that measured faster:
  ``_lanes_format``).

Everything else (grouped / dilated convs, other ops) is left on TVM's path. What was decided for
each conv, and why, is appended to ``records`` (the compile report).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from schedules.dense_gemm import GemmConfig, conv1x1_gemm_primfunc, default_gemm_config, pack_rows
from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    default_config,
    pattern_conv2d_template,
    tile_defaults,
)
from schedules.pattern_conv2d_lanes import lanes_default_config, pattern_conv2d_lanes_template
from tvm_sparse.formats import PatternWeight, choose_conv_format, conv_sparsity
from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch, describe
from .rewrite import anchored_rewrite_pass
from .utils import add_kernel, const_value, static_shape


def conv2d_unsupported(call: relax.Call) -> str | None:
    """Why the kernel cannot take this conv2d, or None if it can."""
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


def _geometry(call: relax.Call) -> ConvGeometry:
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


NARROW_MAP = 8  # output widths up to this: dense 1x1 convs in lanes too (``_lanes_format``)
LANES_KERNEL_LANES = (8, 16)  # AVX2 and AVX-512 (NEON's 4 lanes not measured)


def _lanes_format(fmt: str, geom: ConvGeometry, lanes: int) -> bool:
    """Whether a conv packed as ``fmt`` (its filters grouped by the target's 16 or 8 lanes) runs
    on the filters-in-lanes kernel: pattern-sparse ones; dense ones but 1x1 convs on maps wider
    than ``NARROW_MAP`` (on AVX-512; every dense 1x1 conv on AVX2). AVX2 build (8 lanes) on
    AMD Zen 5, 2 threads, against the per-pixel kernel: ResNet-18's 3x3 layers pattern-pruned
    per group of 8 filters 1.0-2.3x, dense 1.05-3.1x (150-190 GFLOP/s, 65-80 % of the AVX2
    FMA peak); against the packed GEMM, ResNet-50's dense 1x1 layers on 7x7 0.37-0.64x
    (stride 2 from 14x14: 1.45x). Dense against the per-pixel kernel on the AVX-512 VM, 2
    threads: 3x3 layers 1.5-2.6x (350-400 GFLOP/s: ResNet-18's 64x64 on 56x56, 256x256 on
    14x14, 512x512 on 7x7); its 7x7 stem 1.34x (0.72 ms, with ``most_accumulators``' tiles);
    its 512x256 stride-2 shortcut (7x7 output) 2.8x alone, 0.221 -> 0.079-0.090 ms in the
    model; its wider 1x1 shortcuts 0.95-1.05x alone but 0.76-0.90x in the model, and
    ResNet-50's stride-1 1x1 layers 0.97-1.3x alone (one broadcast per FMA: both kernels
    load-bound there)."""
    if fmt == "pattern":
        return True
    pointwise, narrow = geom.kernel == (1, 1), geom.out_width <= NARROW_MAP and lanes == 16
    return fmt == "dense" and (not pointwise or narrow)


def _pointwise(geom: ConvGeometry) -> bool:
    """A 1x1 conv without padding: a GEMM over the (strided) input's pixels."""
    return geom.kernel == (1, 1) and not any(geom.padding) and geom.stride[0] == geom.stride[1]


def _emit_gemm(
    bb: relax.BlockBuilder,
    kernels: dict,
    visit,
    weight: np.ndarray,
    geom: ConvGeometry,
    epilogue: tuple[Epilogue, EpilogueMatch],
    cfg: GemmConfig,
    cores: int,
) -> relax.Expr:
    """A dense 1x1 conv as ``schedules.dense_gemm``'s packed GEMM (a strided conv on the
    input sliced to the pixels it reads)."""
    epi, match = epilogue
    x, stride = visit(match.anchor.args[0]), geom.stride[0]
    if stride > 1:
        x = bb.emit(
            relax.op.strided_slice(
                x, axes=[2, 3], begin=[0, 0], end=[geom.height, geom.width],
                strides=[stride, stride],
            )
        )  # fmt: skip
    dims = (geom.out_height, geom.out_width)
    o, c = weight.shape[:2]
    key = ("gemm", geom.batch, c, o, dims, epi, cfg)
    kernel = add_kernel(
        bb, kernels, key, f"dense_conv1x1_{o}x{c}",
        lambda: conv1x1_gemm_primfunc(
            geom.batch, c, o, dims[0] * dims[1], epi, cfg, cores, out_dims=dims
        ),
    )  # fmt: skip
    args = [x, relax.const(pack_rows(weight.reshape(o, c), cfg.rows))]
    if match.bias is not None:
        args.append(relax.const(match.bias))
    if match.residual is not None:
        args.append(visit(match.residual))
    return relax.call_tir(kernel, args, relax.TensorType((geom.batch, o, *dims), "float32"))


def _record(
    index: int,
    geom: ConvGeometry,
    stats,
    fmt: str,
    reason: str,
    match: EpilogueMatch,
    kept_taps: int,
) -> LayerRecord:
    """The report row of a rewritten conv."""
    o, c, kh, kw = stats.shape
    pixels = geom.batch * geom.out_height * geom.out_width
    depthwise = fmt == "depthwise"
    return LayerRecord(
        name=f"conv2d_{index}",
        op="conv2d",
        shape=f"{o}x{1 if depthwise else c}x{kh}x{kw} s{geom.stride[0]} on "
        f"{geom.height}x{geom.width}",
        format=fmt,
        density=1.0 if depthwise else stats.density,
        flops_dense=2 * pixels * o * kh * kw * (1 if depthwise else c),
        flops_kept=2 * pixels * kept_taps,
        reason=reason,
        epilogue=describe(match),
    )


def RewriteConv2D(  # noqa: N802 (TVM's pass naming)
    num_threads: int = 1,
    sparse: bool = True,
    records: list[LayerRecord] | None = None,
    registers: int = 16,
    lanes: int = 8,
) -> tvm.transform.Pass:
    """The pass. ``sparse=False`` runs every conv on the dense kernel (the dense baseline);
    ``num_threads`` is the number of cores filters are balanced over, ``registers`` / ``lanes``
    the target's vector registers and fp32 lanes (AVX2 16 / 8, AVX-512 32 / 16, NEON 32 / 4)."""
    records = records if records is not None else []
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit) -> relax.Expr:
        conv = match.anchor
        geom = _geometry(conv)
        weight = const_value(conv.args[1]).astype(np.float32)
        depthwise = int(conv.attrs.groups) > 1
        diagonal = None
        if depthwise:  # as a conv whose filter o keeps only kernel (o, o): one kernel per filter
            o, _, kh, kw = weight.shape
            diagonal = np.eye(o, dtype=bool)
            weight = np.einsum("oc,ohw->ochw", diagonal, weight[:, 0]).astype(np.float32)
        stats = conv_sparsity(weight)
        fmt, reason = choose_conv_format(stats) if sparse else ("dense", "sparse=False")
        if depthwise:
            fmt, reason = "depthwise", "one full kernel per filter on the pattern kernel"
        packed = PatternWeight.from_dense(
            weight,
            num_shares=num_threads,
            keep_zeros=fmt in ("dense", "depthwise"),
            kernel_mask=diagonal,
        )
        epi = Epilogue(
            bias=match.bias is not None,
            residual=match.residual is not None,
            activation=match.activation,
        )
        group = packed.filter_group  # filters packed in groups with the same kernels
        if group > 1 and fmt == "pattern":
            reason += f"; filters share kernels in groups of {group} (one load feeds {group})"
        max_taps = packed.kernel_values.shape[1]
        nonempty = packed.num_kernels > 0
        o, c, kh, kw = stats.shape
        name = f"{fmt}_conv2d_{o}x{c}x{kh}x{kw}"
        in_lanes = (
            lanes in LANES_KERNEL_LANES and group % lanes == 0 and _lanes_format(fmt, geom, lanes)
        )
        if fmt == "dense" and not in_lanes and _pointwise(geom):
            cfg = default_gemm_config(lanes, registers)
            out = _emit_gemm(bb, kernels, visit, weight, geom, (epi, match), cfg, num_threads)
            records.append(
                _record(len(records), geom, stats, fmt, reason + "; packed GEMM", match, o * c)
            )
            return out
        if in_lanes:
            reason += "; filters computed in vector lanes"
            per_filter = packed.num_kernels / o
            cfg = lanes_default_config(geom, registers, num_threads, per_filter)
            values = packed.lane_values(lanes)
            key = ("lanes", geom, packed.patterns, packed.num_kernels, max_taps, epi, cfg, lanes)

            def build():
                return pattern_conv2d_lanes_template(
                    geom, packed.patterns, packed.num_kernels, max_taps, lanes, epi, cfg, name
                )
        else:
            tile = tile_defaults(geom, registers, lanes)
            cfg = default_config(geom, filter_group=group, shares=num_threads, **tile)
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
        ]
        if match.bias is not None:
            args.append(relax.const(match.bias[packed.filter_order]))
        if match.residual is not None:
            args.append(visit(match.residual))
        out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
        records.append(_record(len(records), geom, stats, fmt, reason, match, packed.num_taps))
        return relax.call_tir(kernel, args, relax.TensorType(out_shape, "float32"))

    def fallback(call: relax.Call, reason: str) -> None:
        shape = static_shape(call.args[1]) or ()
        records.append(
            LayerRecord(
                name=f"conv2d_{len(records)}",
                op="conv2d",
                shape="x".join(str(d) for d in shape),
                format="tvm",
                density=1.0,
                flops_dense=0,
                flops_kept=0,
                reason=f"left to TVM: {reason}",
            )
        )

    return anchored_rewrite_pass(
        "RewriteConv2D", "relax.nn.conv2d", conv2d_unsupported, emit, channel_axis=1,
        on_fallback=fallback,
    )  # fmt: skip
