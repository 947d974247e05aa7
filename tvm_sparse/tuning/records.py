"""Tuning records: MetaSchedule's own JSON database, repaired on open, counted per task.

A killed run can leave a half-written last line; a copied file can hold any garbage. Opening a
work directory drops lines that do not parse (with a warning naming the file and line) so the
records that did finish are kept and the database loads.
"""

from __future__ import annotations

import json
import os
import warnings

import tvm
from tvm.s_tir import meta_schedule as ms

from tvm_sparse.errors import InputError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


class CorruptRecordWarning(UserWarning):
    """A tuning record file held lines that could not be read; they were skipped."""


class UnmatchedRecordsWarning(UserWarning):
    """A model's tvm-sparse kernels have no record in the tuning work directory."""


def _valid_lines(path: str, check) -> tuple[list[str], list[int]]:
    kept, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                check(json.loads(line))
                kept.append(line.rstrip("\n"))
            except (ValueError, TypeError, IndexError, KeyError):
                bad.append(number)
    return kept, bad


def repair(work_dir: str) -> int:
    """Drop unreadable lines from the database files in ``work_dir``; return how many."""
    wl_path, rec_path = os.path.join(work_dir, WORKLOADS), os.path.join(work_dir, RECORDS)
    dropped = 0
    num_workloads = 0
    if os.path.exists(wl_path):

        def check_workload(entry) -> None:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ValueError

        kept, bad = _valid_lines(wl_path, check_workload)
        if bad:
            # Records refer to workloads by line index: keep only the prefix before the first
            # bad line (a torn write is the last line; nothing refers to it).
            first = bad[0]
            kept = kept[: first - 1]
            _rewrite(wl_path, kept, bad, "workload")
            dropped += len(bad)
        num_workloads = len(kept)
    if os.path.exists(rec_path):

        def check_record(entry) -> None:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError
            if not (isinstance(entry[0], int) and 0 <= entry[0] < num_workloads):
                raise IndexError
            if not isinstance(entry[1], list):
                raise ValueError

        kept, bad = _valid_lines(rec_path, check_record)
        if bad:
            _rewrite(rec_path, kept, bad, "tuning record")
            dropped += len(bad)
    return dropped


def _rewrite(path: str, kept: list[str], bad: list[int], what: str) -> None:
    shown = ", ".join(str(n) for n in bad[:5]) + (" ..." if len(bad) > 5 else "")
    warnings.warn(
        f"{path}: skipped {len(bad)} unreadable {what} line(s) (line {shown}); {len(kept)} kept",
        CorruptRecordWarning,
        stacklevel=3,
    )
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def open_database(work_dir: str, create: bool = True) -> ms.database.JSONDatabase:
    """The JSON database in ``work_dir`` (repaired first)."""
    if not create and not os.path.exists(os.path.join(work_dir, RECORDS)):
        raise InputError(f"{work_dir}: no tuning records ({RECORDS}) here; run tune() first")
    os.makedirs(work_dir, exist_ok=True)
    repair(work_dir)
    try:
        return ms.database.JSONDatabase(
            path_workload=os.path.join(work_dir, WORKLOADS),
            path_tuning_record=os.path.join(work_dir, RECORDS),
            allow_missing=True,
        )
    except Exception as err:  # TVM's parser error, re-raised with the file named
        raise InputError(f"{work_dir}: cannot read the tuning records: {err}") from err


def trials_done(database: ms.database.Database, mod: tvm.IRModule) -> int:
    """How many measured records (successful or not) the database holds for ``mod``."""
    if not database.has_workload(mod):
        return 0
    workload = database.commit_workload(mod)  # the existing entry
    return sum(1 for rec in database.get_all_tuning_records() if rec.workload.same_as(workload))
