"""Default CPU schedules for the ops left on TVM's path (pooling, means, element-wise, copies).

TVM 0.27 legalizes these ops into plain loop nests and, on CPU, builds them as they are: one
thread, scalar code (ResNet-18's 3x3/2 max-pool took 0.40 ms that way, 6 % of the pruned model).
``CPUFallback`` is a dlight rule (``s_tir.dlight.ApplyDefaultSchedule``) giving each such kernel a
sound schedule without tuning:

- injective producers (a pool's padding) are inlined into their consumer;
- an injective block: all loops fused, split into vector-wide chunks (the innermost vectorized
  when the extent allows it), the rest parallel;
- a reduction block: the innermost spatial loop that splits into whole vectors is vectorized
  inside the reduction loops (a pool's output columns), the outer spatial loops parallel;
- kernels with less than ``MIN_PARALLEL_WORK`` iterations stay serial (a thread-pool launch
  costs more than they do).

Functions already scheduled (tvm-sparse's generated kernels, MetaSchedule's records) are left
alone; stride-2 max-pools have their own kernel since (``schedules.max_pool2d``: 0.25 -> 0.05
ms on that pool, whose stride-2 and padding loads this schedule takes lane by lane). Tuning
(``tvm_sparse.tune``) replaces these schedules with searched ones.

Before scheduling, every kernel's float ``max(x, c)`` / ``min(x, c)`` against a constant (a
legalized ``relu``, ``clip``) is rewritten to keep NaN as PyTorch does (``schedules.epilogue``).
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

from .epilogue import KeepNaNClamps

MIN_PARALLEL_WORK = 1 << 15


def _top_blocks(func: tirx.PrimFunc) -> tuple[s_tir.Schedule, list] | None:
    """A schedule of ``func`` and its top-level blocks, or None when there is nothing for this
    rule: no blocks (hand-written kernels), or loops already parallel / vectorized."""
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except Exception:  # noqa: BLE001 (not a block-structured function)
        return None
    if not blocks:
        return None
    for block in blocks:
        if any(sch.get(loop).kind != tirx.ForKind.SERIAL for loop in sch.get_loops(block)):
            return None
    return sch, list(blocks)


def _extent(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _is_spatial(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[bool]:
    return [iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars]


class CPUFallback(CPUScheduleRule):
    """Parallel + vectorized default schedule for kernels TVM would build serial (see module)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        found = _top_blocks(func)
        if found is None:
            return None
        sch, blocks = found
        lanes = max(4, llvm_get_vector_width(target) // 32)
        kept = []
        for block in blocks[:-1]:  # inline injective producers (e.g. a pool's padding)
            if all(_is_spatial(sch, block)):
                try:
                    sch.compute_inline(block)
                    continue
                except s_tir.ScheduleError:
                    pass
            kept.append(block)
        for block in [*kept, blocks[-1]]:
            try:
                self._schedule_block(sch, block, lanes)
            except s_tir.ScheduleError:
                continue  # this block keeps TVM's default (serial) loops
        return sch

    @staticmethod
    def _schedule_block(sch: s_tir.Schedule, block: s_tir.SBlockRV, lanes: int) -> None:
        loops = sch.get_loops(block)
        spatial = _is_spatial(sch, block)
        if len(loops) != len(spatial) or not loops:
            return  # not a plain loop nest over the block's iterators
        extents = [_extent(sch, loop) for loop in loops]
        if any(e is None for e in extents):
            return
        work = math.prod(extents)
        parallel_work = work >= MIN_PARALLEL_WORK
        if all(spatial):
            fused = sch.fuse(*loops)
            if work % lanes == 0:
                outer, inner = sch.split(fused, factors=[None, lanes])
                sch.vectorize(inner)
            else:
                outer = fused
            if parallel_work:
                sch.parallel(outer)
            return
        leading = next(i for i, s in enumerate(spatial) if not s)
        if leading == 0 or not all(not s for s in spatial[leading:]):
            return  # reduction loops first or interleaved: leave it to tuning
        # Vectorize the innermost spatial loop that splits into whole vectors, moved inside the
        # reduction loops (a pool's output columns: each vector lane is one output).
        widths = (lanes, 8, 4)
        fits = [(i, w) for i in reversed(range(leading)) for w in widths if extents[i] % w == 0]
        pick = fits[0] if fits else None
        reduction = loops[leading:]
        if pick is None:
            if parallel_work:
                sch.parallel(sch.fuse(*loops[:leading]))
            return
        i, width = pick
        outer_part, vec = sch.split(loops[i], factors=[None, width])
        rest = [*loops[:i], outer_part, *loops[i + 1 : leading]]
        sch.reorder(*rest, *reduction, vec)
        if parallel_work:
            sch.parallel(sch.fuse(*rest[:i]) if i > 0 else rest[0])
        sch.vectorize(vec)
        sch.decompose_reduction(block, reduction[0])


def DefaultCPUSchedules() -> tvm.transform.Pass:  # noqa: N802 (TVM's pass naming)
    """The module pass: NaN-keeping clamps (``KeepNaNClamps``: a legalized ``relu`` / ``clip``
    returns NaN for NaN, as PyTorch's do) in every PrimFunc, then ``CPUFallback`` on every
    not-yet-scheduled one (run it under the target, after legalization)."""
    return tvm.transform.Sequential(
        [KeepNaNClamps, dlight.ApplyDefaultSchedule(CPUFallback())], name="DefaultCPUSchedules"
    )
