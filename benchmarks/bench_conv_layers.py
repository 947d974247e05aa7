"""Every 3x3 conv shape of ResNet-18 and VGG-16 (224x224 input), pattern-pruned to ~8x fewer
FLOPs (8 patterns of 4 taps, 28 % of kernels kept): tvm-sparse vs its dense build vs PyTorch vs
ONNX Runtime, interleaved in one run, medians, useful GFLOP/s.

    python benchmarks/bench_conv_layers.py [--rounds 15] [--only resnet18|vgg16] [--filter-group 4]
        [--isa native|avx2]

Writes benchmarks/results/conv_layers.{json,md}. ``--filter-group G``: kernels and patterns drawn
per group of G filters (``tvm_sparse.prune``'s filter groups), which the kernel computes together
(write it to another ``--out``). ``--isa avx2``: tvm-sparse built for ``x86-avx2``, PyTorch
pinned to AVX2 and, on an AVX-512 host, AVX-512 hidden from ONNX Runtime's CPUID
(``benchmarking.isa_target``; the table states the ISA ONNX Runtime ran).
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
from tvm_sparse.testing import random_pattern_weight

# (model, out channels, in channels, input size, stride), one row per distinct shape.
LAYERS = [
    ("resnet18", 64, 64, 56, 1),
    ("resnet18", 128, 64, 56, 2),
    ("resnet18", 128, 128, 28, 1),
    ("resnet18", 256, 128, 28, 2),
    ("resnet18", 256, 256, 14, 1),
    ("resnet18", 512, 256, 14, 2),
    ("resnet18", 512, 512, 7, 1),
    ("vgg16", 64, 3, 224, 1),
    ("vgg16", 64, 64, 224, 1),
    ("vgg16", 128, 64, 112, 1),
    ("vgg16", 128, 128, 112, 1),
    ("vgg16", 256, 128, 56, 1),
    ("vgg16", 256, 256, 56, 1),
    ("vgg16", 512, 256, 28, 1),
    ("vgg16", 512, 512, 28, 1),
    ("vgg16", 512, 512, 14, 1),
]


class Conv(torch.nn.Module):
    def __init__(self, weight: np.ndarray, stride: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, stride, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def layer_case(index: int, filter_group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``LAYERS[index]``'s pruned weight (8 patterns, 28 % of kernels, drawn per group of
    ``filter_group`` filters) and input, seeded by the index (every benchmark uses these)."""
    _, o, c, size, _ = LAYERS[index]
    weight = random_pattern_weight(
        o, c, 3, num_patterns=8, kernel_keep=0.28, seed=index, filter_group=filter_group
    )
    x = np.random.default_rng(index).standard_normal((1, c, size, size)).astype("float32")
    return weight, x


def bench_layer(
    index: int, rounds: int, threads: int, filter_group: int = 1, target: str = "x86"
) -> dict:
    """``LAYERS[index]`` timed sparse / TVM dense / PyTorch / ONNX Runtime, interleaved."""
    model, o, c, size, stride = LAYERS[index]
    weight, x = layer_case(index, filter_group)
    net = Conv(weight, stride).eval()
    sparse = tvm_sparse.compile(net, (x,), target=target)
    dense = tvm_sparse.compile(net, (x,), sparse=False, target=target)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    for cm in (sparse, dense):
        np.testing.assert_allclose(cm(x), ref, rtol=1e-3, atol=1e-3)
    runners = {
        "sparse": tvm_runner(sparse, (x,)),
        "tvm_dense": tvm_runner(dense, (x,)),
        "pytorch": torch_runner(net, (x,), threads),
        "onnxruntime": ort_runner(onnx_bytes(net, (x,)), (x,), threads),
    }
    ms = time_interleaved(runners, rounds=rounds)
    rec = sparse.layers[0]
    best_dense = min(ms["pytorch"], ms["onnxruntime"])
    return {
        "model": model,
        "shape": f"{o}x{c}x3x3 s{stride} on {size}x{size}",
        "flops_dense": rec.flops_dense,
        "flops_kept": rec.flops_kept,
        "ms": ms,
        "speedup_vs_best_dense": best_dense / ms["sparse"],
        "useful_gflops": {k: rec.flops_kept / v / 1e6 for k, v in ms.items()},
        "dense_gflops": {k: rec.flops_dense / v / 1e6 for k, v in ms.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", choices=["resnet18", "vgg16"])
    parser.add_argument("--out", default="benchmarks/results/conv_layers")
    parser.add_argument("--filter-group", type=int, default=1)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args()
    target = isa_target(args.isa)
    threads = os.cpu_count() or 1
    rows, results = [], []
    for i, (model, *_) in enumerate(LAYERS):
        if args.only and model != args.only:
            continue
        r = bench_layer(i, args.rounds, threads, args.filter_group, target)
        results.append(r)
        ms, g = r["ms"], r["useful_gflops"]
        rows.append([
            r["model"], r["shape"], f"{r['flops_dense'] / r['flops_kept']:.1f}x",
            f"{ms['sparse']:.3f}", f"{ms['tvm_dense']:.3f}", f"{ms['pytorch']:.3f}",
            f"{ms['onnxruntime']:.3f}", f"**{r['speedup_vs_best_dense']:.2f}x**",
            f"{g['sparse']:.0f}", f"{r['dense_gflops']['onnxruntime']:.0f}",
        ])  # fmt: skip
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    ratios = [r["speedup_vs_best_dense"] for r in results]
    table = markdown_table(
        ["model", "layer", "FLOPs cut", "sparse ms", "TVM dense ms", "PyTorch ms", "ORT ms",
         "sparse vs best dense", "sparse useful GFLOP/s", "ORT dense GFLOP/s"], rows,
    )  # fmt: skip
    summary = (
        f"{isa_summary(target)}; {threads} threads, medians of "
        f"{args.rounds} interleaved rounds. Speed-up vs the "
        f"faster of PyTorch / ONNX Runtime: min {min(ratios):.2f}x, median "
        f"{float(np.median(ratios)):.2f}x, max {max(ratios):.2f}x. Useful GFLOP/s counts only "
        "the multiply-adds the sparse kernel keeps (the same numerator for every runtime)."
    )
    title = "Pattern-sparse 3x3 conv layers"
    if args.filter_group > 1:
        title += f", connectivity and patterns shared by groups of {args.filter_group} filters"
    write_results(
        args.out,
        {"layers": results, "threads": threads, "rounds": args.rounds,
         "filter_group": args.filter_group, "target": target, "ort_isa": ort_isa(),
         "machine": machine_description()},
        f"# {title}\n\n{summary}\n\n{table}",
    )  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
