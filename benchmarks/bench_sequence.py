"""Sequence models (batch 1): a Transformer encoder (d_model 768, 12 heads, feed-forward 3072,
128 tokens; unpruned and with every matrix keeping 50 / 20 / 10 % of its 16x1 blocks) and
2-layer GRU / LSTM (input 39, hidden 1024, 100 steps; unpruned and with the recurrent weights
keeping 10 % of their 8x8 blocks): tvm-sparse vs ONNX Runtime vs PyTorch, interleaved in one
run, medians; useful GFLOP/s; tvm-sparse's time split per op class (its profile); compile times.

    python benchmarks/bench_sequence.py [--rounds 7] [--layers 4] [--only encoder|rnn]

Models from ``tvm_sparse.sequence_models`` (the CLI's ``builtin:bert-bsr`` / ``builtin:gru-bcr``
at their defaults). The encoder is compiled from the ``nn.Module`` (torch.export); the GRU /
LSTM from their ONNX export (the recurrence as one kernel per layer direction). Writes
benchmarks/results/sequence.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import tvm_sparse
from tvm_sparse.benchmarking import (
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_runner,
    time_interleaved,
    torch_runner,
    tvm_runner,
    write_results,
)
from tvm_sparse.sequence_models import encoder_model, recurrent_model

# Op class of a tvm-sparse kernel, by the first substring of its name that matches.
OP_CLASSES = [
    ("linear", ("dense_linear", "dense_matmul", "bsr_matmul", "bcr_matmul")),
    ("recurrent step", ("rnn", "gru", "lstm")),
    ("attention", ("attention", "softmax", "matmul")),
    ("norm", ("layer_norm",)),
]


def op_classes(cm: tvm_sparse.CompiledModel, x: np.ndarray) -> dict[str, float]:
    """ms per op class of one run (tvm-sparse's per-kernel profile)."""
    split: dict[str, float] = {}
    for k in cm.profile(x, runs=5).kernels:
        cls = next((c for c, keys in OP_CLASSES if any(s in k.name for s in keys)), "other")
        split[cls] = split.get(cls, 0.0) + k.ms
    return split


def bench(name: str, net: torch.nn.Module, x: np.ndarray, from_onnx: bool, rounds: int,
          threads: int) -> dict:  # fmt: skip
    model = onnx_bytes(net, (x,))
    start = time.perf_counter()
    if from_onnx:
        import onnx

        cm = tvm_sparse.compile(onnx.load_from_string(model), (x,))
    else:
        cm = tvm_sparse.compile(net, (x,))
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    err = float(np.max(np.abs(cm(x) - ref)))
    assert err <= 1e-3 * max(1.0, float(np.abs(ref).max())), (name, err)
    useful = sum(r.flops_kept for r in cm.layers)
    ms = time_interleaved(
        {
            "tvm-sparse": tvm_runner(cm, (x,)),
            "onnxruntime": ort_runner(model, (x,), threads),
            "pytorch": torch_runner(net, (x,), threads),
        },
        rounds=rounds,
    )
    return {
        "model": name,
        "ms": ms,
        "vs_ort": ms["onnxruntime"] / ms["tvm-sparse"],
        "vs_pytorch": ms["pytorch"] / ms["tvm-sparse"],
        "compile_s": compile_s,
        "useful_gflops": useful / ms["tvm-sparse"] / 1e6,
        "max_abs_err": err,
        "op_ms": op_classes(cm, x),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", choices=["encoder", "rnn"])
    parser.add_argument("--keeps", default="1,0.5,0.2,0.1", help="encoder block densities")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    cases = []
    if args.only != "rnn":
        for keep in (None if k == 1 else k for k in map(float, args.keeps.split(","))):
            label = "unpruned" if keep is None else f"{1 - keep:.0%} of 16x1 blocks pruned"
            make = lambda k=keep: encoder_model(args.layers, k)  # noqa: E731
            cases.append((f"encoder x{args.layers}, {label}", make, False))
    if args.only != "encoder":
        for kind in ("GRU", "LSTM"):
            for keep in (None, 0.1):
                label = "" if keep is None else f", W_hh {1 - keep:.0%} of 8x8 blocks pruned"
                make = lambda k=kind, p=keep: recurrent_model(k, p)  # noqa: E731
                cases.append((f"2-layer {kind} 39->1024, 100 steps{label}", make, True))
    results, rows = [], []
    for name, make, from_onnx in cases:
        net, x = make()
        r = bench(name, net, x, from_onnx, args.rounds, threads)
        results.append(r)
        ms, ops = r["ms"], r["op_ms"]
        split = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))
        rows.append([
            name, f"{ms['tvm-sparse']:.2f}", f"{ms['onnxruntime']:.2f}", f"{ms['pytorch']:.2f}",
            f"**{r['vs_ort']:.2f}x**", f"{r['vs_pytorch']:.2f}x", f"{r['useful_gflops']:.0f}",
            f"{r['compile_s']:.1f}", split,
        ])  # fmt: skip
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = markdown_table(
        ["model", "tvm-sparse ms", "ORT ms", "PyTorch ms", "vs ORT", "vs PyTorch",
         "useful GFLOP/s", "compile s", "tvm-sparse ms per op class"], rows,
    )  # fmt: skip
    summary = (
        f"Batch 1, {threads} threads, medians of {args.rounds} interleaved rounds; tvm-sparse "
        "for the host's ISA. Useful GFLOP/s: the FLOPs of the weights kept (the report's total) "
        "over tvm-sparse's time. The op-class split is tvm-sparse's own profile (instrumented "
        "run)."
    )
    write_results(
        "benchmarks/results/sequence",
        {"rows": results, "threads": threads, "rounds": args.rounds,
         "machine": machine_description()},
        f"# Sequence models\n\n{summary}\n\n{table}",
    )  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
