"""Side-by-side latency measurement: interleaved repeats, medians, useful GFLOP/s, machine facts.

Used by ``tvm-sparse demo`` and the scripts in ``benchmarks/``. Runners are measured in rounds
(each round calls every runner once, in a rotating order) so that drift in machine load hits all
of them alike; between calls we pause briefly so one runtime's spinning worker threads do not
steal cores from the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

SETTLE_SECONDS = 0.005


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

        info["tvm"] = tvm.__version__
        info["llvm_cpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
    except ImportError:
        pass
    for mod in ("torch", "onnxruntime"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def time_interleaved(
    runners: dict[str, Callable[[], Any]], rounds: int = 15, warmup: int = 2, inner: int = 1
) -> dict[str, float]:
    """Median milliseconds per call of each runner, measured in interleaved rounds."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        rotated = names[r % len(names) :] + names[: r % len(names)]
        for name in rotated:
            time.sleep(SETTLE_SECONDS)
            t0 = time.perf_counter()
            for _ in range(inner):
                runners[name]()
            samples[name].append((time.perf_counter() - t0) / inner * 1e3)
    return {n: statistics.median(s) for n, s in samples.items()}


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
    torch.onnx.export(model, tensors, buf, dynamo=False, opset_version=17)
    return buf.getvalue()


def ort_runner(onnx_model: bytes | str, inputs: tuple, threads: int) -> Callable[[], Any]:
    """An ONNX Runtime session (all graph optimizations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
