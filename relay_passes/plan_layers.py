"""plan_layers: every conv2d / matmul layer's plan, made once, in graph order.

``plan_layers(mod, target)`` returns ``{binding var: LayerPlan}``; ``PlanLayers(target, plans)``
is the same as a module pass that fills ``plans`` (the pipeline runs it before the rewrites,
which then only emit the kernels their plans name; the report is the plans' rows).
``planned_rewrite`` is the skeleton of those rewrites.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from .conv_plan import plan_conv2d
from .epilogue import EpilogueMatch, describe
from .layer_plan import LayerPlan, PlanEmit, Plans, PlanTarget, planned_calls
from .linear_plan import plan_matmul
from .rewrite import Emit, anchored_rewrite_pass

PLANNERS: dict[str, Callable[[relax.Call, int, PlanTarget], LayerPlan]] = {
    "relax.nn.conv2d": plan_conv2d,
    "relax.matmul": plan_matmul,
}


def plan_layers(
    mod: tvm.IRModule, target: PlanTarget, ops: tuple[str, ...] = tuple(PLANNERS)
) -> Plans:
    """The plan of every ``ops`` call (conv2d and matmul by default) of ``mod``'s Relax
    functions, keyed by the var it is bound to, in binding order."""
    plans: Plans = {}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                op = getattr(getattr(binding.value, "op", None), "name", "")
                if op in ops:
                    plans[binding.var] = PLANNERS[op](binding.value, len(plans), target)
    return plans


def PlanLayers(target: PlanTarget, plans: Plans) -> tvm.transform.Pass:  # noqa: N802
    """A module pass putting ``plan_layers(mod, target)`` in ``plans`` (the module unchanged)."""

    @tvm.transform.module_pass(opt_level=0, name="PlanLayers")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        plans.clear()
        plans.update(plan_layers(mod, target))
        return mod

    return transform


def planned_rewrite(
    name: str,
    op_name: str,
    kernels: tuple[str, ...],
    plans: Plans | None,
    target: PlanTarget,
    emit: PlanEmit,
    channel_axis: int,
    on_plans: Callable[[list[LayerPlan]], None] = lambda plans: None,
) -> tvm.transform.Pass:
    """A module pass rewriting every ``op_name`` call whose plan names one of ``kernels`` (with
    its epilogue) by ``emit(bb, match, visit, plan)``. ``plans`` are the pipeline's, made once;
    without them (a pass used alone) the pass plans its ``op_name`` calls for ``target``.
    ``on_plans`` is then told the plans in graph order (a pass used alone reports from them)."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        planned = plans if plans is not None else plan_layers(mod, target, (op_name,))
        calls = planned_calls(mod, planned)

        def unsupported(call: relax.Call) -> str | None:
            plan = calls.get(call)
            if plan is None or plan.kernel not in kernels:
                return "planned for another kernel" if plan is not None else "no plan"
            return None

        def fused(bb: relax.BlockBuilder, match: EpilogueMatch, visit: Callable) -> relax.Expr:
            plan = calls[match.anchor]
            plan.epilogue = describe(match)
            return emit(bb, match, visit, plan)

        rewrite: Emit = fused
        out = anchored_rewrite_pass(name, op_name, unsupported, rewrite, channel_axis)(mod)
        on_plans(sorted(planned.values(), key=lambda plan: plan.index))
        return out

    return transform
