"""The compile pipeline: import a model, run tvm-sparse's graph passes, lower with TVM's CPU
passes and build a Relax VM executable. ``compile`` and ``tune`` are both made of these steps."""

from __future__ import annotations

import sys
import time
from typing import Any

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic.pipeline import legalize_passes

from relay_passes.bsr_conv1x1 import RewriteBSRConv1x1
from relay_passes.bsr_matmul import RewriteBSRMatmul
from relay_passes.dense_matmul import RewriteDenseMatmul
from relay_passes.fold_batched_weight import FoldBatchedWeights
from relay_passes.fold_linear_reshape import FoldLinearReshapes
from relay_passes.fuse_attention import ATTENTION_ATTR, FuseAttention
from relay_passes.layer_norm import RewriteLayerNorm
from relay_passes.layer_plan import Plans, PlanTarget
from relay_passes.max_pool2d import RewriteMaxPool2d
from relay_passes.pattern_conv2d import RewriteConv2D
from relay_passes.plan_layers import PlanLayers
from relay_passes.staged_layout import PairStagedLayouts
from relay_passes.unit_permute import UnitPermutesToReshapes
from schedules.rnn_sequence import (
    RECURRENT_ATTR,
    RecurrentGeometry,
    describe_recurrence,
    recurrence_flops,
)
from schedules.tvm_ops import DefaultCPUSchedules

from .formats.block import load_cost_table
from .frontend import import_model
from .report import LayerRecord
from .targets import cost_family, num_cores, vector_lanes, vector_registers

__all__ = ["build_executable", "lower", "plan_target", "prepare", "progress", "sparse_pipeline"]


def progress(msg: str, verbose: bool) -> None:
    """Print a ``[tvm-sparse]`` progress line to stderr when ``verbose``."""
    if verbose:
        print(f"[tvm-sparse] {msg}", file=sys.stderr, flush=True)


def prepare(
    model: Any, example_inputs: Any, tgt: tvm.target.Target, sparse: bool, verbose: bool = False
) -> tuple[tvm.IRModule, list[LayerRecord], list]:
    """Import ``model`` and run the sparse graph passes: the Relax module (tunable kernel
    templates at their default knobs) and the per-layer records of the report."""
    t0 = time.perf_counter()
    imported = import_model(model, example_inputs)
    progress(f"imported {imported.source} in {time.perf_counter() - t0:.1f}s", verbose)
    plans: Plans = {}
    mod = sparse_pipeline(tgt, sparse, plans)(imported.mod)
    records = [plan.record() for plan in sorted(plans.values(), key=lambda plan: plan.index)]
    progress(
        f"planned and rewrote {len(records)} layers in {time.perf_counter() - t0:.1f}s", verbose
    )
    records.extend(_remaining_ops(mod))
    _name_layers(records, imported.layer_names)
    return mod, records, imported.inputs


def plan_target(tgt: tvm.target.Target, sparse: bool) -> PlanTarget:
    """What the layer plans read from ``tgt``: lanes, registers, cores, the cost table."""
    costs = load_cost_table(str(tgt.attrs.get("mcpu", "")), cost_family(tgt)) if sparse else None
    return PlanTarget(vector_lanes(tgt), vector_registers(tgt), num_cores(tgt), costs, sparse)


def sparse_pipeline(tgt: tvm.target.Target, sparse: bool, plans: Plans) -> tvm.transform.Pass:
    """The graph passes tvm-sparse adds before TVM's own build pipeline.

    After the layout clean-ups and the attention fusion, ``PlanLayers`` decides every conv2d /
    matmul layer once, in graph order (format, packing, kernel, config, reason: ``plans``); each
    rewrite then emits the layers planned for its kernels. Stride-2 max-pools and LayerNorms
    take their own kernels.
    """
    target = plan_target(tgt, sparse)
    lanes, registers, cores = target.lanes, target.registers, target.cores
    return tvm.transform.Sequential(
        [
            UnitPermutesToReshapes,
            FoldLinearReshapes,
            FoldBatchedWeights,
            FuseAttention(lanes, registers, cores),
            PlanLayers(target, plans),
            RewriteBSRConv1x1(target.costs, num_threads=cores, lanes=lanes, plans=plans),
            RewriteBSRMatmul(target.costs, num_threads=cores, plans=plans),
            RewriteConv2D(cores, sparse, registers=registers, lanes=lanes, plans=plans),
            PairStagedLayouts(),
            RewriteDenseMatmul(lanes=lanes, registers=registers, cores=cores, plans=plans),
            RewriteMaxPool2d(lanes=lanes, shares=cores),
            RewriteLayerNorm(lanes, cores),
        ],
        name="tvm_sparse",
    )


