"""Whole pruned models (224x224, batch 1): tvm-sparse vs its dense build vs PyTorch vs ONNX Runtime
on the same weights, interleaved in one run, plus compile times.

Every 3x3 conv (groups 1) keeps 8 patterns of 4 taps and 28 % of its kernels (random weights,
BatchNorm with non-trivial statistics). ResNet-18 / VGG-16 / ``resnet50_pattern``: 7x7 stem,
1x1 and FC layers stay dense. ResNet-50 / MobileNetV2 / ``vgg16_bsr``: 1x1 convs and FC layers
also keep 10 % of their 8x1 blocks (VGG-16's three FC layers hold 90 % of its weights: dense,
the 25088x4096 one alone reads 411 MB per image, ~13 ms here for any runtime).

    python benchmarks/bench_models.py [--rounds 7] [--models resnet18,vgg16] [--isa native|avx2]

Writes benchmarks/results/models.{json,md} (``--out`` another stem). ``--isa avx2``: tvm-sparse
built for ``x86-avx2``, PyTorch pinned to AVX2 and, on an AVX-512 host, AVX-512 hidden from
ONNX Runtime's CPUID (``benchmarking.isa_target``; the table states the ISA ONNX Runtime ran).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import tvm_sparse
from tvm_sparse.benchmarking import (
    isa_summary,
    isa_target,
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_isa,
    ort_runner,
    time_interleaved,
    torch_runner,
    tvm_runner,
    write_results,
)
from tvm_sparse.models import mobilenet_v2, resnet18, resnet50, vgg16_bn
from tvm_sparse.testing import block_prune_model_, pattern_prune_model_, randomize_batchnorm_

MODELS = {
    "resnet18": lambda: resnet18(),
    "vgg16": lambda: vgg16_bn(),
    "vgg16_bsr": lambda: vgg16_bn(),
    "resnet50": lambda: resnet50(),
    "resnet50_pattern": lambda: resnet50(),
    "mobilenet_v2": lambda: mobilenet_v2(),
    "resnet18_g4": lambda: resnet18(),
    "vgg16_g4": lambda: vgg16_bn(),
    "resnet18_g16": lambda: resnet18(),
    "vgg16_g16": lambda: vgg16_bn(),
}
# 3x3 convs of these keep kernels and patterns per group of 4 filters (computed together), or
# of 16 (on AVX-512: computed in the lanes of a vector, ``schedules.pattern_conv2d_lanes``).
FILTER_GROUPS = {"resnet18_g4": 4, "vgg16_g4": 4, "resnet18_g16": 16, "vgg16_g16": 16}
# 1x1 convs and FC layers of these are BSR-pruned (8x1 blocks, 90 % of blocks dropped).
BLOCK_PRUNED = {"resnet50", "mobilenet_v2", "vgg16_bsr"}


def bench_model(name: str, rounds: int, threads: int, target: str = "x86") -> dict:
    torch.manual_seed(0)
    net = pattern_prune_model_(MODELS[name](), filter_group=FILTER_GROUPS.get(name, 1))
    if name in BLOCK_PRUNED:
        net = block_prune_model_(net, keep=0.1)
    net = randomize_batchnorm_(net).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    sparse = tvm_sparse.compile(net, (x,), target=target, verbose=True)
    dense = tvm_sparse.compile(net, (x,), target=target, sparse=False, verbose=True)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    errors = {}
    for label, cm in (("sparse", sparse), ("tvm_dense", dense)):
        out = cm(x)
        errors[label] = float(np.abs(out - ref).max())
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * scale)
    runners = {
        "sparse": tvm_runner(sparse, (x,)),
        "tvm_dense": tvm_runner(dense, (x,)),
        "pytorch": torch_runner(net, (x,), threads),
        "onnxruntime": ort_runner(onnx_bytes(net, (x,)), (x,), threads),
    }
    errors["onnxruntime"] = float(np.abs(runners["onnxruntime"]()[0] - ref).max())
    ms = time_interleaved(runners, rounds=rounds, warm=2, inner=3)
    kept = sum(r.flops_kept for r in sparse.layers)
    total = sum(r.flops_dense for r in sparse.layers)
    return {
        "model": name,
        "ms": ms,
        "speedup_vs_onnxruntime": ms["onnxruntime"] / ms["sparse"],
        "speedup_vs_best_dense": min(ms["pytorch"], ms["onnxruntime"]) / ms["sparse"],
        "flops_dense": total,
        "flops_kept": kept,
        "compile_seconds": {"sparse": sparse.compile_seconds, "dense": dense.compile_seconds},
        "max_abs_error": errors,
        "report": sparse.report(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="resnet18,vgg16,vgg16_bsr,resnet50,mobilenet_v2")
    parser.add_argument("--out", default="benchmarks/results/models")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args()
    target = isa_target(args.isa)
    threads = os.cpu_count() or 1
    results, rows = [], []
    for name in args.models.split(","):
        r = bench_model(name, args.rounds, threads, target)
        results.append(r)
        ms = r["ms"]
        rows.append([
            name, f"{r['flops_dense'] / 1e9:.2f} -> {r['flops_kept'] / 1e9:.2f}",
            f"{ms['sparse']:.1f}", f"{ms['tvm_dense']:.1f}", f"{ms['pytorch']:.1f}",
            f"{ms['onnxruntime']:.1f}", f"**{r['speedup_vs_onnxruntime']:.2f}x**",
            f"{r['flops_kept'] / ms['sparse'] / 1e6:.0f}",
            f"{r['compile_seconds']['sparse']:.1f}",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = markdown_table(
        ["model", "GFLOP dense -> kept", "sparse ms", "TVM dense ms", "PyTorch ms", "ORT ms",
         "sparse vs ORT", "useful GFLOP/s", "compile s (sparse)"], rows,
    )  # fmt: skip
    summary = (
        f"{isa_summary(target)}. "
        f"Batch 1, 224x224, {threads} threads, medians of {args.rounds} interleaved rounds "
        "(each: untimed then timed calls per runtime, at least 2 + 3 and 30 ms each). GFLOP "
        "counts conv + FC multiply-adds x2."
        " Every 3x3 conv keeps 8 patterns of 4 taps and 28 % of its kernels; `_bsr`, resnet50,"
        " mobilenet_v2: 1x1 / FC layers 90 % BSR-pruned too; `_g4` / `_g16`: kernels and"
        " patterns chosen per group of 4 / 16 filters."
    )
    write_results(
        args.out,
        {"models": results, "threads": threads, "rounds": args.rounds, "target": target,
         "ort_isa": ort_isa(), "machine": machine_description()},
        f"# Whole pruned models\n\n{summary}\n\n{table}",
    )  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
