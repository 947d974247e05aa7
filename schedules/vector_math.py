"""Vector building blocks of the generated kernels: index spans, NaN-keeping clamps,
transcendental functions in vector instructions (exp, sigmoid, tanh, erf, GELU) and reductions
along a row."""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .buffers import allocated_view

Combine = Callable[["tirx.PrimExpr", "tirx.PrimExpr"], "tirx.PrimExpr"]
Element = Callable[["tirx.PrimExpr", int], "tirx.PrimExpr"]  # (start, width) -> value(s)


def splat(value: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
    """``value`` broadcast to ``width`` lanes (itself for one lane)."""
    return value if width == 1 else tirx.Broadcast(value, width)


def span(start: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
    """The indices ``[start, start + width)`` as one vector index (``start`` for one lane)."""
    return start if width == 1 else tirx.Ramp(start, 1, width)


def const_vector(value: float, lanes: int) -> tirx.PrimExpr:
    """A float32 constant broadcast to ``lanes`` (a scalar for one lane)."""
    return splat(tirx.const(value, "float32"), lanes)


def _const_like(value: tirx.PrimExpr, c: float) -> tirx.PrimExpr:
    """The float ``c`` in ``value``'s dtype (broadcast to its lanes)."""
    dtype = value.ty.dtype
    scalar = tirx.const(c, str(dtype.with_lanes(1)))
    return scalar if dtype.lanes == 1 else tirx.Broadcast(scalar, dtype.lanes)


def clamp(value: tirx.PrimExpr, lo: float | None = None, hi: float | None = None) -> tirx.PrimExpr:
    """``value`` clamped to [lo, hi] (either may be None), NaN kept (NaN < lo is false)."""
    if hi is not None:
        bound = _const_like(value, hi)
        value = tirx.Select(value > bound, bound, value)
    if lo is not None:
        bound = _const_like(value, lo)
        value = tirx.Select(value < bound, bound, value)
    return value


# topi.fast_exp's constants: exp(x) = 2^n * p(x - n ln 2), n = round(x / ln 2).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2)
_EXP_POLY += (1.6666665459e-1, 5.0000001201e-1)
# topi.fast_erf's (Eigen's) rational approximation on [-4, 4]: erf(x) = x P(x^2) / Q(x^2).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip


def keep(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` stored to a new register-sized stack buffer and read back (inside a kernel
    being built). Math that reuses a value would otherwise repeat it as an expression tree;
    ``T.Bind`` makes the build's analysers substitute it back, exponentially (an LSTM cell:
    16 s at hidden 13); LLVM keeps these buffers in registers. A scalar stays an expression:
    it may sit in a loop TVM vectorizes, where a one-element slot cannot."""
    if value.ty.dtype.lanes == 1:
        return value
    slot = allocated_view((value.ty.dtype.lanes,), str(value.ty.dtype.with_lanes(1)))
    at = span(0, value.ty.dtype.lanes)
    T.buffer_store(slot, value, [at])
    return slot[at]


def vector_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` of float32 lanes (or a scalar) in vector instructions (NaN in, NaN out)."""
    lanes = x.ty.dtype.lanes
    x = keep(clamp(keep(x), -88.3762626647949, 88.3762626647950))
    n = keep(tirx.floor(x * const_vector(1.4426950408889634, lanes) + const_vector(0.5, lanes)))
    r = keep(x - n * const_vector(0.6931471805599453, lanes))
    poly = const_vector(_EXP_POLY[0], lanes)
    for coef in _EXP_POLY[1:]:
        poly = poly * r + const_vector(coef, lanes)
    y = poly * r * r + r + const_vector(1.0, lanes)
    int32, float32 = ("int32", "float32") if lanes == 1 else (f"int32x{lanes}", f"float32x{lanes}")
    exponent = tirx.Cast(int32, n) + splat(tirx.const(127, "int32"), lanes)
    shifted = tirx.shift_left(exponent, splat(tirx.const(23, "int32"), lanes))
    return keep(y * tirx.reinterpret(float32, shifted))


def vector_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    lanes = x.ty.dtype.lanes
    return keep(const_vector(1.0, lanes) / (const_vector(1.0, lanes) + vector_exp(-x)))


def vector_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2 sigmoid(2x) - 1`` (absolute error ~1e-7, which is float32's resolution near 1)."""
    lanes = x.ty.dtype.lanes
    two = const_vector(2.0, lanes)
    return keep(two * vector_sigmoid(x * two) - const_vector(1.0, lanes))


def vector_erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erf(x)`` of a float32 vector (|error| < 2e-7; NaN in, NaN out)."""
    lanes = x.ty.dtype.lanes
    x = keep(clamp(keep(x), -4.0, 4.0))
    x2 = keep(x * x)
    p = const_vector(_ERF_P[0], lanes)
    for coef in _ERF_P[1:]:
        p = p * x2 + const_vector(coef, lanes)
    q = const_vector(_ERF_Q[0], lanes)
    for coef in _ERF_Q[1:]:
        q = q * x2 + const_vector(coef, lanes)
    return keep(x * keep(p) / keep(q))


def vector_gelu(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``x / 2 (1 + erf(x / sqrt 2))`` (PyTorch's default GELU), a scalar or a vector."""
    v = keep(x)
    n = v.ty.dtype.lanes
    erf = vector_erf(v * const_vector(0.7071067811865476, n))
    return const_vector(0.5, n) * v * (const_vector(1.0, n) + erf)


def vector_gelu_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` (GELU's tanh form)."""
    v = keep(x)
    n = v.ty.dtype.lanes
    inner = const_vector(0.7978845608028654, n) * (v + const_vector(0.044715, n) * v * v * v)
    return const_vector(0.5, n) * v * (const_vector(1.0, n) + vector_tanh(inner))


def row_reduce(
    length: int, lanes: int, init: float, combine: Combine, body: Element
) -> tirx.PrimExpr:
    """``combine`` of ``body(start, width)`` over ``[0, length)`` as one float32 scalar: whole
    vectors into a vector accumulator (reduced across its lanes at the end), then the tail
    element by element. ``body`` may emit statements (a store) before returning its value."""
    full, rest = divmod(length, lanes)
    lane_acc, scalar = allocated_view((lanes,)), allocated_view((1,))
    every = span(0, lanes)
    T.buffer_store(lane_acc, splat(tirx.const(init, "float32"), lanes), [every])
    with T.serial(0, full) as j:
        T.buffer_store(lane_acc, combine(lane_acc[every], body(j * lanes, lanes)), [every])
    T.buffer_store(scalar, tirx.const(init, "float32"), [0])
    with T.serial(0, lanes) as e:
        T.buffer_store(scalar, combine(scalar[0], lane_acc[e]), [0])
    with T.serial(0, rest) as e:
        T.buffer_store(scalar, combine(scalar[0], body(full * lanes + e, 1)), [0])
    return scalar[0]


def row_map(length: int, lanes: int, body: Callable[[tirx.PrimExpr, int], None]) -> None:
    """``body(start, width)`` over ``[0, length)``: whole vectors, then the tail one by one."""
    full, rest = divmod(length, lanes)
    with T.serial(0, full) as j:
        body(j * lanes, lanes)
    with T.serial(0, rest) as e:
        body(full * lanes + e, 1)
