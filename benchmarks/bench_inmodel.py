"""Each layer's time inside a whole unpruned model: tvm-sparse's kernels (the Relax VM's
instrument, ``tvm_sparse.profiling``) against ONNX Runtime's nodes (its own profiler), rounds
alternating between the two in one process, medians per layer shape.

Layers run alone (``bench_ops.py``) keep their weights and input in cache between calls; in a
model the weights stream from DRAM (ResNet-50 holds 100 MB) and every input was just written
by another kernel. This table shows where a model loses more than its layers do.

    python benchmarks/bench_inmodel.py [--models resnet50,mobilenet_v2] [--rounds 5]
    python benchmarks/bench_inmodel.py --models resnet50 --pattern --baseline HEAD~3

``--baseline REV`` also builds each model from git revision REV (a temporary worktree, its
packages imported in this process in place of the checkout's) and adds its column: a change's
effect on every layer inside the model, the two builds and ORT profiled in a rotating order
each round. Two builds of one tree read up to 10 % apart per layer on a noisy VM
(``--baseline HEAD`` with a clean checkout measures that floor). ``--pattern``: the 3x3 convs
pattern-pruned first (``tvm_sparse.testing.pattern_prune_model_``), the 1x1 convs dense.

Layers are matched by weight shape (out x in-per-group x kh x kw): each row sums every call of
that shape (e.g. a 3x3 shape at stride 2 and stride 1). ONNX Runtime's node names map to the
original ONNX graph's weights (its NCHWc layout pads channels). Both profilers add a few
microseconds a call; the whole-model row is each runtime's uninstrumented median. Writes
benchmarks/results/inmodel.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm

import tvm_sparse
from tvm_sparse.benchmarking import markdown_table, onnx_bytes, write_results
from tvm_sparse.models import mobilenet_v2, resnet18, resnet50
from tvm_sparse.profiling import profile_vm
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
PACKAGES = ("tvm_sparse", "schedules", "relay_passes")  # what a baseline tree replaces
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


@contextlib.contextmanager
def revision_tree(rev: str) -> Iterator[str]:
    """A temporary git worktree of this checkout at ``rev``; its path."""
    root = tempfile.mkdtemp(prefix="tvm_sparse_baseline_")
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    try:
        subprocess.run([*git, "worktree", "add", "--detach", root, rev], check=True,
                       capture_output=True, text=True)  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline {rev}: git worktree add failed: {e.stderr.strip()}") from e
    try:
        yield root
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", root], check=False)


@contextlib.contextmanager
def packages_from(root: str) -> Iterator[object]:
    """``tvm_sparse`` (with ``schedules`` and ``relay_passes``) imported from ``root`` for the
    duration of the block; the checkout's modules are back afterwards."""
    ours = {m: mod for m, mod in sys.modules.items() if m.split(".")[0] in PACKAGES}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        module = importlib.import_module("tvm_sparse")
        if not module.__file__.startswith(root):
            raise SystemExit(f"the baseline's tvm_sparse came from {module.__file__}")
        yield module
    finally:
        sys.path.remove(root)
        for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[name]
        sys.modules.update(ours)


def build(package, net, x: np.ndarray, ref: np.ndarray, label: str):
    """``package.compile(net)``, its output checked against PyTorch's ``ref``."""
    cm = package.compile(net, (x,))
    error = float(np.abs(np.asarray(cm(x)) - ref).max())
    if error > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise SystemExit(f"{label}: max abs error {error:.3g} against PyTorch")
    return cm


