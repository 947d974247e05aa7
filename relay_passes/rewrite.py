"""The module-pass skeleton of the anchored rewrites: plan each function, then rewrite it.

``anchored_rewrite_pass`` rewrites every eligible anchor call (conv2d, matmul) together with the
epilogue ``relay_passes.epilogue`` matches after it into what the pass's ``emit`` returns.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from .epilogue import EpilogueMatch, match_epilogue
from .utils import count_uses

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
    ``visit`` maps an original operand to the rewritten module's expression. ``channel_axis`` is
    the anchor output's channel axis (1 for NCHW conv, -1 for matmul).
    """

    def is_anchor(call: relax.Call) -> bool:
        return unsupported(call) is None

    def plan_function(mod: tvm.IRModule, func: relax.Function) -> dict:
        var2val = relax.analysis.get_var2val(func)
        uses = count_uses(func)
        # (the single-use rule: the matcher looks through only the vars used once)
        single_use = {
            var: value
            for var, value in var2val.items()
            if uses.get(var, 0) == 1 and isinstance(value, relax.Call)
        }
        plan, absorbed = {}, set()
        bindings = [b for block in func.body.blocks for b in block.bindings]
        # From the last binding back, so each anchor joins the longest chain after it.
        for binding in reversed(bindings):
            value = binding.value
            if binding.var in absorbed or not isinstance(value, relax.Call):
                continue
            if getattr(value.op, "name", "") == op_name:
                reason = unsupported(value)
                if reason is not None:
                    plan[value] = reason  # reported when visited, so records keep graph order
                    continue
            match = match_epilogue(value, single_use, op_name, is_anchor, channel_axis, mod)
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
        return rewrite_planned(mod, lambda func: plan_function(mod, func), _Rewriter)

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
