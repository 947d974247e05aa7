"""The README's main job: a pattern-pruned ResNet-18, compiled dense and sparse, checked, timed."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .benchmarking import (
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_runner,
    quiet_third_party,
    time_interleaved,
    torch_runner,
    tvm_runner,
)
from .validation import check_int

TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}  # float32, different summation order over ~5k terms


def say(msg: str) -> None:
    """A progress line on stderr (stdout carries the result)."""
    print(msg, file=sys.stderr, flush=True)


def round_progress(rounds: int) -> Any:
    """``time_interleaved``'s progress callback: each round's running medians, via ``say``."""

    def report(done: int, medians: dict[str, float]) -> None:
        so_far = ", ".join(f"{name.split(' (')[0]} {ms:.2f}" for name, ms in medians.items())
        say(f"  round {done}/{rounds}: median ms so far: {so_far}")

    return report


def build_demo_model(
    width: int = 64, num_classes: int = 1000, seed: int = 0, filter_group: int = 1
) -> Any:
    """ResNet-18 with every 3x3 conv pattern-pruned (8 patterns x 4 taps, 28% of kernels;
    ``filter_group``: chosen per group of that many filters, which the kernel computes together)."""
    import torch

    from .models import resnet18
    from .testing import pattern_prune_model_, randomize_batchnorm_

    torch.manual_seed(seed)
    model = resnet18(num_classes=num_classes, width=width)
    pruned = pattern_prune_model_(model, seed=seed, filter_group=filter_group)
    return randomize_batchnorm_(pruned, seed=seed).eval()


def run_demo(
    image: int = 224,
    width: int = 64,
    rounds: int = 15,
    threads: int | None = None,
    filter_group: int = 1,
) -> dict:
    """Compile, check numerics against PyTorch, and print the latency table. Returns the numbers."""
    for name, value in (("image", image), ("width", width), ("rounds", rounds),
                        ("filter_group", filter_group), ("threads", threads)):  # fmt: skip
        if value is not None:
            check_int(name, value)
    with quiet_third_party():
        return _run_demo(image, width, rounds, threads or os.cpu_count() or 1, filter_group)


def _run_demo(image: int, width: int, rounds: int, threads: int, filter_group: int) -> dict:
    import torch

    import tvm_sparse

    model = build_demo_model(width, filter_group=filter_group)
    x = np.random.default_rng(0).standard_normal((1, 3, image, image)).astype("float32")
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()

    grouped = f", choices per group of {filter_group} filters" if filter_group > 1 else ""
    say(f"compiling pattern-pruned ResNet-18 ({image}x{image}{grouped}) sparse ...")
    sparse = tvm_sparse.compile(model, (x,), verbose=True)
    say("compiling the same weights dense ...")
    dense = tvm_sparse.compile(model, (x,), sparse=False, verbose=True)
    print(sparse.report())

    runners = {
        "tvm-sparse": tvm_runner(sparse, (x,)),
        "TVM dense (tvm-sparse, sparse=False)": tvm_runner(dense, (x,)),
        "PyTorch dense": torch_runner(model, (x,), threads),
    }
    outputs = {"tvm-sparse": sparse(x), "TVM dense (tvm-sparse, sparse=False)": dense(x)}
    try:
        runners["ONNX Runtime dense"] = ort_runner(onnx_bytes(model, (x,)), (x,), threads)
        outputs["ONNX Runtime dense"] = runners["ONNX Runtime dense"]()[0]
    except ImportError as err:
        say(f"ONNX Runtime not measured: {err}")
    errors = {}
    for name, out in outputs.items():
        errors[name] = float(np.max(np.abs(out - reference)))
        np.testing.assert_allclose(out, reference, **TOLERANCE, err_msg=f"{name} vs PyTorch")
    say(f"timing {len(runners)} runtimes, {rounds} interleaved rounds, {threads} threads ...")
    ms = time_interleaved(runners, rounds=rounds, progress=round_progress(rounds))
    kept = sum(r.flops_kept for r in sparse.layers)
    dense_flops = sum(r.flops_dense for r in sparse.layers)
    best_dense = min(v for k, v in ms.items() if k != "tvm-sparse")
    rows = [
        [
            name,
            f"{t:.2f}",
            f"{best_dense / t:.2f}x",
            f"{kept / t / 1e6:.1f}",
            f"{errors.get(name, 0.0):.1e}",
        ]
        for name, t in sorted(ms.items(), key=lambda kv: kv[1])
    ]
    table = markdown_table(
        ["runtime", "median ms", "speed-up vs best dense", "useful GFLOP/s", "max |err|"], rows
    )
    print()
    print(
        f"ResNet-18, 1x3x{image}x{image}, FLOPs kept (conv + FC) {kept / 1e9:.2f} of "
        f"{dense_flops / 1e9:.2f} G ({dense_flops / kept:.1f}x fewer); {threads} threads"
    )
    machine = machine_description()
    print(f"machine: {machine['cpu']} ({machine.get('llvm_cpu')}, {machine.get('isa')}), "
          f"{threads} threads")  # fmt: skip
    print(table)
    print(
        f"numerics: every runtime matches PyTorch within rtol={TOLERANCE['rtol']}, "
        f"atol={TOLERANCE['atol']}; compile {sparse.compile_seconds:.1f}s (sparse), "
        f"{dense.compile_seconds:.1f}s (dense)"
    )
    return {"ms": ms, "errors": errors, "flops_kept": kept, "flops_dense": dense_flops}
