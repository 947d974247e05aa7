"""Re-measure a task's best candidates before trusting them.

MetaSchedule measures each candidate once (one ~50 ms sample). On a noisy machine (a shared VM,
a phone heating up) the fastest record of a task is then partly luck: tuned layers here read
0.5-1.4x of their default in later interleaved timings. After a task is tuned, its few best
records and the hand default are rebuilt and timed again in interleaved rounds; the one with
the lowest median goes to a second MetaSchedule database, ``work_dir/verified``, which
``apply_records`` consults first (``OrderedUnionDatabase``: verified, then all records).
"""

from __future__ import annotations

import os
import statistics

import tvm
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.utils import remove_build_dir

from .records import RECORDS, open_database

VERIFIED = "verified"


def open_verified(work_dir: str) -> ms.database.JSONDatabase:
    """The database of verified winners in ``work_dir`` (created when missing)."""
    return open_database(os.path.join(work_dir, VERIFIED))


def has_verified(work_dir: str) -> bool:
    """Whether ``work_dir`` holds re-timed winners."""
    return os.path.exists(os.path.join(work_dir, VERIFIED, RECORDS))


def _distinct_best(
    database: ms.database.Database, mod: tvm.IRModule, count: int, default: s_tir.Trace | None
) -> list[ms.database.TuningRecord]:
    """The ``count`` fastest records of ``mod`` with distinct traces, plus the one whose trace
    is ``default`` (the hand schedule) when it is not among them."""
    workload = database.commit_workload(mod)
    seen: dict[str, ms.database.TuningRecord] = {}
    default_key = str(default) if default is not None else None
    default_rec = None
    for rec in database.get_top_k(workload, max(1, count) * 8):
        key = str(rec.trace)
        if key == default_key and default_rec is None:
            default_rec = rec
        if key not in seen and len(seen) < count:
            seen[key] = rec
    if default_rec is not None and default_key not in seen:
        seen[default_key] = default_rec
    return list(seen.values())


def _retime(ctx, records, builder, runner, rounds: int) -> list[list[float]]:
    """Each record's run times (seconds) over ``rounds`` interleaved rounds; [] when it failed to
    build or run."""
    samples: list[list[float]] = [[] for _ in records]
    mods = []
    for rec in records:
        sch = s_tir.Schedule(ctx.mod)
        rec.trace.apply_to_schedule(sch, remove_postproc=False)
        mods.append(sch.mod)
    results = builder.build([ms.builder.BuilderInput(mod, ctx.target) for mod in mods])
    ready = [i for i, res in enumerate(results) if not res.error_msg]
    try:
        inputs = [
            ms.runner.RunnerInput(results[i].artifact_path, "cpu", records[i].args_info)
            for i in ready
        ]
        # One batch, candidates in turn within each round: slow phases of the machine hit
        # every candidate alike.
        for j, future in enumerate(runner.run(inputs * rounds)):
            out = future.result()
            if not out.error_msg and out.run_secs:
                samples[ready[j % len(ready)]] += [float(s) for s in out.run_secs]
    finally:
        for i in ready:
            if results[i].artifact_path:
                remove_build_dir(results[i].artifact_path)
    return samples


def verify_task(
    ctx: ms.TuneContext,
    database: ms.database.Database,
    verified: ms.database.Database,
    builder: ms.builder.Builder,
    runner: ms.runner.Runner,
    *,
    top_k: int = 3,
    rounds: int = 5,
    default: s_tir.Trace | None = None,
) -> tuple[float, bool] | None:
    """Re-time the task's ``top_k`` best records (and ``default``) in ``rounds`` interleaved
    rounds; commit the lowest median to ``verified``. Returns (its median ms, whether it is the
    default), or None when there was nothing to compare or nothing ran."""
    records = _distinct_best(database, ctx.mod, top_k, default)
    if len(records) > 1:
        samples = _retime(ctx, records, builder, runner, rounds)
    else:  # one candidate (or none): nothing to decide, its record stands
        samples = [[float(s) for s in rec.run_secs] for rec in records]
    timed = [(statistics.median(s), i) for i, s in enumerate(samples) if s]
    if not timed:
        return None
    median, best = min(timed)
    rec = records[best]
    verified.commit_tuning_record(
        ms.database.TuningRecord(
            rec.trace,
            verified.commit_workload(ctx.mod),
            [median] * len(samples[best]),
            ctx.target,
            rec.args_info,
        )
    )
    is_default = default is not None and str(rec.trace) == str(default)
    return median * 1e3, is_default
