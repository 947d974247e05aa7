"""plan_layers: every conv2d / matmul layer's plan, made once, in graph order.

``plan_layers(mod, target)`` returns ``{binding var: LayerPlan}``; ``PlanLayers(target, plans)``
is the same as a module pass that fills ``plans`` (the pipeline runs it before the rewrites,
which then only emit the kernels their plans name; the report is the plans' rows).
"""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

from .conv_plan import plan_conv2d
from .layer_plan import LayerPlan, Plans, PlanTarget
from .linear_plan import plan_matmul

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
