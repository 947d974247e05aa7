"""Applying a ``tune()`` work directory to a model: each kernel scheduled by its best record (the
verified winner where there is one), except the kernels the in-model check put back at their
default (``model_check_store.py``); a warning when tvm-sparse kernels have no record."""

from __future__ import annotations

import warnings

import tvm
from tvm import relax, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from schedules.tunable import RealizeTunableKernels, tunable_block
from tvm_sparse.pipeline import lower

from .flops import annotate_flops
from .model_check_store import ModelCheck, load_check, workload_key
from .records import UnmatchedRecordsWarning, open_database
from .verify import has_verified, open_verified

__all__ = ["apply_records", "lowered_with_records", "revert_to_default"]


def lowered_with_records(
    mod: tvm.IRModule, target: tvm.target.Target, work_dir: str
) -> tuple[tvm.IRModule, tvm.IRModule, ms.database.Database]:
    """``mod`` lowered; the same with each kernel replaced by its best record in ``work_dir``
    (the verified winner where there is one; templates not yet realized); all the records."""
    records = database = open_database(work_dir, create=False)
    if has_verified(work_dir):
        database = ms.database.OrderedUnionDatabase(open_verified(work_dir), records)
    lowered = annotate_flops(lower(mod, target))  # the workloads as tune() recorded them
    with target, database, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(lowered)
    return lowered, applied, records


def _warn_unmatched(lowered: tvm.IRModule, records: ms.database.Database, work_dir: str) -> None:
    """Warn when tvm-sparse kernels of ``lowered`` have no record in ``work_dir``: MetaSchedule
    keys records by the kernel's structure, so records of another model, or made before the
    kernel generator changed, silently match nothing."""
    kernels = [(gv.name_hint, f) for gv, f in lowered.functions.items() if tunable_block(f)]
    missing = sorted(n for n, f in kernels if not records.has_workload(_normalize_mod(f)))
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        warnings.warn(
            f"{work_dir}: {len(missing)} of {len(kernels)} tvm-sparse kernels have no tuning "
            f"record ({shown}) and build at their default schedule: the records are of another "
            "model or of an older kernel generator; tune() with this work_dir tunes them",
            UnmatchedRecordsWarning,
            stacklevel=4,  # compile()'s caller
        )


def revert_to_default(
    lowered: tvm.IRModule, applied: tvm.IRModule, workloads: set[str]
) -> tvm.IRModule:
    """``applied`` with the kernels of ``workloads`` (``workload_key``) back at their default
    schedule, templates realized."""
    mod = applied.clone()
    for gv, func in lowered.functions.items():
        if isinstance(func, tirx.PrimFunc) and workload_key(func) in workloads:
            mod.update_func(gv, func)
    return RealizeTunableKernels(mod)


def apply_records(
    mod: tvm.IRModule, target: tvm.target.Target, work_dir: str
) -> tuple[tvm.IRModule, ModelCheck | None]:
    """Lower ``mod`` and schedule each kernel by its best record in ``work_dir``, except those
    the in-model check of this model put back at their default; and that check (None when
    there is none for these records)."""
    lowered, applied, records = lowered_with_records(mod, target, work_dir)
    _warn_unmatched(lowered, records, work_dir)
    check = load_check(work_dir, mod, target)
    return revert_to_default(lowered, applied, set(check.reverted()) if check else set()), check
