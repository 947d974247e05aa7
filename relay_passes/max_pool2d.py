"""RewriteMaxPool2d: ``relax.nn.max_pool2d`` of stride 2 (NCHW, fp32) -> ``schedules.max_pool2d``.

ResNet's 3x3/2 max-pool after the stem reads a 64 x 112 x 112 map. TVM's legalized pool, even
with tvm-sparse's default schedule (``schedules.tvm_ops``: output columns vectorized, its
stride-2 and padding loads lane by lane), took 0.27-0.29 ms of ResNet-18 g16's 3.3 ms. Pools of
other strides, layouts, dilations or ``ceil_mode``, and maps narrower than a vector, stay on
TVM's path.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from schedules.max_pool2d import PoolGeometry, max_pool2d_primfunc, pool_unsupported

from .utils import rewrite_functions, static_shape


def pool_geometry(call: relax.Call, lanes: int) -> PoolGeometry | str:
    """The kernel's geometry for this pool, or why the kernel cannot take it."""
    attrs = call.attrs
    shape = static_shape(call.args[0])
    if shape is None or len(shape) != 4 or call.args[0].ty.dtype != "float32":
        return "input is not a static-shape 4-D float32 tensor"
    if attrs.layout != "NCHW" or attrs.out_layout != "NCHW":
        return f"layout {attrs.layout} (only NCHW)"
    strides, dilation = tuple(attrs.strides), tuple(attrs.dilation)
    if strides != (2, 2) or dilation != (1, 1) or attrs.ceil_mode:
        mode = f"ceil_mode {attrs.ceil_mode}"
        return f"strides {strides}, dilation {dilation}, {mode} (only 2, 1, off)"
    geom = PoolGeometry(
        *shape,
        kernel=tuple(int(k) for k in attrs.pool_size),
        padding=tuple(int(p) for p in attrs.padding),
    )
    return pool_unsupported(geom, lanes) or geom


def RewriteMaxPool2d(lanes: int = 16, shares: int = 2) -> tvm.transform.Pass:  # noqa: N802
    """The pass; ``lanes`` is the target's fp32 vector width, ``shares`` its cores."""
    pattern = is_op("relax.nn.max_pool2d")(wildcard())

    @tvm.transform.module_pass(opt_level=0, name="RewriteMaxPool2d")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels: dict[PoolGeometry, tvm.ir.GlobalVar] = {}

        def fuse(bb: relax.BlockBuilder, func: relax.Function) -> relax.Function:
            def rewrite(expr: relax.Expr, _matches: dict) -> relax.Expr:
                geom = pool_geometry(expr, lanes)
                if isinstance(geom, str):
                    return expr
                if geom not in kernels:
                    func = max_pool2d_primfunc(geom, lanes, shares)
                    kernels[geom] = bb.add_func(func, "max_pool2d_s2")
                out = (geom.batch, geom.channels, geom.out_height, geom.out_width)
                out_ty = relax.TensorType(out, "float32")
                return relax.call_tir(kernels[geom], [expr.args[0]], out_ty)

            return rewrite_call(pattern, rewrite, func)

        return rewrite_functions(mod, fuse)

    return transform
