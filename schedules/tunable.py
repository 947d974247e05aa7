"""Generated kernels as MetaSchedule search spaces.

The sparse kernels are generated per layer (``pattern_conv2d_primfunc`` and friends) from a few
integer schedule knobs. To tune them with MetaSchedule, a kernel is emitted as a *template*: its
body wrapped in one opaque sblock annotated with

- ``schedule_rule = "tvm_sparse.<kernel>"``: MetaSchedule's ``ApplyCustomRule`` dispatches the
  block to the rule registered here as ``s_tir.meta_schedule.<target key>.tvm_sparse.<kernel>``
  (keys ``cpu`` and ``arm_cpu``), which samples every knob with ``sample_categorical`` and
  annotates the block with the choices (``tvm_sparse.knob.<name>``);
- the default knobs (``tvm_sparse.default.<name>``: the hand schedule), so the untuned template
  is one point of the space;

plus the function attribute ``tvm_sparse.params`` (JSON: the layer's geometry, patterns,
epilogue...). ``realize`` regenerates the kernel from the params and the block's knobs;
``RealizeTunableKernels`` does it for a whole module after a database is applied. Records are
plain MetaSchedule traces (samples + annotations), so any MetaSchedule database holds them.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

PARAMS_ATTR = "tvm_sparse.params"
# A template's FLOPs, which MetaSchedule's estimator (EstimateTIRFlops) reads instead of walking
# the body (``tvm_sparse.tuning.flops``); dropped, with the params, from the realized kernel.
FLOPS_ATTR = "estimated_flops"
KNOB_PREFIX = "tvm_sparse.knob."
DEFAULT_PREFIX = "tvm_sparse.default."
RULE_PREFIX = "tvm_sparse."
# TVM's mark of a final kernel (no MetaSchedule task, no default schedule); a template drops it.
SCHEDULED_ATTR = "tirx.is_scheduled"
TARGET_KEYS = ("cpu", "arm_cpu")
KERNEL_MODULES = (
    "schedules.pattern_conv2d",
    "schedules.pattern_conv2d_lanes",
    "schedules.bsr_matmul",
    "schedules.dense_gemm",
    "schedules.dense_linear",
    "schedules.dense_conv2d",
    "schedules.depthwise_conv2d",
)

Knobs = dict[str, int]


@dataclass(frozen=True)
class TunableKernel:
    """A kernel generator and its search space.

    ``build(params, knobs)`` returns the PrimFunc; ``space(params, default)`` the candidate values
    of each knob (the default's values are always kept).
    """

    name: str
    build: Callable[[dict, Knobs], tirx.PrimFunc]
    space: Callable[[dict, Knobs], dict[str, list[int]]]


KERNELS: dict[str, TunableKernel] = {}


def register(kernel: TunableKernel) -> TunableKernel:
    """Register ``kernel`` and its MetaSchedule rule for the x86 and ARM target keys."""
    KERNELS[kernel.name] = kernel
    for key in TARGET_KEYS:
        tvm.register_global_func(
            f"s_tir.meta_schedule.{key}.{RULE_PREFIX}{kernel.name}", _sample_rule, override=True
        )
    return kernel


def kernel(name: str) -> TunableKernel:
    """The registered kernel ``name`` (the kernel modules are imported on first use, e.g. in a
    MetaSchedule builder process)."""
    if name not in KERNELS:
        for module in KERNEL_MODULES:
            importlib.import_module(module)
    return KERNELS[name]


def template(func: tirx.PrimFunc, kernel: str, params: dict, knobs: Knobs) -> tirx.PrimFunc:
    """Wrap a generated kernel (built with ``knobs``) as a tunable template (a kernel built
    final, ``SCHEDULED_ATTR``, loses the mark: the template is MetaSchedule's to tune)."""
    annotations = {"schedule_rule": RULE_PREFIX + kernel}
    annotations.update({DEFAULT_PREFIX + k: int(v) for k, v in knobs.items()})
    inner = s_tir.SBlock([], [], [], kernel, func.body, annotations=annotations)
    root = s_tir.SBlock([], [], [], "root", s_tir.SBlockRealize([], True, inner))
    body = s_tir.SBlockRealize([], True, root)
    func = func.with_body(body).without_attr(SCHEDULED_ATTR)
    return func.with_attr(PARAMS_ATTR, json.dumps(params, sort_keys=True))


def tunable_block(func: tirx.BaseFunc) -> s_tir.SBlock | None:
    """The annotated sblock of a template (None for any other function)."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or PARAMS_ATTR not in func.attrs:
        return None
    node = func.body  # template(): root sblock -> the annotated sblock -> the kernel
    while isinstance(node, s_tir.SBlockRealize):
        if "schedule_rule" in node.block.annotations:
            return node.block
        node = node.block.body
    return None


def knobs_of(block: s_tir.SBlock) -> Knobs:
    """The block's knobs: the template's defaults, overridden by sampled values (annotations
    are never overwritten by ``Schedule.annotate``, hence two prefixes)."""
    return {**_annotated(block, DEFAULT_PREFIX), **_annotated(block, KNOB_PREFIX)}


def default_knobs(func: tirx.PrimFunc) -> Knobs:
    """A template's default knobs (the hand schedule)."""
    return _annotated(tunable_block(func), DEFAULT_PREFIX)


def _annotated(block: s_tir.SBlock, prefix: str) -> Knobs:
    """The block's integer annotations under ``prefix``, by name."""
    return {
        str(k)[len(prefix) :]: int(v)
        for k, v in block.annotations.items()
        if str(k).startswith(prefix)
    }


def kernel_name(block: s_tir.SBlock) -> str:
    return str(block.annotations["schedule_rule"])[len(RULE_PREFIX) :]


def realize(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The kernel a template (possibly re-annotated by a tuning record) stands for."""
    block = tunable_block(func)
    if block is None:
        return func
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    built = kernel(kernel_name(block)).build(params, knobs_of(block))
    for key, value in func.attrs.items():
        if key not in (PARAMS_ATTR, FLOPS_ATTR):
            built = built.with_attr(key, value)
    return built


def realize_module(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every template realized (other functions untouched)."""
    updates = {
        gv: realize(func) for gv, func in mod.functions.items() if tunable_block(func) is not None
    }
    if not updates:
        return mod
    mod = mod.clone()  # keeps the module's attrs and global infos
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


@tvm.transform.module_pass(opt_level=0, name="RealizeTunableKernels")
def RealizeTunableKernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:  # noqa: N802 (TVM naming)
    """Module pass: regenerate every tunable template from its (tuned or default) knobs."""
    return realize_module(mod)


def knob_space(func: tirx.PrimFunc) -> dict[str, list[int]]:
    """Every knob's candidate values for a template, the default first."""
    block = tunable_block(func)
    if block is None:
        return {}
    default = _annotated(block, DEFAULT_PREFIX)
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    space = kernel(kernel_name(block)).space(params, default)
    out = {}
    for knob, value in default.items():
        values = [v for v in space.get(knob, []) if v != value]
        out[knob] = [value, *values]
    return out


def _sample_rule(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """The MetaSchedule rule: sample each knob (the default twice as likely), annotate."""
    func = next(f for f in sch.mod.functions.values() if tunable_block(f) is not None)
    for knob, values in knob_space(func).items():
        weights = [2.0] + [1.0] * (len(values) - 1)
        probs = [w / sum(weights) for w in weights]
        choice = sch.sample_categorical(candidates=values, probs=probs)
        sch.annotate(block, KNOB_PREFIX + knob, choice)
    return [sch]
