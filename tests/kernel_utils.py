"""Build and run one generated conv kernel on its own (no Relax), for kernel tests."""

from __future__ import annotations

import numpy as np
import torch
import tvm

from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    pattern_conv2d_primfunc,
)
from tvm_sparse.formats import PatternWeight
from tvm_sparse.targets import resolve_target


def run_pattern_conv(
    x: np.ndarray,
    weight: np.ndarray,
    stride: int,
    padding: tuple[int, int, int, int],
    epilogue: Epilogue = Epilogue(),
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    config: PatternConvConfig | None = None,
    keep_zeros: bool = False,
) -> np.ndarray:
    """Compile the kernel for this layer and run it on ``x``."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    geom = ConvGeometry(n, c, h, w, o, (kh, kw), (stride, stride), padding)
    packed = PatternWeight.from_dense(weight, num_shares=2, keep_zeros=keep_zeros)
    max_taps = packed.kernel_values.shape[1]
    func = pattern_conv2d_primfunc(
        geom,
        packed.patterns,
        packed.num_kernels,
        max_taps,
        epilogue,
        config,
        filter_group=packed.filter_group,
    )
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=resolve_target("x86"),
    ).jit()
    k = max(packed.num_kernels, 1)
    args = [
        x,
        packed.kernel_ptr,
        packed.kernel_channel if packed.num_kernels else np.zeros(k, "int32"),
        packed.kernel_values if packed.num_kernels else np.zeros((k, max_taps), "float32"),
        packed.filter_order,
    ]
    if epilogue.bias:
        args.append(bias[packed.filter_order])
    if epilogue.residual:
        args.append(residual)
    out = tvm.runtime.tensor(np.zeros((n, o, geom.out_height, geom.out_width), "float32"))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def torch_conv(x, weight, stride, padding, bias=None, residual=None, activation="none"):
    """The PyTorch reference for ``run_pattern_conv`` (padding: top, left, bottom, right)."""
    top, left, bottom, right = padding
    xt = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    b = torch.from_numpy(bias) if bias is not None else None
    y = torch.nn.functional.conv2d(xt, torch.from_numpy(weight), b, stride=stride)
    if residual is not None:
        y = y + torch.from_numpy(residual)
    if activation in ("relu", "relu6"):
        y = torch.relu(y) if activation == "relu" else torch.nn.functional.relu6(y)
    return y.numpy()
