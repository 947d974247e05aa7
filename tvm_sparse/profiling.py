"""Per-kernel time of a compiled model: where a forward pass spends its time.

The Relax VM calls an instrument before and after every call it makes (``set_instrument``); the
wall time between the two is the kernel's. Each kernel is reported once per name with its calls
per run, mean milliseconds per run and share of the instrumented run. The timing is host-side
(``perf_counter``) and includes the instrument's own time: a Python callback before and after
every call, its arguments converted (~0.5-1.5 us a call on AMD Zen 5). The ``vm.builtin.*`` rows
(a tensor view into the planned storage per kernel output, the storage blocks, shape checks)
are mostly that: ``benchmarks/bench_vm_overhead.py`` measures what the views cost uninstrumented
(~0.2 us each there).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.runtime.vm import VMInstrumentReturnKind


@dataclass(frozen=True)
class KernelTime:
    name: str
    calls: int  # per run
    ms: float  # per run, all calls


@dataclass(frozen=True)
class Profile:
    kernels: list[KernelTime]  # slowest first
    run_ms: float  # one uninstrumented run (median)
    runs: int

    def table(self, top: int = 0) -> str:
        total = sum(k.ms for k in self.kernels) or 1.0
        rows = self.kernels[:top] if top else self.kernels
        lines = [f"{'kernel':44s} {'calls':>5s} {'ms/run':>8s} {'share':>6s}"]
        lines += [f"{k.name[:44]:44s} {k.calls:5d} {k.ms:8.3f} {k.ms / total:6.1%}" for k in rows]
        lines.append(
            f"{'sum of kernels':44s} {'':5s} {total:8.3f}   (uninstrumented run {self.run_ms:.3f}"
            f" ms, {self.runs} runs)"
        )
        return "\n".join(lines)


def profile_vm(executable, tensors: list, runs: int = 10, warm: int = 3) -> Profile:
    """Time every call of ``main`` on this host's CPU (``tensors``: the inputs)."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    for _ in range(warm):
        vm["main"](*tensors)
    plain = []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm["main"](*tensors)
        plain.append(time.perf_counter() - t0)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    started = [0.0]

    def instrument(_func, symbol, before_run, _ret, *_args) -> int:
        if before_run:
            started[0] = time.perf_counter()
        else:
            seconds[symbol] += time.perf_counter() - started[0]
            calls[symbol] += 1
        return int(VMInstrumentReturnKind.NO_OP)

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*tensors)
    kernels = [KernelTime(name, calls[name] // runs, s / runs * 1e3) for name, s in seconds.items()]
    kernels.sort(key=lambda k: -k.ms)
    plain.sort()
    return Profile(kernels=kernels, run_ms=plain[len(plain) // 2] * 1e3, runs=runs)