def _name_layers(records: list[LayerRecord], names: dict[str, list[tuple[str, str]]]) -> None:
    """Give records the source model's layer names. Each record takes the first unused name
    whose weight shape matches (importers and passes may reorder layers; layers of one shape
    keep their order); without shapes, names go in order when the counts agree."""
    for op, op_names in names.items():
        recs = [r for r in records if r.op == op]
        if not recs or len(recs) != len(op_names):
            continue
        if any(not shape for _, shape in op_names):
            chosen = [name for name, _ in op_names]
        else:
            unused, chosen = list(op_names), []
            for rec in recs:
                hit = next((n for n in unused if n[1] == rec.shape.split()[0]), None)
                if hit is None:
                    break
                unused.remove(hit)
                chosen.append(hit[0])
        if len(chosen) == len(recs):
            for rec, name in zip(recs, chosen, strict=True):
                rec.name = name


def _remaining_ops(mod: tvm.IRModule) -> list[LayerRecord]:
    """Heavy ops still on TVM's default path (for the report)."""
    rows = []

    @relax.expr_functor.visitor
    class _Finder(relax.PyExprVisitor):
        def visit_call_(self, call: relax.Call) -> None:
            name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
            if name == "relax.nn.conv2d_transpose":
                shape = getattr(call.args[1].ty, "shape", None)
                rows.append(
                    LayerRecord(
                        name=name.split(".")[-1],
                        op=name.split(".")[-1],
                        shape="x".join(str(int(d)) for d in shape.values)
                        if shape is not None
                        else "?",
                        format="tvm",
                        density=1.0,
                        flops_dense=0,
                        flops_kept=0,
                        reason="no sparse kernel for this op yet: TVM default schedule",
                    )
                )
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Finder().visit_expr(func)
    return rows + _recurrent_layers(mod) + _attention_layers(mod)


def _kernel_calls(mod: tvm.IRModule, attr: str) -> list[Any]:
    """The ``attr`` of the kernel of every ``call_tir`` whose kernel carries it, in call order."""
    found = []
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                call = binding.value
                if isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_tir"):
                    kernel = mod[call.args[0]]
                    what = kernel.attrs.get(attr) if kernel.attrs else None
                    if what is not None:
                        found.append(what)
    return found


def _attention_layers(mod: tvm.IRModule) -> list[LayerRecord]:
    """A row per fused attention call."""
    rows = []
    for what in _kernel_calls(mod, ATTENTION_ATTR):
        heads, t, s = int(what["heads"]), int(what["queries"]), int(what["keys"])
        d, dv = int(what["depth"]), int(what["value_depth"])
        flops = 2 * heads * t * s * (d + dv)
        rows.append(
            LayerRecord(
                name=f"attention_{len(rows)}",
                op="attention",
                shape=f"{heads}x{t}x{s}, depth {d}",
                format="dense",
                density=1.0,
                flops_dense=flops,
                flops_kept=flops,
                reason="fused attention (scores, softmax, probs @ v in one kernel)",
                epilogue="mask" if int(what["masked"]) else "",
            )
        )
    return rows


def _recurrent_layers(mod: tvm.IRModule) -> list[LayerRecord]:
    """A row per recurrence kernel call (a GRU / LSTM / RNN layer direction)."""
    rows = []
    for what in _kernel_calls(mod, RECURRENT_ATTR):
        geom = RecurrentGeometry(
            cell=str(what["cell"]),
            steps=int(what["steps"]),
            batch=int(what["batch"]),
            hidden=int(what["hidden"]),
            reverse=bool(int(what["reverse"])),
        )
        flops = recurrence_flops(geom)
        stored = int(what.get("stored", geom.gates * geom.hidden * geom.hidden))
        density = stored / (geom.gates * geom.hidden * geom.hidden)
        fmt, packing = "dense", "W_hh packed dense"
        if str(what.get("format", "dense")) == "bsr":
            units, cols = (int(d) for d in what["block"])
            fmt = f"bsr {units}x{cols}"
            packing = f"W_hh in {units}x{cols} blocks, {density:.1%} stored"
        rows.append(
            LayerRecord(
                name=f"{geom.cell}_{len(rows)}",
                op=geom.cell,
                shape=describe_recurrence(geom),
                format=fmt,
                density=density,
                flops_dense=flops,
                flops_kept=round(flops * density),
                reason=f"the loop over time in one kernel, {packing}, gates fused",
            )
        )
    return rows


def lower(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse (TVM's CPU passes): the kernels that get schedules (and are tuned)."""
    with target:
        return tvm.transform.Sequential(legalize_passes(target))(mod)


def build_executable(scheduled: tvm.IRModule, target: tvm.target.Target) -> Any:
    """Build a lowered module whose tvm-sparse kernels are scheduled (TVM's own kernels without
    a record get the default CPU schedules) into a Relax VM executable."""
    with target:
        scheduled = DefaultCPUSchedules()(scheduled)
    return tvm.compile(scheduled, target=target)
