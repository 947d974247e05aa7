"""PairStagedLayouts: pattern convs hand their output to the next one in its staged layout.

A pattern conv stages its input before computing: each core copies the rows its tiles read into
the layout its vectors load (lane-segmented rows: lane l of staged vector q holds column ``S * l
+ q``, a shuffle of the input's vectors per staged vector). Where a pattern conv's output feeds
only another pattern conv that reads lane-segmented rows in place (``staged_layout``: stride 1,
whole-row tiles covering the map's rows), the producer writes its output in that layout, padding
rows and columns included (each staged vector one shuffle of its finished accumulators), and
the consumer reads it with no staging at all. Measured here (``staged_pairs.md``: AVX-512,
groups of 4 filters, kernels called directly in one process): the consumer 1.18x on 64x64 on
56x56, 1.07-1.08x on VGG's 56-wide layers; the producer's store 0.99-1.04x; whole ResNet-18 /
VGG-16-BN 1.00x (the pairs save ~0.03 ms each).

Before::

    lv = R.call_tir(pattern_conv2d_a, (x, ...), R.Tensor((1, 64, 56, 56)))
    gv = R.call_tir(pattern_conv2d_b, (lv, ...), R.Tensor((1, 64, 56, 56)))

After (``StagedLayout.shape``: 1 staged plane of 58 rows of 4 x 16 lanes)::

    lv = R.call_tir(pattern_conv2d_a_staged, (x, ...), R.Tensor((1, 64, 1, 58, 64)))
    gv = R.call_tir(pattern_conv2d_b_staged, (lv, ...), R.Tensor((1, 64, 56, 56)))

Runs after ``RewriteConv2D``, on its templates, at their default knobs; tuning keeps the
consumer's vector width and whole-row tiles (its layout) and tunes the rest.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

from schedules.pattern_conv2d import (
    PATTERN_CONV2D,
    StagedLayout,
    template_input_layout,
    with_staged_layouts,
)
from schedules.tunable import PARAMS_ATTR, kernel_name, tunable_block

from .rewrite import rewrite_planned
from .utils import count_uses

CALL_TIR = tvm.ir.Op.get("relax.call_tir")
# Pairs are made where the consumer's rows are at least this many vectors (56 wide and up at 16
# lanes). Measured here (``benchmarks/bench_staged_pairs.py``, groups of 4 filters): reading
# the input staged 1.06-1.18x on 56-wide layers, writing it 1.03-1.06x; at 28 wide 1.01-1.05x
# and 0.97-0.98x (the staged rows are 32 columns for 28: more to store than is saved).
MIN_SEGMENTS = 4


def _pattern_conv(mod: tvm.IRModule, call: relax.Expr | None):
    """The pattern conv template a ``call_tir`` calls, else None."""
    if not isinstance(call, relax.Call) or not call.op.same_as(CALL_TIR):
        return None
    func = mod[call.args[0]]
    block = tunable_block(func)
    return func if block is not None and kernel_name(block) == PATTERN_CONV2D.name else None


def input_layout(mod: tvm.IRModule, call: relax.Call) -> StagedLayout | None:
    """The staged layout in which the pattern conv ``call`` reads its input in place at its
    default knobs (None: it stages its input itself, or its weight is all zeros: with a staged
    input, such a kernel uses no input array but ``filter_order``, and TVM's
    RewriteDataflowReshape takes a call using one input array for a reshape candidate, then
    fails ``HasReshapePattern``'s check that the body is one block)."""
    func = _pattern_conv(mod, call)
    if func is None or not json.loads(str(func.attrs[PARAMS_ATTR]))["num_kernels"]:
        return None
    return template_input_layout(func)


def plan_pairs(
    mod: tvm.IRModule, func: relax.Function, min_segments: int
) -> dict[relax.Call, dict]:
    """Per pattern conv call of ``func``: the staged layouts it reads / writes
    (``{"staged_input": layout}`` and / or ``{"staged_output": layout}``)."""
    var2val = relax.analysis.get_var2val(func)
    uses = count_uses(func)
    plan: dict[relax.Call, dict] = {}
    for consumer in var2val.values():
        layout = input_layout(mod, consumer)
        if layout is None or layout.segment < min_segments:
            continue
        data = consumer.args[1].fields[0]
        producer = var2val.get(data) if isinstance(data, relax.Var) else None
        func = _pattern_conv(mod, producer)
        if func is None or uses.get(data, 0) != 1:
            continue
        if json.loads(str(func.attrs[PARAMS_ATTR]))["epilogue"]["residual"]:
            continue  # (its kernel reads the residual in NCHW)
        plan.setdefault(producer, {})["staged_output"] = layout
        plan.setdefault(consumer, {})["staged_input"] = layout
    return plan


def PairStagedLayouts(min_segments: int = MIN_SEGMENTS) -> tvm.transform.Pass:  # noqa: N802
    """The module pass (see the module docstring): pairs whose consumer reads rows of at least
    ``min_segments`` vectors."""

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod: tvm.IRModule, plan: dict) -> None:
            super().__init__(mod)
            self.mod, self.plan, self.kernels = mod, plan, {}

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            layouts = self.plan.get(call)
            if layouts is None:
                return super().visit_call_(call)
            gv = call.args[0]
            key = (gv, layouts.get("staged_input"), layouts.get("staged_output"))
            if key not in self.kernels:
                func = with_staged_layouts(
                    self.mod[gv], layouts.get("staged_input"), layouts.get("staged_output")
                )
                self.kernels[key] = self.builder_.add_func(func, gv.name_hint + "_staged")
            out = call.ty_args[0]
            if "staged_output" in layouts:
                batch, channels = (int(d) for d in out.shape.values[:2])
                out = relax.TensorType(layouts["staged_output"].shape(batch, channels), "float32")
            args = [self.visit_expr(a) for a in call.args[1].fields]
            return relax.call_tir(self.kernels[key], args, out)

    @tvm.transform.module_pass(opt_level=0, name="PairStagedLayouts")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_planned(mod, lambda func: plan_pairs(mod, func, min_segments), _Rewriter)

    return transform