def profile_rounds(
    compiled: dict, model: bytes, x: np.ndarray, names: dict, rounds: int, runs: int, threads: int
) -> dict:
    """{runtime: {shape key: [ms per round]}} for every compiled build and ORT (``threads``),
    ``runs`` profiled runs each in every one of ``rounds``, in a rotating order."""
    known = {layer.shape.split()[0] for cm in compiled.values() for layer in cm.layers}
    tensors = [tvm.runtime.tensor(x)]
    ms: dict[str, dict[str, list]] = {k: defaultdict(list) for k in [*compiled, "ort"]}
    order = list(ms)
    for r in range(rounds):
        for runtime in order[r % len(order) :] + order[: r % len(order)]:
            if runtime == "ort":
                whole, per_shape = ort_profile(model, x, runs, threads, names)
            else:
                prof = profile_vm(compiled[runtime].executable, tensors, runs=runs)
                whole, per_shape = prof.run_ms, defaultdict(float)
                for k in prof.kernels:  # (kernels of one shape: stride 1 and 2, say)
                    per_shape[tvm_shape(k.name, known)] += k.ms
            ms[runtime]["whole model"].append(whole)
            for key, value in per_shape.items():
                ms[runtime][key].append(value)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="profiled runs per round")
    parser.add_argument("--baseline", metavar="REV", help="also build from this git revision")
    parser.add_argument("--pattern", action="store_true", help="3x3 convs pattern-pruned")
    parser.add_argument("--out", default="benchmarks/results/inmodel")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    rows, results = [], []
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(revision_tree(args.baseline)) if args.baseline else None
        for name in args.models.split(","):
            torch.manual_seed(0)
            net = MODELS[name]()
            if args.pattern:
                net = randomize_batchnorm_(pattern_prune_model_(net))
            net = net.eval()
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
            with torch.no_grad():
                ref = net(torch.from_numpy(x)).numpy()
            model = onnx_bytes(net, (x,))
            compiled = {"tvm": build(tvm_sparse, net, x, ref, name)}
            if baseline is not None:
                with packages_from(baseline) as package:
                    compiled["baseline"] = build(package, net, x, ref, f"{name} at {args.baseline}")
            names = onnx_shapes(model)
            ms = profile_rounds(compiled, model, x, names, args.rounds, args.runs, threads)
            model_rows = _rows(name, ms)
            results += model_rows
            rows += [[r[k] for k in _columns(baseline)] for r in model_rows]
    headers = {"model": "model", "layer": "layer (all calls)", "tvm_ms": "tvm-sparse ms",
               "baseline_ms": f"{args.baseline} ms", "vs_baseline": f"vs {args.baseline}",
               "ort_ms": "ORT ms", "vs_ort": "vs ORT"}  # fmt: skip
    table = markdown_table([headers[k] for k in _columns(baseline)], rows)
    summary = (
        f"{'3x3 convs pattern-pruned' if args.pattern else 'Unpruned models'}, batch 1, 224x224, "
        f"{threads} threads; per layer shape the median over {args.rounds} rounds of the "
        f"per-run time of all its calls ({args.runs} profiled runs a round, the runtimes in a "
        "rotating order). `vs ORT` > 1: tvm-sparse faster"
        + (f"; `vs {args.baseline}` > 1: faster than that revision's build." if baseline else ".")
    )
    write_results(
        args.out,
        {"threads": threads, "rounds": args.rounds, "runs": args.runs, "pattern": args.pattern,
         "baseline": args.baseline, "rows": results},
        f"# Layers inside whole models: tvm-sparse vs ONNX Runtime\n\n{summary}\n\n{table}",
    )  # fmt: skip
    print(table)


def _columns(baseline: str | None) -> list[str]:
    extra = ["baseline_ms", "vs_baseline"] if baseline else []
    return ["model", "layer", "tvm_ms", *extra, "ort_ms", "vs_ort"]


def _rows(name: str, ms: dict) -> list[dict]:
    """One row per shape any runtime ran, the whole model first, then the slowest."""

    def median(runtime: str, key: str) -> float | None:
        values = ms.get(runtime, {}).get(key)
        return round(statistics.median(values), 3) if values else None

    def ratio(slow: float | None, fast: float | None) -> float | None:
        return round(slow / fast, 2) if slow and fast else None

    keys = sorted({k for v in ms.values() for k in v}, key=lambda k: -(median("tvm", k) or 0))
    keys = ["whole model"] + [k for k in keys if k != "whole model"]
    out = []
    for key in keys:
        t, o, b = median("tvm", key), median("ort", key), median("baseline", key)
        row = {"model": name, "layer": key, "tvm_ms": t, "ort_ms": o, "vs_ort": ratio(o, t)}
        if "baseline" in ms:
            row.update(baseline_ms=b, vs_baseline=ratio(b, t))
        out.append(row)
    return out


if __name__ == "__main__":
    main()
