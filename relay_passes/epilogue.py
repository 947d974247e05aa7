"""Anchor op + elementwise epilogue (bias add, residual add, ReLU / ReLU6) -> one fused kernel.

Shared by the rewrite passes: each rewrites an anchor op (conv2d, matmul) together with the chain
``act(anchor + bias + residual)`` when every intermediate value has no other user.
``anchored_rewrite_pass`` is the module-pass skeleton; a pass supplies what an eligible anchor
is and how to emit the fused call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

ACTIVATIONS = {"relax.nn.relu": "relu", "relax.nn.relu6": "relu6"}


@dataclass
class EpilogueMatch:
    """An anchor call and what follows it; ``absorbed`` are the vars the fused op replaces."""

    anchor: relax.Call
    bias: np.ndarray | None = None  # per output channel, 1-D
    residual: relax.Expr | None = None
    activation: str = "none"
    absorbed: list[relax.Var] = field(default_factory=list)


def _clip_activation(call: relax.Call) -> str | None:
    """``clip(x, 0, 6)`` (how torch's relu6 imports) as "relu6"."""
    if getattr(call.op, "name", "") != "relax.clip" or len(call.args) != 3:
        return None
    bounds = [getattr(a, "value", None) for a in call.args[1:]]
    if bounds[0] == 0 and bounds[1] == 6:
        return "relu6"
    return None


def const_value(expr: relax.Expr) -> np.ndarray | None:
    """The numpy value of a Relax constant, or None."""
    value = getattr(expr, "value", None)
    if isinstance(expr, relax.Var) or value is None or not hasattr(value, "numpy"):
        return None
    return value.numpy()


def static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    """The static shape of a tensor-typed expression, or None if unknown."""
    ty = expr.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):
        return None


def count_uses(func: relax.Function) -> dict[relax.Var, int]:
    """How many times each var is referenced in ``func``."""
    counts: dict[relax.Var, int] = {}

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_var_(self, var: relax.Var) -> None:
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var: relax.Var) -> None:
            counts[var] = counts.get(var, 0) + 1

    _Counter().visit_expr(func)
    return counts


