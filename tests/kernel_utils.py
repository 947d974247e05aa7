"""Shared by the kernel tests: the x86 ISA targets this host runs, and one generated conv kernel
built and run on its own (no Relax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schedules.pattern_conv2d import ConvGeometry, Epilogue, PatternConvConfig
from tvm_sparse.targets import resolve_target, runs_here
from tvm_sparse.testing import pattern_conv_kernel

# Every x86 ISA target, each skipped on a host that cannot run its code.
ISA_TARGETS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(not runs_here(resolve_target(name)), reason=f"no {name} here"),
    )
    for name in ("x86-avx2", "x86-avx512")
]


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
    run, _ = pattern_conv_kernel(geom, weight, epilogue, config, keep_zeros)
    return run(x, bias, residual).numpy()


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


def assert_matches_torch(cm, net, x: np.ndarray, tol: float = 1e-4) -> None:
    """A compiled model's output against PyTorch's: float32 both sides, another summation
    order, so within ``tol`` relative to the largest output (absolute below 1)."""
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = cm(x)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= tol * max(1.0, float(np.abs(ref).max()))
