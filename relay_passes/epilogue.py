"""The epilogue matcher: ``act?(anchor [+ bias] [+ residual])`` as ``relax.dpl`` patterns.

An anchor (conv2d, matmul) fuses with the elementwise chain after it when every intermediate
value has no other user:

- bias: ``add`` of a constant that broadcasts along the anchor output's channel axis only
  ((1, C, 1, 1) / (C, 1, 1) for NCHW conv, (C,) / (1, C) for matmul), 1-D in the match;
- residual: ``add`` of a non-constant of the add's own shape, where the anchor's output already
  has that shape (the kernel writes the anchor's shape, so no broadcasting add);
- activation: ``nn.relu`` or ``maximum(x, 0)`` -> "relu"; ``clip(x, 0, 6)`` (torch's relu6) or
  ``minimum(maximum(x, 0), 6)`` (ONNX's ``Clip(0, 6)``, which imports as ``call_tir`` of TOPI's
  maximum / minimum), its bounds scalar constants -> "relu6"; ``nn.gelu`` / ``nn.gelu_tanh``
  (GELU's erf and tanh forms) -> "gelu" / "gelu_tanh".

The single-use rule is kept by matching through ``var2val`` restricted to the vars used once.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, reduce

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.dpl import DFPattern, is_const, is_op, is_tuple, reject, wildcard
from tvm_ffi import structural_equal

from .utils import const_value, static_shape

# (Relax has no relu6 op: torch's relu6 imports as clip, ONNX's Clip as maximum + minimum)
ACTIVATIONS = {"relax.nn.relu": "relu", "relax.nn.gelu": "gelu", "relax.nn.gelu_tanh": "gelu_tanh"}


@dataclass
class EpilogueMatch:
    """An anchor call and what follows it; ``absorbed`` are the vars the fused op replaces."""

    anchor: relax.Call
    bias: np.ndarray | None = None  # per output channel, 1-D
    residual: relax.Expr | None = None
    activation: str = "none"
    absorbed: list[relax.Var] = field(default_factory=list)

    def operands(
        self, visit: Callable, bias: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> list[relax.Expr]:
        """The fused kernel's epilogue arguments, after its own: the bias (laid out by ``bias``,
        e.g. padded or reordered like the packed weight), then the visited residual."""
        args: list[relax.Expr] = []
        if self.bias is not None:
            args.append(relax.const(self.bias if bias is None else bias(self.bias)))
        if self.residual is not None:
            args.append(visit(self.residual))
        return args


@dataclass(frozen=True)
class EpiloguePattern:
    """The chain's patterns; ``root`` matches the chain's last op, the others name its parts."""

    root: DFPattern
    anchor: DFPattern
    bias: DFPattern
    bias_add: DFPattern
    chain: DFPattern  # what the residual is added to: the anchor or its bias add
    residual_add: DFPattern
    floor: DFPattern  # maximum(x, 0)
    floor_value: DFPattern
    ceiling_value: DFPattern


def _clamp(op_name: str, x: DFPattern, bound: DFPattern) -> DFPattern:
    """``op_name(x, bound)``, as the Relax op or as a ``call_tir`` (how ONNX's Clip imports:
    ``emit_te`` of TOPI's maximum / minimum; ``clamp_kind`` checks which kernel it calls)."""
    return is_op(op_name)(x, bound) | is_op("relax.call_tir")(
        wildcard(), is_tuple([x, bound]), add_constraint=False
    )


@cache
def epilogue_pattern(op_name: str) -> EpiloguePattern:
    """The pattern of an ``op_name`` anchor and its epilogue."""
    anchor = is_op(op_name)(varg_default_wildcard=True)
    bias = is_const()
    bias_add = is_op("relax.add")(anchor, bias)
    chain = bias_add | anchor
    residual_add = is_op("relax.add")(chain, reject(is_const()))
    body = residual_add | bias_add | anchor
    floor_value, ceiling_value = is_const(), is_const()
    floor = _clamp("relax.maximum", body, floor_value)
    activations = [is_op(name)(body) for name in ACTIVATIONS] + [
        is_op("relax.clip")(body, wildcard(), wildcard()),
        _clamp("relax.minimum", floor, ceiling_value),
        floor,
    ]
    root = reduce(operator.or_, activations) | body
    return EpiloguePattern(
        root, anchor, bias, bias_add, chain, residual_add, floor, floor_value, ceiling_value
    )


def channel_bias(value: np.ndarray, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``value`` as a 1-D per-channel bias if it broadcasts along ``axis`` of ``out_shape`` only."""
    channels = out_shape[axis]
    padded = (1,) * (len(out_shape) - value.ndim) + tuple(value.shape)
    if len(padded) != len(out_shape) or value.size != channels:
        return None
    if all(d == 1 for i, d in enumerate(padded) if i != axis % len(out_shape)):
        return value.reshape(-1).astype(np.float32)
    return None


def _is_scalar(expr: relax.Expr, number: float) -> bool:
    value = const_value(expr)
    return value is not None and value.ndim == 0 and value == number


def _bound_to(var2val: dict[relax.Var, relax.Call], expr: relax.Expr, call: relax.Call) -> bool:
    """Whether ``expr`` is a var of ``var2val`` bound to ``call``."""
    value = var2val.get(expr) if isinstance(expr, relax.Var) else None
    return value is not None and value.same_as(call)


def clamp_kind(call: relax.Call, mod: tvm.IRModule | None) -> str | None:
    """ "maximum" / "minimum" where ``call`` is that elementwise op of a tensor and a bound: the
    Relax op, or a ``call_tir`` of a PrimFunc equal to TOPI's (``emit_te``) for these operands."""
    op = call.op if isinstance(call, relax.Call) else None
    op_name = op.name if isinstance(op, tvm.ir.Op) else ""
    if op_name in ("relax.maximum", "relax.minimum"):
        return op_name.removeprefix("relax.")
    func = mod.functions.get(call.args[0]) if mod is not None and call.args else None
    if op_name != "relax.call_tir" or not isinstance(func, tvm.tirx.PrimFunc):
        return None
    operands = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
    types = [arg.ty for arg in operands]
    if len(types) != 2 or any(not hasattr(getattr(t, "shape", None), "values") for t in types):
        return None
    x, bound = (te.placeholder(t.shape.values, t.dtype) for t in types)
    for kind, compute in (("maximum", topi.maximum), ("minimum", topi.minimum)):
        reference = te.create_prim_func([x, bound, compute(x, bound)])
        if structural_equal(func, reference.without_attr("global_symbol")):
            return kind
    return None


def _activation(
    root: relax.Call, matched: dict, pat: EpiloguePattern, mod: tvm.IRModule | None
) -> str | None:
    """The activation ``root`` applies ("none" if it is no activation), None if unsupported."""
    if any(root.same_as(matched[p]) for p in (pat.anchor, pat.bias_add, pat.residual_add)):
        return "none"
    op_name = root.op.name if isinstance(root.op, tvm.ir.Op) else ""
    if op_name in ACTIVATIONS:
        return ACTIVATIONS[op_name]
    if op_name == "relax.clip":  # clip(x, 0, 6): how torch's relu6 imports
        bounds = [getattr(a, "value", None) for a in root.args[1:]]
        return "relu6" if bounds[0] == 0 and bounds[1] == 6 else None
    low, high = matched[pat.floor_value], matched[pat.ceiling_value]
    kind = clamp_kind(root, mod)
    if kind == "maximum" and root.same_as(matched[pat.floor]):
        return "relu" if _is_scalar(low, 0) else None
    if kind == "minimum" and clamp_kind(matched[pat.floor], mod) == "maximum":
        return "relu6" if _is_scalar(low, 0) and _is_scalar(high, 6) else None
    return None


def _operands(call: relax.Call) -> list[relax.Expr]:
    """``call``'s arguments, a tuple argument (``call_tir``'s) as its fields."""
    return [x for arg in call.args for x in (arg.fields if isinstance(arg, relax.Tuple) else [arg])]


def _check(
    root: relax.Call,
    matched: dict,
    pat: EpiloguePattern,
    var2val: dict[relax.Var, relax.Call],
    is_anchor: Callable[[relax.Call], bool],
    channel_axis: int,
    mod: tvm.IRModule | None,
) -> EpilogueMatch | None:
    """The match ``matched`` stands for, or None where a part is not fusable."""
    anchor = matched[pat.anchor]
    activation = _activation(root, matched, pat, mod)
    if activation is None or not is_anchor(anchor):
        return None
    match = EpilogueMatch(anchor=anchor, activation=activation)
    if matched[pat.bias_add] is not None:
        value = const_value(matched[pat.bias])
        match.bias = channel_bias(value, static_shape(anchor), channel_axis)
        if match.bias is None:
            return None
    if matched[pat.residual_add] is not None:
        add = matched[pat.residual_add]
        chain = matched[pat.chain]
        _, other = add.args if _bound_to(var2val, add.args[0], chain) else add.args[::-1]
        if not static_shape(other) == static_shape(add) == static_shape(anchor):
            return None
        match.residual = other
    inner = [matched[p] for p in (pat.anchor, pat.bias_add, pat.residual_add, pat.floor)]
    inner = [call for call in inner if call is not None and not call.same_as(root)]
    match.absorbed = [
        arg
        for parent in [root, *inner]
        for arg in _operands(parent)
        if any(_bound_to(var2val, arg, call) for call in inner)
    ]
    return match


def match_epilogue(
    root: relax.Call,
    var2val: dict[relax.Var, relax.Call],
    op_name: str,
    is_anchor: Callable[[relax.Call], bool],
    channel_axis: int,
    mod: tvm.IRModule | None = None,
) -> EpilogueMatch | None:
    """Match ``root`` as the last op of ``act?(anchor [+ bias] [+ residual])``.

    ``var2val`` holds the single-use vars bound to calls (the intermediates that may fuse);
    ``is_anchor`` says whether an ``op_name`` call can be rewritten; ``channel_axis`` is the
    anchor output's channel axis (1 for NCHW conv, -1 for matmul); ``mod`` holds the PrimFuncs
    a ``call_tir`` clamp may call.
    """
    pat = epilogue_pattern(op_name)
    while True:
        matched = pat.root.extract_matched_expr(root, var2val)
        if matched is None:
            return None
        matched = {p: matched.get(p) for p in _parts(pat)}
        match = _check(root, matched, pat, var2val, is_anchor, channel_axis, mod)
        if match is not None or matched[pat.residual_add] is None:
            return match
        # Where the first operand does not fuse as the chain, the other may: ``add`` matches
        # commutatively, so the rejected chain is hidden from the matcher and it tries again.
        chain = matched[pat.chain]
        hidden = {var: value for var, value in var2val.items() if not value.same_as(chain)}
        if len(hidden) == len(var2val):
            return None
        var2val = hidden


def _parts(pat: EpiloguePattern) -> tuple[DFPattern, ...]:
    """The named parts, each looked up in a match (None where that part is absent)."""
    return (
        pat.anchor, pat.bias, pat.bias_add, pat.chain, pat.residual_add, pat.floor,
        pat.floor_value, pat.ceiling_value,
    )  # fmt: skip


def describe(match: EpilogueMatch) -> str:
    """ "bias+residual+relu"-style summary of what was fused."""
    parts = ["bias"] if match.bias is not None else []
    parts += ["residual"] if match.residual is not None else []
    parts += [match.activation] if match.activation != "none" else []
    return "+".join(parts)
