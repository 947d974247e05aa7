"""Each layer's time inside a whole unpruned model: tvm-sparse's kernels (the Relax VM's
instrument, ``tvm_sparse.profiling``) against ONNX Runtime's nodes (its own profiler), rounds
alternating between the two in one process, medians per layer shape.

Layers run alone (``bench_ops.py``) keep their weights and input in cache between calls; in a
model the weights stream from DRAM (ResNet-50 holds 100 MB) and every input was just written
by another kernel. This table shows where a model loses more than its layers do.

    python benchmarks/bench_inmodel.py [--models resnet50,mobilenet_v2] [--rounds 5]

Layers are matched by weight shape (out x in-per-group x kh x kw): each row sums every call of
that shape (e.g. a 3x3 shape at stride 2 and stride 1). ONNX Runtime's node names map to the
original ONNX graph's weights (its NCHWc layout pads channels). Both profilers add a few
microseconds a call; the whole-model row is each runtime's uninstrumented median. Writes
benchmarks/results/inmodel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import onnx
import onnxruntime as ort
import tvm

import tvm_sparse
from tvm_sparse.benchmarking import markdown_table, onnx_bytes, write_results
from tvm_sparse.models import mobilenet_v2, resnet18, resnet50
from tvm_sparse.profiling import profile_vm

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
KERNEL_SHAPE = re.compile(r"(conv1x1|conv2d|matmul)_(\d+)x(\d+)(?:x(\d)x(\d))?")


def tvm_shape(kernel: str, known: set[str]) -> str:
    """``dense_conv1x1_256x64`` -> ``256x64x1x1`` (out x in x kh x kw), ``dense_matmul_2048x1000``
    -> ``fc 2048->1000``; other kernels keep their name. TVM appends a digit to the name of
    another kernel of the same shape: trailing digits are dropped until the shape is one of
    the ``known`` layer shapes."""
    m = KERNEL_SHAPE.search(kernel)
    if not m:
        return kernel
    op, a, b, kh, kw = m.groups()
    if op == "matmul":  # (in x out)
        return f"fc {a}->{b}"
    if "depthwise" in kernel:
        return f"{a}x1x{kh}x{kw}"
    while len(b) > 1 and kh is None and f"{a}x{b}x1x1" not in known:
        b = b[:-1]
    return f"{a}x{b}x{kh or 1}x{kw or 1}"


def onnx_shapes(model: bytes) -> dict[str, str]:
    """Tensor name -> the shape key (as ``tvm_shape``) of the conv / FC that produced it,
    through the element-wise ops ONNX Runtime fuses into it (its profile names a fused node
    by the chain's output tensor)."""
    graph = onnx.load_from_string(model).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def key(node) -> str | None:
        while node is not None and node.op_type not in ("Conv", "Gemm"):
            node = producer.get(node.input[0]) if node.input else None
        if node is None:
            return None
        if node.op_type == "Gemm":
            out, inp = weights[node.input[1]]
            return f"fc {inp}->{out}"
        return "x".join(map(str, weights[node.input[1]]))

    by_tensor = {out: k for out, node in producer.items() if (k := key(node)) is not None}
    by_node = {node.name: k for node in graph.node if (k := key(node)) is not None}
    return by_tensor | by_node  # (unfused nodes are named by their node)


def ort_profile(model: bytes, x: np.ndarray, runs: int, threads: int, names: dict) -> tuple:
    """(uninstrumented median ms, {shape key: ms per run}) of one profiled session."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    plain_sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feed = {plain_sess.get_inputs()[0].name: x}
    for _ in range(3):
        plain_sess.run(None, feed)
    plain = []
    for _ in range(runs):
        t0 = time.perf_counter()
        plain_sess.run(None, feed)
        plain.append((time.perf_counter() - t0) * 1e3)
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    warm = 3
    for _ in range(warm + runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node"]
    events = events[len(events) // (warm + runs) * warm :]  # drop the warm-up runs' events
    per_shape: dict[str, float] = defaultdict(float)
    for e in events:
        if e["name"].endswith("_kernel_time"):
            tensor = e["name"].removesuffix("_kernel_time").removesuffix("_nchwc")
            key = names.get(tensor, e["args"].get("op_name", tensor))
            per_shape[key] += e["dur"] / 1e3 / runs
    return statistics.median(plain), dict(per_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="profiled runs per round")
    parser.add_argument("--out", default="benchmarks/results/inmodel")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    rows, results = [], []
    for name in args.models.split(","):
        net = MODELS[name]().eval()
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
        model = onnx_bytes(net, (x,))
        names = onnx_shapes(model)
        cm = tvm_sparse.compile(net, (x,))
        known = {layer.shape.split()[0] for layer in cm.layers}
        tensors = [tvm.runtime.tensor(x)]
        tvm_ms, ort_ms = defaultdict(list), defaultdict(list)
        for r in range(args.rounds):
            prof = profile_vm(cm.executable, tensors, runs=args.runs)
            tvm_ms["whole model"].append(prof.run_ms)
            per_kernel_shape: dict[str, float] = defaultdict(float)
            for k in prof.kernels:  # (kernels of one shape: stride 1 and 2, say)
                per_kernel_shape[tvm_shape(k.name, known)] += k.ms
            for key, ms in per_kernel_shape.items():
                tvm_ms[key].append(ms)
            whole, per_shape = ort_profile(model, x, args.runs, threads, names)
            ort_ms["whole model"].append(whole)
            for key, ms in per_shape.items():
                ort_ms[key].append(ms)
            print(f"{name}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        model_rows = _rows(name, tvm_ms, ort_ms)
        results += model_rows
        rows += [
            [r["model"], r["layer"], r["tvm_ms"], r["ort_ms"], r["vs_ort"]] for r in model_rows
        ]
    table = markdown_table(
        ["model", "layer (all calls)", "tvm-sparse ms", "ORT ms", "vs ORT"], rows
    )
    summary = (
        f"Unpruned models, batch 1, 224x224, {threads} threads; per layer shape the median over "
        f"{args.rounds} rounds of the per-run time of all its calls ({args.runs} profiled runs "
        "a round, the runtimes alternating). `vs ORT` > 1: tvm-sparse faster."
    )
    write_results(
        args.out,
        {"threads": threads, "rounds": args.rounds, "runs": args.runs, "rows": results},
        f"# Layers inside whole models: tvm-sparse vs ONNX Runtime\n\n{summary}\n\n{table}",
    )
    print(table)


def _rows(name: str, tvm_ms: dict, ort_ms: dict) -> list[dict]:
    """One row per shape either runtime ran, the whole model first, then the slowest."""

    def median(samples: dict, key: str) -> float | None:
        values = samples.get(key)
        return round(statistics.median(values), 3) if values else None

    keys = sorted(set(tvm_ms) | set(ort_ms), key=lambda k: -(median(tvm_ms, k) or 0))
    keys = ["whole model"] + [k for k in keys if k != "whole model"]
    out = []
    for key in keys:
        t, o = median(tvm_ms, key), median(ort_ms, key)
        ratio = round(o / t, 2) if t and o else None
        out.append({"model": name, "layer": key, "tvm_ms": t, "ort_ms": o, "vs_ort": ratio})
    return out


if __name__ == "__main__":
    main()
