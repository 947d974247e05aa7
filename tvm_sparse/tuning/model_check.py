"""The in-model check of a tuning run: which tuned kernels are faster in the model, not alone.

Tasks are tuned and verified with each kernel timed alone, its input and weights hot in cache.
In a model the previous layer's output is in cache instead, and big maps and weights stream from
memory: tuned VGG-16 read 0.95-0.98x of the default in three runs although every task's winner
had beaten the default alone. So after tuning, the model is built twice (every kernel at its
default, every kernel with its records), both outputs are compared (a tuned kernel computing
something else is never kept), and both builds are profiled per kernel in interleaved rounds.
Each tuned workload slower in the model than its default goes back to the default; the build
made from those choices is timed against the two others, whole, and the fastest kept. On a
device over RPC (no per-kernel instrument there) the default and tuned builds are timed whole.

The decision is stored per model in ``work_dir/model_check.json`` (``model_check_store.py``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import tvm
from tvm import tirx
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from tvm_sparse.pipeline import build_executable
from tvm_sparse.profiling import profile_vm
from tvm_sparse.rpc import load_vm, to_numpy

from .apply import lowered_with_records, revert_to_default
from .model_check_store import KernelChoice, ModelCheck, workload_key


class _Device:
    """Where the builds run: this host, or a device over RPC (``tvm_sparse.rpc``)."""

    def __init__(self, target: tvm.target.Target, remote=None) -> None:
        self.target, self.remote = target, remote
        self.dev = remote.cpu() if remote is not None else tvm.cpu()

    def load(self, executable) -> tvm.relax.VirtualMachine:
        if self.remote is None:
            return tvm.relax.VirtualMachine(executable, self.dev)
        return load_vm(executable, self.remote, self.target)

    def tensors(self, arrays: list[np.ndarray]) -> list:
        return [tvm.runtime.tensor(a, self.dev) for a in arrays]

    def call(self, what: str, fn: Callable):
        return fn() if self.remote is None else self.remote._call(what, fn)


def check_model(
    prepared: tvm.IRModule,
    target: tvm.target.Target,
    inputs: list[np.ndarray],
    work_dir: str,
    *,
    remote=None,
    rounds: int = 5,
    note: Callable[[str], None] = lambda _msg: None,
) -> ModelCheck:
    """Build ``prepared`` at the default schedules and with the records of ``work_dir``; keep
    per workload what is faster in the model, then the fastest whole build (see the module doc).
    ``inputs``: arrays for the model's inputs. On a ``remote`` device (``tvm_sparse.rpc``) the
    VM's per-kernel instrument is not available: the default and tuned builds are timed whole
    and the faster kept."""
    device = _Device(target, remote)
    lowered, applied, database = lowered_with_records(prepared, target, work_dir)
    workloads: dict[str, list[str]] = defaultdict(list)
    for gv, func in lowered.functions.items():
        if isinstance(func, tirx.PrimFunc) and database.has_workload(_normalize_mod(func)):
            workloads[workload_key(func)].append(gv.name_hint)
    first_names = {key: names[0] for key, names in workloads.items()}
    builds = {
        "default": revert_to_default(lowered, applied, set(workloads)),
        "tuned": revert_to_default(lowered, applied, set()),
    }
    executables = {name: build_executable(mod, target) for name, mod in builds.items()}
    vms = {name: device.load(exe) for name, exe in executables.items()}
    args = device.tensors(inputs)
    outputs = {name: _run(vm, args, device) for name, vm in vms.items()}
    if not _same(outputs["default"], outputs["tuned"]):
        return _differs("tuned", first_names)
    check = ModelCheck("tuned", workloads=first_names)
    if remote is None:
        note(f"profiling the default and tuned builds in the model ({rounds} rounds)")
        per_run = _profile_interleaved(executables, args, rounds)
        for names in workloads.values():
            default = sum(per_run["default"].get(n, 0.0) for n in names)
            tuned = sum(per_run["tuned"].get(n, 0.0) for n in names)
            check.kernels.append(KernelChoice(names[0], len(names), default, tuned))
        check.kernels.sort(key=lambda k: -k.default_ms)
        check.kept = "mixed"
        mixed = revert_to_default(lowered, applied, set(check.reverted()))
        vms["mixed"] = device.load(build_executable(mixed, target))
        if not _same(outputs["default"], _run(vms["mixed"], args, device)):
            return _differs("per-kernel", first_names)
    note(f"timing the {', '.join(vms)} builds whole, interleaved")
    check.ms = _time_interleaved(vms, args, device, 2 * rounds + 1)
    check.kept = min(check.ms, key=check.ms.__getitem__)
    return check


def _differs(build: str, workloads: dict[str, str]) -> ModelCheck:
    note = f"the {build} build's output differs from the default build's: default kept"
    return ModelCheck("default", workloads=workloads, note=note)


def _run(vm: tvm.relax.VirtualMachine, args: list, device: _Device) -> list[np.ndarray]:
    return device.call("running a build of the model", lambda: to_numpy(vm["main"](*args)))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Equal up to float32 summation order (relative to each output's largest value)."""
    return len(a) == len(b) and all(
        x.shape == y.shape
        and np.allclose(x, y, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(x).max(initial=0))))
        for x, y in zip(a, b, strict=True)
    )


def _profile_interleaved(executables: dict, args: list, rounds: int) -> dict[str, dict]:
    """Per build: kernel name -> median ms per run over ``rounds`` alternating profiles."""
    samples: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in executables}
    for r in range(rounds):
        order = list(executables) if r % 2 == 0 else list(reversed(executables))
        for name in order:
            for k in profile_vm(executables[name], args, runs=3, warm=1).kernels:
                samples[name][k.name].append(k.ms)
    return {
        name: {kernel: statistics.median(v) for kernel, v in per.items()}
        for name, per in samples.items()
    }


def _time_interleaved(vms: dict, args: list, device: _Device, rounds: int) -> dict[str, float]:
    """Median ms per run of each build over ``rounds`` rounds, builds in a rotating order
    (the VM's time evaluator: at least 50 ms of runs per sample, after one warm-up run)."""
    timers = {
        name: vm.time_evaluator("main", device.dev, number=1, repeat=1, min_repeat_ms=50)
        for name, vm in vms.items()
    }
    names = list(timers)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            result = device.call(f"timing the {name} build", lambda n=name: timers[n](*args))
            samples[name].append(result.mean * 1e3)
    return {n: statistics.median(v) for n, v in samples.items()}
