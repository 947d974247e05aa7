"""``tvm_sparse.tune``: MetaSchedule tuning of every kernel of a model, resumable.

    tvm_sparse.tune(model, x, target="x86", trials=400, work_dir="tuned/")
    cm = tvm_sparse.compile(model, x, tuning="tuned/")

Every kernel of the lowered model is a task: the sparse (and dense-direct) kernels of tvm-sparse
are knob-sampled templates (``schedules/tunable.py``), TVM's own kernels get MetaSchedule's
default rules. Templates carry their useful FLOPs for MetaSchedule's estimator (``flops.py``);
a kernel it cannot analyse, and a final hand kernel, are no tasks. Tasks are tuned one after
another (budget split by their share of the measured default time) with one XGBoost cost model.
Records go to MetaSchedule's JSON database in ``work_dir`` as they are measured: a killed run
keeps them, and a new run skips the trials a task already has. Each task's best few records and
its default are then re-timed in interleaved rounds and the winner kept in ``work_dir/verified``
(``verify.py``), which compile prefers. Last, the tuned kernels are compared with their defaults
inside the model, and those slower there go back to the default (``model_check.py``).
``compile(..., tuning=work_dir)`` applies the records and that choice (``apply.py``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

from schedules.tunable import SCHEDULED_ATTR, tunable_block
from tvm_sparse.errors import last_line
from tvm_sparse.frontend import random_inputs
from tvm_sparse.pipeline import lower, prepare
from tvm_sparse.rpc import connect, split_addr
from tvm_sparse.targets import num_cores, resolve_target
from tvm_sparse.validation import check_int, check_work_dir

from .flops import UntunableKernelWarning, annotate_flops, estimate_flops
from .measure import make_builder, make_runner, real_arguments
from .model_check import check_model
from .model_check_store import ModelCheck, store_check
from .progress import Progress, mean_ms
from .records import UnmatchedRecordsWarning, open_database, trials_done
from .search import KnobFeatures, space_for, strategy_for
from .verify import open_verified, verify_task

__all__ = [
    "ModelCheck",
    "TaskResult",
    "TuningResult",
    "UnmatchedRecordsWarning",
    "UntunableKernelWarning",
    "tune",
]


@dataclass
class TaskResult:
    name: str
    weight: int  # calls per model run
    template: bool  # a tvm-sparse kernel (knob space) rather than a TVM kernel
    flops: float = 1.0  # per call, as MetaSchedule estimates it (templates: the useful FLOPs)
    trials: int = 0  # measured records in the database
    default_ms: float | None = None
    best_ms: float | None = None  # MetaSchedule's best single measurement
    verified_ms: float | None = None  # the kept candidate's median when re-timed
    verified: str = ""  # which was kept: "default" / "tuned"


@dataclass
class TuningResult:
    work_dir: str
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0
    model_check: ModelCheck | None = None

    def table(self) -> str:
        head = "task                                      calls trials  default ms   best ms"
        rows = [head + "  GFLOP/s  re-timed ms (kept)"]
        for t in self.tasks:
            d = f"{t.default_ms:10.3f}" if t.default_ms else "         -"
            b = f"{t.best_ms:9.3f}" if t.best_ms else "        -"
            g = f"{t.flops / t.best_ms / 1e6:8.1f}" if t.best_ms else "       -"
            v = f"{t.verified_ms:9.3f} ({t.verified})" if t.verified_ms else ""
            rows.append(f"{t.name[:40]:40s} {t.weight:6d} {t.trials:6d} {d} {b} {g}  {v}")
        if self.model_check is not None:
            rows.append(self.model_check.table())
        return "\n".join(rows)


def tune(
    model: Any,
    example_inputs: Any = None,
    target: Any = "x86",
    *,
    trials: int = 200,
    work_dir: str | os.PathLike = "tvm-sparse-tuning",
    rpc: str | None = None,
    key: str = "android",
    sparse: bool = True,
    tvm_kernels: bool = True,
    min_task_trials: int = 8,
    verify: int = 3,
    model_check: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> TuningResult:
    """Tune every kernel of ``model`` for ``target`` with about ``trials`` measurements in all.

    ``rpc="host:port"`` measures on the devices a TVM RPC tracker registers under ``key`` (e.g.
    the Android RPC app); ``tvm_kernels=False`` tunes only tvm-sparse's kernels. Running again
    with the same ``work_dir`` resumes: finished records are kept, their trials not repeated.
    ``verify``: re-time each task's best ``verify`` records and its default in 5 interleaved
    rounds and keep the lowest median (0: trust MetaSchedule's one measurement per candidate).
    ``model_check``: then compare the tuned kernels with their defaults inside the model and keep
    the faster per kernel (``model_check.py``; over RPC: the faster of the whole builds).
    Raises ``InputError`` naming the argument when ``trials`` or ``min_task_trials`` is not a
    positive int, ``verify`` not an int >= 0, or ``work_dir`` cannot be a writable directory.
    """
    trials = check_int("trials", trials)
    min_task_trials = check_int("min_task_trials", min_task_trials)
    verify = check_int("verify", verify, minimum=0)
    work_dir = check_work_dir(work_dir)
    t0 = time.perf_counter()
    tgt = resolve_target(target)
    prepared, _records, inputs = prepare(model, example_inputs, tgt, sparse)
    mod = lower(prepared, tgt)
    extracted = tuning_tasks(mod, tgt, tvm_kernels)
    tracker = (*split_addr(rpc), key) if rpc is not None else None
    if rpc is not None:
        connect(tracker=rpc, key=key)  # fail fast, naming the device
    database = open_database(work_dir)
    verified = open_verified(work_dir) if verify > 0 else None
    cores = num_cores(tgt)
    builder = make_builder(tgt, max_workers=cores)
    runner = make_runner(real_arguments(mod), tracker)
    cost_model = ms.cost_model.XGBModel(
        extractor=KnobFeatures(), adaptive_training=False, num_tuning_cores=cores
    )
    result = TuningResult(work_dir=work_dir)
    contexts = []
    for i, task in enumerate(extracted):
        task_mod = task.dispatched[0]
        ctx = ms.TuneContext(
            mod=task_mod,
            target=tgt,
            space_generator=space_for(_main(task_mod), tgt),
            search_strategy=strategy_for(_main(task_mod)),
            task_name=task.task_name,
            num_threads=cores,
            rand_state=seed + i,
        )
        contexts.append(ctx)
        info = TaskResult(
            task.task_name, int(task.weight), tunable_block(_main(task_mod)) is not None,
            flops=estimate_flops(task_mod),
        )  # fmt: skip
        info.trials = trials_done(database, task_mod)
        result.tasks.append(info)

    bar = Progress(
        result, trials, enabled=progress, curve_path=os.path.join(work_dir, "curve.jsonl")
    )
    defaults = [_default_trace(ctx) if info.template else None
                for ctx, info in zip(contexts, result.tasks, strict=True)]  # fmt: skip
    for ctx, info, default in zip(contexts, result.tasks, defaults, strict=True):
        if default is not None:
            info.default_ms = _measure_default(ctx, default, builder, runner, database, info, bar)
    budgets = _budgets(result.tasks, trials, min_task_trials)
    for i, (ctx, info, budget) in enumerate(zip(contexts, result.tasks, budgets, strict=True)):
        remaining = budget - info.trials
        bar.start_task(i, budget)
        if remaining > 0:
            ms.tune.tune_tasks(
                tasks=[ctx],
                task_weights=[1.0],
                work_dir=work_dir,
                max_trials_global=remaining,
                num_trials_per_iter=min(16, remaining),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=[
                    ms.measure_callback.AddToDatabase(),
                    ms.measure_callback.RemoveBuildArtifact(),
                    ms.measure_callback.UpdateCostModel(),
                    bar.callback(),
                ],
                task_scheduler="round-robin",
            )
        bar.check_device(tracker)
        info.trials = trials_done(database, ctx.mod)
        info.best_ms = _best_ms(database, ctx.mod)
        if verified is not None and info.trials > 1:
            kept = verify_task(ctx, database, verified, builder, runner, top_k=verify,
                               default=defaults[i])  # fmt: skip
            if kept is not None:
                info.verified_ms, is_default = kept
                info.verified = "default" if is_default else "tuned"
                bar.note(
                    f"task {i + 1}/{len(result.tasks)} {info.name[:36]}: best {verify} + "
                    f"default re-timed: {info.verified} kept, {info.verified_ms:.3f} ms"
                )
            bar.check_device(tracker)
    if model_check and any(t.trials for t in result.tasks):
        bar.note("checking the tuned kernels inside the model")
        # The session ends with the block: the device goes back to the tracker.
        with connect(tracker=rpc, key=key) if rpc is not None else nullcontext() as remote:
            check = check_model(prepared, tgt, random_inputs(inputs, seed), work_dir,
                                remote=remote, note=bar.note)  # fmt: skip
        store_check(work_dir, prepared, tgt, check)
        result.model_check = check
        bar.note(check.table())
    result.seconds = time.perf_counter() - t0
    bar.finish()
    return result


def tuning_tasks(mod: tvm.IRModule, tgt: tvm.target.Target, tvm_kernels: bool = True) -> list:
    """MetaSchedule's tasks of a lowered module that ``tune`` searches: tvm-sparse's
    templates (FLOPs annotated: ``annotate_flops``), and TVM's own kernels unless
    ``tvm_kernels`` is False; never a final hand kernel (``_scheduled``), nor a kernel whose
    FLOPs MetaSchedule cannot estimate (warned: ``UntunableKernelWarning``)."""
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(annotate_flops(mod), tgt)
        if not _scheduled(_main(t.dispatched[0]))
        and (tvm_kernels or tunable_block(_main(t.dispatched[0])) is not None)
    ]
    return [t for t in tasks if _analysable(t)]


def _analysable(task) -> bool:
    """Whether MetaSchedule's task scheduler can estimate the task's FLOPs (else it stops the
    whole run); warns when not."""
    try:
        estimate_flops(task.dispatched[0])
    except RuntimeError as err:  # tvm.error.InternalError: no rule for a node
        reason = last_line(err)
        warnings.warn(
            f"{task.task_name}: left out of tuning (built at its default schedule): "
            f"MetaSchedule cannot estimate its FLOPs ({reason})",
            UntunableKernelWarning,
            stacklevel=3,
        )
        return False
    return True


def _main(mod: tvm.IRModule):
    return next(iter(mod.functions.values()))


def _scheduled(func) -> bool:
    """A final hand kernel (``tirx.is_scheduled``, TVM's mark, as MetaSchedule's own task
    conversion skips): nothing to search, and its vector body would stop MetaSchedule's FLOP
    estimator (no rule for broadcasts and shuffles)."""
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False))


def _budgets(tasks: list[TaskResult], trials: int, floor: int) -> list[int]:
    """Split ``trials`` by each task's share of the default time (templates: measured; TVM
    kernels: unknown, so they get the floor)."""
    shares = [t.weight * (t.default_ms or 0.0) for t in tasks]
    fixed = sum(floor for t in tasks if not t.default_ms)
    left = max(0, trials - fixed)
    total = sum(shares) or 1.0
    return [
        max(floor, math.ceil(left * s / total)) if t.default_ms else floor
        for t, s in zip(tasks, shares, strict=True)
    ]


def _best_ms(database: ms.database.Database, mod: tvm.IRModule) -> float | None:
    if not database.has_workload(mod):
        return None
    top = database.get_top_k(database.commit_workload(mod), 1)
    return mean_ms(top[0].run_secs) if top else None


def _default_trace(ctx: ms.TuneContext) -> s_tir.Trace:
    """The trace of a template's default point (every knob at candidate 0: the hand schedule)."""
    trace = ctx.generate_design_space()[0].trace
    for inst in list(trace.decisions):
        if inst.kind.name == "SampleCategorical":
            trace = trace.with_decision(inst, 0, remove_postproc=True)
    sch = s_tir.Schedule(ctx.mod)
    trace.apply_to_schedule(sch, remove_postproc=True)
    return sch.trace


def _measure_default(ctx, default, builder, runner, database, info, bar) -> float | None:
    """Measure the template's default point (the hand schedule) once, as a record: tuning
    then starts from it and can only equal or beat it."""
    sch = s_tir.Schedule(ctx.mod)
    default.apply_to_schedule(sch, remove_postproc=True)
    workload = database.commit_workload(ctx.mod)
    for rec in database.get_all_tuning_records():
        if rec.workload.same_as(workload) and str(rec.trace) == str(default):
            return mean_ms(rec.run_secs)
    args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, ctx.target)])
    if built.error_msg:
        bar.note(f"{info.name}: default failed to build: {built.error_msg.splitlines()[-1]}")
        return None
    (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
    res = future.result()
    if res.error_msg:
        bar.note(f"{info.name}: default failed to run: {res.error_msg.splitlines()[-1]}")
        return None
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, res.run_secs, ctx.target, args)
    )
    info.trials += 1
    return mean_ms(res.run_secs)