def channel_bias(value: np.ndarray, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``value`` as a 1-D per-channel bias if it broadcasts along ``axis`` of ``out_shape`` only."""
    channels = out_shape[axis]
    padded = (1,) * (len(out_shape) - value.ndim) + tuple(value.shape)
    if len(padded) != len(out_shape) or value.size != channels:
        return None
    if all(d == 1 for i, d in enumerate(padded) if i != axis % len(out_shape)):
        return value.reshape(-1).astype(np.float32)
    return None


def match_epilogue(
    root: relax.Call,
    var2val: dict[relax.Var, relax.Expr],
    uses: dict[relax.Var, int],
    is_anchor: Callable[[relax.Call], bool],
    channel_axis: int,
) -> EpilogueMatch | None:
    """Match ``root`` as the last op of ``act?(add_residual?(add_bias?(anchor)))``.

    ``channel_axis`` is the anchor output's channel axis (1 for NCHW conv, -1 for matmul).
    """

    def inner(expr: relax.Expr) -> relax.Call | None:
        if isinstance(expr, relax.Var) and uses.get(expr, 0) == 1 and expr in var2val:
            value = var2val[expr]
            return value if isinstance(value, relax.Call) else None
        return None

    def strip(call: relax.Call, absorbed: list, stage: int) -> EpilogueMatch | None:
        """stage 0: activation allowed; 1: residual add; 2: bias add; 3: anchor only."""
        if is_anchor(call):
            return EpilogueMatch(anchor=call, absorbed=absorbed)
        op_name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        act = ACTIVATIONS.get(op_name) or _clip_activation(call)
        if stage == 0 and act:
            nxt = inner(call.args[0])
            match = strip(nxt, absorbed + [call.args[0]], 1) if nxt is not None else None
            if match is not None:
                match.activation = act
            return match
        if op_name == "relax.add" and stage <= 2:
            for this, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                nxt = inner(this)
                if nxt is None:
                    continue
                value = const_value(other)
                if value is not None:
                    match = strip(nxt, absorbed + [this], 3)
                    if match is not None and match.bias is None:
                        bias = channel_bias(value, static_shape(match.anchor), channel_axis)
                        if bias is not None:
                            match.bias = bias
                            return match
                    continue
                if stage <= 1 and static_shape(other) == static_shape(call):
                    match = strip(nxt, absorbed + [this], 2)
                    # (not where the add broadcasts the anchor's output up to the residual's
                    # shape: x + conv(mean(x)); the kernel writes the anchor's shape)
                    if match is not None and static_shape(match.anchor) == static_shape(call):
                        match.residual = other
                        return match
        return None

    return strip(root, [], 0)


Emit = Callable[[relax.BlockBuilder, EpilogueMatch, Callable[[relax.Expr], relax.Expr]], relax.Expr]


def anchored_rewrite_pass(
    name: str,
    op_name: str,
    unsupported: Callable[[relax.Call], str | None],
    emit: Emit,
    channel_axis: int,
    on_fallback: Callable[[relax.Call, str], None] = lambda call, reason: None,
) -> tvm.transform.Pass:
    """A module pass rewriting every eligible ``op_name`` call (and its epilogue) via ``emit``.

    ``unsupported(call)`` says why a call cannot be rewritten (then ``on_fallback`` is told and
    the call stays on TVM's path); ``emit(builder, match, visit)`` returns the replacement, where
    ``visit`` maps an original operand to the rewritten module's expression.
    """

    def is_anchor(call: relax.Call) -> bool:
        return getattr(call.op, "name", "") == op_name and unsupported(call) is None

    def plan_function(func: relax.Function) -> dict:
        var2val = relax.analysis.get_var2val(func)
        uses = count_uses(func)
        plan, absorbed = {}, set()
        bindings = [b for block in func.body.blocks for b in block.bindings]
        for binding in reversed(bindings):
            value = binding.value
            if binding.var in absorbed or not isinstance(value, relax.Call):
                continue
            if getattr(value.op, "name", "") == op_name:
                reason = unsupported(value)
                if reason is not None:
                    plan[value] = reason  # reported when visited, so records keep graph order
                    continue
            match = match_epilogue(value, var2val, uses, is_anchor, channel_axis)
            if match is not None:
                plan[value] = match
                absorbed.update(match.absorbed)
        return plan

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule, plan: dict) -> None:
            super().__init__(mod)
            self.plan = plan

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            match = self.plan.get(call)
            if match is None or isinstance(match, str):
                if match is not None:
                    on_fallback(call, match)
                return super().visit_call_(call)
            return emit(self.builder_, match, self.visit_expr)

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_planned(mod, plan_function, _Rewriter)

    return transform


def rewrite_planned(mod: tvm.IRModule, plan_function: Callable, rewriter: type) -> tvm.IRModule:
    """Plan every Relax function of ``mod`` (``plan_function(func)``), rewrite those with a
    plan (``rewriter(mod, plan)``: a ``PyExprMutator``), then drop what became dead."""
    plans = {
        gv: plan_function(func)
        for gv, func in mod.functions.items()
        if isinstance(func, relax.Function)
    }
    for gv, plan in plans.items():
        if plan:
            mutator = rewriter(mod, plan)
            mutator.builder_.update_func(gv, mutator.visit_expr(mod[gv]))
            mod = mutator.builder_.get()
    return relax.transform.DeadCodeElimination()(mod)


def describe(match: EpilogueMatch) -> str:
    """ "bias+residual+relu"-style summary of what was fused."""
    parts = ["bias"] if match.bias is not None else []
    parts += ["residual"] if match.residual is not None else []
    parts += [match.activation] if match.activation != "none" else []
    return "+".join(parts)


def add_kernel(
    bb: relax.BlockBuilder, cache: dict, key: tuple, name: str, make: Callable[[], object]
) -> tvm.ir.GlobalVar:
    """Add the PrimFunc ``make()`` once per ``key`` (layers with equal kernels share one)."""
    if key not in cache:
        cache[key] = bb.add_func(make(), name)
    return cache[key]
