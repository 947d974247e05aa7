"""Tuning progress: one line per measured batch (task, trials, best so far), a JSONL curve of
every measurement, and the detection of a dead remote device."""

from __future__ import annotations

import json
import sys
import time

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from tvm_sparse.rpc import RPCError

# Runner errors that mean the device (not the candidate) failed.
DEVICE_ERRORS = (
    "RPCSessionTimeoutError",
    "Connection refused",
    "connect",
    "tracker",
    "RPCError",
    "Timeout",
)


def mean_ms(run_secs) -> float:
    """Milliseconds from a MetaSchedule result's ``run_secs`` (the mean of its repeats)."""
    secs = [float(s) for s in run_secs]
    return 1e3 * sum(secs) / len(secs)


class Progress:
    """Progress of a ``tune`` run (``result``: the TuningResult being filled)."""

    def __init__(self, result, trials: int, enabled: bool, curve_path: str) -> None:
        self.result, self.trials, self.enabled = result, trials, enabled
        self.curve_path = curve_path
        self.t0 = time.perf_counter()
        self.task = 0
        self.budget = 0
        self.measured = 0
        self.best: dict[int, float] = {}
        self.device_errors: list[str] = []
        self.consecutive_failures = 0

    def note(self, msg: str) -> None:
        if self.enabled:
            print(f"[tvm-sparse tune] {msg}", file=sys.stderr, flush=True)

    def start_task(self, index: int, budget: int) -> None:
        self.task, self.budget = index, budget
        info = self.result.tasks[index]
        if info.default_ms is not None:
            self.best[index] = min(self.best.get(index, info.default_ms), info.default_ms)
        if info.trials >= budget:
            self.note(f"task {index + 1}/{len(self.result.tasks)} {info.name}: "
                      f"{info.trials}/{budget} trials already in the records, skipped")  # fmt: skip

    def record(self, latencies_ms: list[float | None], errors: list[str]) -> None:
        info = self.result.tasks[self.task]
        with open(self.curve_path, "a", encoding="utf-8") as f:
            for ms_ in latencies_ms:
                self.measured += 1
                info.trials += 1
                if ms_ is not None:
                    self.best[self.task] = min(self.best.get(self.task, ms_), ms_)
                event = {
                    "task": info.name,
                    "trial": info.trials,
                    "ms": ms_,
                    "best_ms": self.best.get(self.task),
                    "t": time.perf_counter() - self.t0,
                }
                f.write(json.dumps(event) + "\n")  # fmt: skip
        for err in errors:
            if any(marker in err for marker in DEVICE_ERRORS):
                self.device_errors.append(err.strip().splitlines()[-1] if err.strip() else err)
        self.consecutive_failures = (
            self.consecutive_failures + len(errors) if len(errors) == len(latencies_ms) else 0
        )
        best = self.best.get(self.task)
        default = info.default_ms
        self.note(
            f"task {self.task + 1}/{len(self.result.tasks)} {info.name[:36]}: "
            f"{info.trials}/{self.budget} trials, best "
            + (f"{best:.3f} ms" if best is not None else "-")
            + (f" (default {default:.3f} ms)" if default else "")
            + f" | {self.measured} measured in {time.perf_counter() - self.t0:.0f}s"
        )

    def check_device(self, tracker) -> None:
        """Raise RPCError when the remote device died: records so far are kept."""
        if tracker is None or not self.device_errors or self.consecutive_failures == 0:
            return
        host, port, key = tracker
        raise RPCError(
            f"device {key!r} at tracker {host}:{port} stopped answering during tuning "
            f"({self.device_errors[-1]}); finished records are kept in {self.result.work_dir}: "
            "run tune() again to resume"
        )

    def finish(self) -> None:
        self.note(f"done: {self.measured} measured in {time.perf_counter() - self.t0:.0f}s")

    def callback(self) -> ms.measure_callback.MeasureCallback:
        return _ProgressCallback(self)


@derived_object
class _ProgressCallback(ms.measure_callback.PyMeasureCallback):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        latencies, errors = [], []
        for built, ran in zip(builder_results, runner_results, strict=True):
            err = built.error_msg or ran.error_msg
            if err or not ran.run_secs:
                latencies.append(None)
                errors.append(str(err or "no result"))
            else:
                latencies.append(mean_ms(ran.run_secs))
        self.progress.record(latencies, errors)
