"""The fused epilogue (``Epilogue``: bias, residual add, activation) every generated kernel
applies to its accumulators, and clamps that keep NaN as PyTorch does.

PyTorch's ``relu``, ``relu6``, ``hardtanh`` and ``clamp`` return NaN for a NaN input. TIR's
``max(x, 0)`` / ``min(x, 6)`` do not: LLVM lowers them to a compare and select that returns the
constant for NaN, so a NaN before a ReLU would silently become 0. ``clamp`` writes the bounds
as ``select(x < lo, lo, x)`` / ``select(x > hi, hi, x)``, which keep NaN (the comparison is
false); on x86 they compile to the same single ``vmaxps`` / ``vminps`` (operands swapped).

Every generated kernel declares its epilogue's inputs with ``Epilogue.declare_args`` and
applies it with ``Epilogue.apply`` (its activation: ``activation``, NaN kept); ``keep_nan_clamps``
rewrites the ``max`` / ``min`` against a float constant in TVM's own kernels
(legalized ``relu``, ``clip``) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .vector_math import clamp, vector_gelu, vector_gelu_tanh

EPILOGUE_ACTIVATIONS = ("none", "relu", "relu6", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class Epilogue:
    """What is fused after the conv: per-filter bias, residual add, activation (in that order)."""

    bias: bool = False
    residual: bool = False
    activation: str = "none"

    def __post_init__(self) -> None:
        if self.activation not in EPILOGUE_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")

    def apply(
        self,
        value: tirx.PrimExpr,
        bias: tirx.PrimExpr | None = None,
        residual: tirx.PrimExpr | None = None,
    ) -> tirx.PrimExpr:
        """``act(value + bias + residual)`` on a TIR value (scalar or vector): ``bias`` /
        ``residual`` are the loads to add, None where the epilogue fuses none."""
        if bias is not None:
            value = value + bias
        if residual is not None:
            value = value + residual
        return activation(value, self)

    def declare_args(
        self, bias_shape: tuple, residual_shape: tuple
    ) -> tuple[tirx.Buffer | None, tirx.Buffer | None]:
        """The kernel's ``bias`` and ``residual`` arguments (``T.arg``, in that order, inside an
        open ``T.prim_func``), None for each the epilogue does not fuse."""
        bias = T.arg("bias", T.buffer(bias_shape, "float32")) if self.bias else None
        resid = T.arg("residual", T.buffer(residual_shape, "float32")) if self.residual else None
        return bias, resid


def optional_load(buffer: tirx.Buffer | None, *index: tirx.PrimExpr) -> tirx.PrimExpr | None:
    """``buffer[index]``, or None without the buffer (an epilogue input the kernel does not
    fuse): the ``bias`` / ``residual`` arguments of ``Epilogue.apply``."""
    return None if buffer is None else buffer[index]


def activation(value: tirx.PrimExpr, epilogue: Epilogue) -> tirx.PrimExpr:
    """Apply the epilogue's activation to a TIR value (scalar or vector), NaN kept."""
    if epilogue.activation == "relu":
        return clamp(value, 0.0)
    if epilogue.activation == "relu6":
        return clamp(value, 0.0, 6.0)
    if epilogue.activation == "gelu":
        return vector_gelu(value)
    if epilogue.activation == "gelu_tanh":
        return vector_gelu_tanh(value)
    return value


def _float_const(expr: tirx.PrimExpr) -> float | None:
    """The value of a float constant (or a broadcast one), else None."""
    if isinstance(expr, tirx.Broadcast):
        expr = expr.value
    return float(expr.value) if isinstance(expr, tirx.FloatImm) else None


def _keep_nan(expr: tirx.PrimExpr) -> tirx.PrimExpr:
    """``max`` / ``min`` of a float value and a constant as a NaN-keeping ``clamp``."""
    if not expr.ty.dtype.is_float:
        return expr
    for value, other in ((expr.a, expr.b), (expr.b, expr.a)):
        bound = _float_const(other)
        if bound is not None and _float_const(value) is None:
            if isinstance(expr, tirx.Max):
                return clamp(value, lo=bound)
            return clamp(value, hi=bound)
    return expr


def keep_nan_clamps(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with every float ``max(x, c)`` / ``min(x, c)`` (c a constant) written as a
    NaN-keeping ``clamp``: TVM's legalized ``relu`` / ``clip`` then match PyTorch on NaN."""
    return tvm_ffi.structural_map(func, ((tirx.Max, tirx.Min), _keep_nan))


@tvm.transform.module_pass(opt_level=0, name="KeepNaNClamps")
def KeepNaNClamps(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:  # noqa: N802
    """``keep_nan_clamps`` on every PrimFunc of the module (a copy; ``mod`` is left as it is)."""
    out = mod.clone()
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            kept = keep_nan_clamps(func)
            if not kept.same_as(func):
                out.update_func(gv, kept)
    return out
