"""Shared by the kernel tests: the x86 ISA targets this host runs, one generated conv kernel
built and run on its own (no Relax), and a tuning record's trace replayed on a template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import meta_schedule as ms

from schedules.pattern_conv2d import ConvGeometry, Epilogue, PatternConvConfig
from schedules.tunable import knob_space, realize
from tvm_sparse.targets import resolve_target, runs_here
from tvm_sparse.testing import pattern_conv_kernel
from tvm_sparse.tuning.search import space_for

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


class ConvBlock(torch.nn.Module):
    """3x3 conv (padding 1) + bias + ReLU."""

    def __init__(self, c: int, o: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c, o, 3, stride, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def prefetch_lines(func: tirx.PrimFunc) -> list[str]:
    """The ``T.prefetch`` lines of a kernel's TVMScript, stripped."""
    return [line.strip() for line in func.script().splitlines() if "T.prefetch" in line]


def conv_bias_relu_module(
    shape: tuple, w: np.ndarray, b: np.ndarray, stride: int = 1
) -> tvm.IRModule:
    """A pass test's Before: Relax conv2d (padding 1) + bias + ReLU on an input of ``shape``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=1))
            y = bb.emit(relax.op.add(y, relax.const(b.reshape(1, -1, 1, 1))))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get()


def packed_gemm_call_module(
    shape: tuple, kernel: tirx.PrimFunc, name: str, w: np.ndarray, b: np.ndarray, out_shape: tuple
) -> tvm.IRModule:
    """A pass test's Expected for ``conv_bias_relu_module``: one call of ``kernel`` on the input
    as it is, the (O, C, kh, kw) weight packed as a GEMM's A by 4 rows (``pack_rows``: row
    tiles, C * kh * kw, 4) and the bias."""
    o = w.shape[0]
    packed = np.ascontiguousarray(w.reshape(o // 4, 4, -1).transpose(0, 2, 1))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    gv = bb.add_func(kernel, name)
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, relax.const(packed), relax.const(b)]
            y = bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


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


def replay_at_knobs(template: tirx.PrimFunc, target, picks: dict[str, int]) -> tirx.PrimFunc:
    """The kernel a MetaSchedule record realizes: the template's design space (its rule's
    samples, in ``knob_space`` order), the knobs in ``picks`` decided (the others at their
    defaults), the trace replayed on the template and the result realized."""
    func = template.with_attr("global_symbol", "main")
    ctx = ms.TuneContext(
        mod=tvm.IRModule({"main": func}), target=target, space_generator=space_for(func, target),
        search_strategy=ms.search_strategy.ReplayTrace(), task_name="t",
    )  # fmt: skip
    space = knob_space(func)
    assert set(picks) <= set(space), f"no knobs {set(picks) - set(space)} in {sorted(space)}"
    (sch,) = ctx.generate_design_space()
    trace = sch.trace
    sampled = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
    for inst, (name, values) in zip(sampled, space.items(), strict=True):
        if name in picks:
            trace = trace.with_decision(inst, values.index(picks[name]), True)
    replay = s_tir.Schedule(tvm.IRModule({"main": func}))
    trace.apply_to_schedule(replay, remove_postproc=True)
    return realize(replay.mod["main"])
