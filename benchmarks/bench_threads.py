"""Throughput of one ``CompiledModel`` called from 1 vs 2 (or more) Python threads at once.

Each caller thread has its own Relax VM over the shared executable, and each VM's kernels run
on a TVM thread pool of its own (``TVM_NUM_THREADS`` workers, default: all cores): with 2
callers on 2 cores the pools share the cores. ``--tvm-threads 1`` gives every caller a
one-worker pool instead. The model: a pattern-pruned ResNet-18 (``--width`` channels in the
first stage, ``--size`` x ``--size`` input, batch 1). In every round each thread count (in a
rotating order) waits ``--settle`` seconds, then its callers (one warm-up call each) start
together and call for ``--seconds``; calls/s is all calls over the wall time. Medians over
``--rounds``; every caller's last output is checked against a sequential run.

    python benchmarks/bench_threads.py [--threads 1,2] [--rounds 5] [--seconds 2]

Writes benchmarks/results/threads.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="caller thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed calls per measurement")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before each")
    parser.add_argument("--tvm-threads", type=int, default=None, help="TVM_NUM_THREADS")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/threads")
    return parser.parse_args()


def build_model(width: int, size: int) -> tuple[Any, np.ndarray]:
    import torch

    import tvm_sparse
    from tvm_sparse.models import resnet18
    from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_

    torch.manual_seed(0)
    net = randomize_batchnorm_(pattern_prune_model_(resnet18(num_classes=10, width=width))).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype("float32")
    return tvm_sparse.compile(net, (x,)), x


def measure(cm: Any, inputs: list[np.ndarray], expected: list[np.ndarray], seconds: float) -> float:
    """Calls per second of ``len(inputs)`` threads calling for ``seconds`` (all start together
    after one untimed call each; the clock stops when the last one returns); checks each
    thread's last output."""
    n = len(inputs)
    start = threading.Barrier(n + 1)
    counts, last, errors = [0] * n, [None] * n, []
    stop = [float("inf")]

    def caller(i: int) -> None:
        try:
            cm(inputs[i])  # makes this thread's VM
            start.wait()
            while time.perf_counter() < stop[0]:
                last[i] = cm(inputs[i])
                counts[i] += 1
        except Exception as err:  # noqa: BLE001 (reported by the main thread)
            errors.append(err)
            start.abort()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    for i in range(n):
        np.testing.assert_array_equal(last[i], expected[i])
    return sum(counts) / elapsed


def run(args: argparse.Namespace) -> dict:
    counts = [int(c) for c in args.threads.split(",")]
    cm, x = build_model(args.width, args.size)
    rng = np.random.default_rng(1)
    inputs = [x + 0.1 * rng.standard_normal(x.shape).astype("float32") for _ in range(max(counts))]
    expected = [cm(a) for a in inputs]
    samples: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(args.rounds):
        for n in counts[r % len(counts) :] + counts[: r % len(counts)]:
            time.sleep(args.settle)
            samples[n].append(measure(cm, inputs[:n], expected[:n], args.seconds))
    return {"samples": samples, "layers": len(cm.layers)}


def report(args: argparse.Namespace, measured: dict) -> tuple[dict, str]:
    from tvm_sparse.benchmarking import machine_description, markdown_table

    rate = {n: statistics.median(s) for n, s in measured["samples"].items()}
    base = rate.get(1) or next(iter(rate.values()))
    rows = [[n, f"{r:.1f}", f"{r / base:.2f}x", f"{n / r * 1e3:.2f}"] for n, r in rate.items()]
    machine = machine_description()  # with the ISA the kernels use here
    config = {
        "model": f"resnet18 width {args.width}, pattern-pruned, 1x3x{args.size}x{args.size}",
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "rounds": args.rounds, "seconds": args.seconds, "settle_s": args.settle,
    }  # fmt: skip
    payload = {
        "config": config,
        "calls_per_s": {str(n): r for n, r in rate.items()},
        "samples": {str(n): s for n, s in measured["samples"].items()},
        "machine": machine,
    }
    table = markdown_table(["caller threads", "calls/s", "vs 1 thread", "ms per call"], rows)
    text = (
        f"# One CompiledModel, several caller threads\n\n{config['model']}; "
        f"TVM_NUM_THREADS={config['tvm_num_threads']} per caller; medians of {args.rounds} "
        f"rounds of {args.seconds} s (calls/s: all threads' calls over the wall time; ms per "
        f"call: as one caller sees it). ISA: {machine['isa']}.\n\n{table}"
    )
    return payload, text


def main() -> None:
    args = parse_args()
    if args.tvm_threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(args.tvm_threads)  # read when TVM starts its pools
    from tvm_sparse.benchmarking import write_results

    payload, text = report(args, run(args))
    paths = write_results(args.out, payload, text)
    print(text)
    print("wrote " + " and ".join(paths), file=sys.stderr)


if __name__ == "__main__":
    main()
