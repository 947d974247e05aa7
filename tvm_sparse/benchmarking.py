"""Side-by-side latency measurement: interleaved repeats, medians, useful GFLOP/s, machine facts.

Used by ``tvm-sparse demo`` and the scripts in ``benchmarks/``. Runners are measured in rounds
(each round calls every runner a few times, in a rotating order) so that drift in machine load
hits all of them alike; see ``time_interleaved`` for how one runtime's leftovers are kept out of
the next one's numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import hide_avx512
from .errors import TvmSparseError
from .frontend import quiet_third_party


def machine_description() -> dict[str, Any]:
    """CPU model, core count, memory and library versions, for result files."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    try:
        import tvm

        from .targets import isa_name, resolve_target

        info["tvm"] = tvm.__version__
        info["llvm_cpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
        info["isa"] = isa_name(resolve_target("x86"))
    except ImportError:
        pass
    if hide_avx512.answered():
        info["cpuid"] = "AVX-512 and AVX-VNNI hidden (tvm_sparse.hide_avx512)"
    for mod in ("torch", "onnxruntime"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


PINNED_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
_HIDING = "TVM_SPARSE_HIDE_AVX512"  # set by isa_target's re-execution: "1", or why not


def isa_target(isa: str) -> str:
    """The tvm-sparse target of a benchmark's ``--isa``: ``native`` -> ``x86`` (the host's
    best ISA), ``avx2`` -> ``x86-avx2``. For ``avx2`` the process first re-executes itself once
    with PyTorch pinned to AVX2 (oneDNN and ATen read ``PINNED_AVX2`` at start-up) and, on an
    AVX-512 host, AVX-512 hidden from CPUID (`hide_avx512`), which is the only way to put
    ONNX Runtime on its AVX2 kernels. Where it cannot be hidden, ONNX Runtime runs the host's
    best ISA; `ort_isa` says which."""
    if isa != "avx2":
        return "x86"
    if _HIDING not in os.environ:
        env = {**os.environ, **PINNED_AVX2, _HIDING: "1"}
        if hide_avx512.host_has_avx512():
            try:
                env = hide_avx512.environment(env)
            except (RuntimeError, TvmSparseError) as err:
                env[_HIDING] = str(err)
                print(f"ONNX Runtime stays on the host's ISA: {err}", file=sys.stderr)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return "x86-avx2"


def ort_isa() -> str:
    """The ISA ONNX Runtime picks its kernels for in this process, for result tables."""
    count = hide_avx512.answered()
    if count:
        return f"AVX2 (AVX-512 hidden from CPUID; {count} CPUID answered)"
    if not hide_avx512.host_has_avx512():
        return "the host's best ISA (no AVX-512 here)"
    return "the host's best ISA (AVX-512)"


def isa_summary(target: str) -> str:
    """Which ISA each runtime ran, for result tables: tvm-sparse's target (and its ``mcpu``),
    PyTorch (pinned to AVX2 by `isa_target`, else the host's) and ONNX Runtime (`ort_isa`)."""
    from .targets import resolve_target

    mcpu = resolve_target(target).attrs.get("mcpu", "")
    pinned = all(os.environ.get(k) == v for k, v in PINNED_AVX2.items())
    torch_isa = "pinned to AVX2" if pinned else "on the host ISA"
    return (
        f"tvm-sparse compiled for `{target}` ({mcpu}); PyTorch {torch_isa}; "
        f"ONNX Runtime on {ort_isa()}"
    )


def time_interleaved(
    runners: dict[str, Callable[[], Any]],
    rounds: int = 15,
    warm: int = 5,
    inner: int = 10,
    settle_s: float | None = None,
    window_s: float = 0.03,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Median over interleaved rounds of each runner's mean milliseconds per call.

    In every round each runner (in a rotating order) waits ``settle_s``, makes untimed calls
    (at least ``warm``, for at least ``window_s``), then timed calls (at least ``inner``, for
    at least ``window_s``): every runtime is timed over a similar stretch of wall time, not a
    similar number of calls (10 calls of a 0.15 ms kernel right after the wait read 1.2-1.4x
    slower and twice as noisy as a 30 ms window here; ONNX Runtime's 0.8 ms calls ~1.1x).
    The wait lets the previous runtime's idle workers stop spinning: TVM's pool yields 300k
    times after a run (``TVM_THREAD_POOL_SPIN_COUNT``), ONNX Runtime's and PyTorch's workers
    spin too, and a runtime timed inside that window shares the cores with them (ONNX Runtime
    read 2x slower on a 0.6 ms layer here, TVM 1.7x, PyTorch up to 5x). The untimed calls
    then wake the cores and the runtime's own pool. Default wait: 1 s
    (``TVM_SPARSE_BENCH_SETTLE_S``); with it each runtime read as it does when run alone.
    ``progress(rounds_done, medians_so_far)`` is called after every round.
    """
    if settle_s is None:
        settle_s = float(os.environ.get("TVM_SPARSE_BENCH_SETTLE_S", "1.0"))
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        rotated = names[r % len(names) :] + names[: r % len(names)]
        for name in rotated:
            time.sleep(settle_s)
            _call_for(runners[name], warm, window_s)
            samples[name].append(_call_for(runners[name], inner, window_s))
        if progress is not None:
            progress(r + 1, {n: statistics.median(s) for n, s in samples.items()})
    return {n: statistics.median(s) for n, s in samples.items()}


def _call_for(run: Callable[[], Any], min_calls: int, min_s: float) -> float:
    """Call ``run`` at least ``min_calls`` times and for at least ``min_s``; mean ms per call."""
    t0 = time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - t0 < min_s:
        run()
        calls += 1
    return (time.perf_counter() - t0) / max(calls, 1) * 1e3


def torch_runner(model: Any, inputs: tuple, threads: int) -> Callable[[], Any]:
    """Call a torch model under ``no_grad`` with ``threads`` intra-op threads."""
    import torch

    torch.set_num_threads(threads)
    tensors = tuple(torch.as_tensor(np.asarray(x)) for x in inputs)

    def run() -> Any:
        with torch.no_grad():
            return model(*tensors)

    return run


def onnx_bytes(model: Any, inputs: tuple) -> bytes:
    """Export a torch model to ONNX (in memory) for ONNX Runtime."""
    import io

    import torch

    buf = io.BytesIO()
    tensors = tuple(torch.as_tensor(np.asarray(x)) for x in inputs)
    with quiet_third_party():
        torch.onnx.export(model, tensors, buf, dynamo=False, opset_version=17)
    return buf.getvalue()


def ort_runner(onnx_model: bytes | str, inputs: tuple, threads: int) -> Callable[[], Any]:
    """An ONNX Runtime session (all graph optimizations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning stays on (ORT's default): without it a 0.6 ms conv read 1.2 ms here whenever
    # another runtime's thread pool lived in the process. ``time_interleaved`` waits out the spin.
    sess = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
    feed = {
        i.name: np.asarray(x, dtype=np.float32)
        for i, x in zip(sess.get_inputs(), inputs, strict=True)
    }
    return lambda: sess.run(None, feed)


def tvm_runner(compiled: Any, inputs: tuple) -> Callable[[], Any]:
    """Call a ``CompiledModel``'s VM with inputs converted once."""
    import tvm

    tensors = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
    fn = compiled.vm["main"]
    return lambda: fn(*tensors)


def write_results(stem: str, payload: dict[str, Any], markdown: str) -> tuple[str, str]:
    """Write ``stem.json`` and ``stem.md`` (the Markdown gets the machine description on top)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    machine = payload.setdefault("machine", machine_description())
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    header = ", ".join(f"{k}: {v}" for k, v in machine.items())
    with open(stem + ".md", "w") as f:
        f.write(f"Machine: {header}\n\n{markdown}\n")
    return stem + ".json", stem + ".md"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
