"""Staged layouts between pattern convs (``relay_passes/staged_layout.py``), measured.

Per stride-1 3x3 layer of ResNet-18 / VGG-16 whose default kernel reads lane-segmented rows:
the kernel with NCHW input and output, reading its input already staged (as the second conv
of a pair does), writing its output staged (the first), and both; each checked against PyTorch,
called directly, interleaved in one process. Then whole models compiled with and without the
pass (``PairStagedLayouts``), timed interleaved.

    python benchmarks/bench_staged_pairs.py [--filter-group 4] [--models resnet18_g4,vgg16_g4]

(~3 min; writes ``benchmarks/results/staged_pairs.{json,md}``)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import tvm
from bench_conv_layers import LAYERS, layer_case
from bench_models import FILTER_GROUPS, MODELS

import tvm_sparse
import tvm_sparse.pipeline
from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    default_config,
    staged_layout,
    tile_defaults,
)
from tvm_sparse.benchmarking import (
    machine_description,
    markdown_table,
    time_interleaved,
    tvm_runner,
    write_results,
)
from tvm_sparse.formats import PatternWeight
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.testing import (
    from_staged,
    pattern_conv_kernel,
    pattern_prune_model_,
    randomize_batchnorm_,
    to_staged,
)

VARIANTS = ("NCHW", "staged input", "staged output", "both")


def layer_runners(index: int, filter_group: int, threads: int) -> dict | None:
    """The four variants of ``LAYERS[index]``'s kernel (bias + ReLU), checked; None where the
    default kernel reads no staged layout."""
    _, o, c, size, stride = LAYERS[index]
    geom = ConvGeometry(1, c, size, size, o, (3, 3), (stride, stride), (1, 1, 1, 1))
    weight, x = layer_case(index, filter_group)
    group = PatternWeight.from_dense(weight, num_shares=2).filter_group
    target = resolve_target("x86")
    cfg = default_config(
        geom, filter_group=group, shares=threads,
        **tile_defaults(geom, vector_registers(target), vector_lanes(target)),
    )  # fmt: skip
    layout = staged_layout(geom, cfg)
    if layout is None:
        return None
    bias = np.random.default_rng(index).standard_normal(o).astype("float32")
    t = torch.from_numpy
    ref = torch.relu(torch.conv2d(t(x), t(weight), t(bias), stride, 1)).numpy()
    epi = Epilogue(bias=True, activation="relu")
    runners = {}
    for name in VARIANTS:
        staged_in = layout if name in ("staged input", "both") else None
        staged_out = layout if name in ("staged output", "both") else None
        run, _ = pattern_conv_kernel(geom, weight, epi, cfg, staged_input=staged_in,
                                     staged_output=staged_out)  # fmt: skip
        xt = tvm.runtime.tensor(to_staged(x, layout) if staged_in else x)
        out = run(xt, bias)
        got = from_staged(out.numpy(), layout, size) if staged_out else out.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
        runners[name] = lambda run=run, xt=xt, out=out: run(xt, bias, out=out)
    return runners


def model_runners(name: str) -> dict:
    """``name`` (``bench_models.MODELS``) compiled with and without ``PairStagedLayouts``."""
    torch.manual_seed(0)
    net = pattern_prune_model_(MODELS[name](), filter_group=FILTER_GROUPS.get(name, 1))
    net = randomize_batchnorm_(net).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    with_pass = tvm_sparse.compile(net, (x,))
    keep = tvm_sparse.pipeline.PairStagedLayouts
    tvm_sparse.pipeline.PairStagedLayouts = lambda: tvm.transform.Sequential([])
    try:
        without = tvm_sparse.compile(net, (x,))
    finally:
        tvm_sparse.pipeline.PairStagedLayouts = keep
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    for cm in (with_pass, without):
        np.testing.assert_allclose(cm(x), ref, rtol=1e-3, atol=1e-3 * scale)
    return {"without": tvm_runner(without, (x,)), "with": tvm_runner(with_pass, (x,))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter-group", type=int, default=4)
    ap.add_argument("--models", default="resnet18_g4,vgg16_g4,resnet18")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/staged_pairs")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    payload = {"machine": machine_description(), "filter_group": args.filter_group}
    layer_rows, payload["layers"] = [], []
    for index, (model, o, c, size, stride) in enumerate(LAYERS):
        runners = layer_runners(index, args.filter_group, args.threads) if stride == 1 else None
        if runners is None:
            continue
        ms = time_interleaved(runners, rounds=args.rounds, warm=20, settle_s=0.0, window_s=0.02)
        layer = f"{o}x{c}x3x3 s{stride} on {size}x{size}"
        cells = [f"{ms[v]:.4f} ({ms['NCHW'] / ms[v]:.2f}x)" for v in VARIANTS]
        layer_rows.append([model, layer, *cells])
        payload["layers"].append({"model": model, "layer": layer, "ms": ms})
        print(" | ".join(layer_rows[-1]), flush=True)
    model_rows, payload["models"] = [], []
    for name in filter(None, args.models.split(",")):
        ms = time_interleaved(model_runners(name), rounds=args.rounds, warm=2, inner=3)
        model_rows.append([name, f"{ms['without']:.2f}", f"{ms['with']:.2f}",
                           f"{ms['without'] / ms['with']:.3f}x"])  # fmt: skip
        payload["models"].append({"model": name, "ms": ms})
        print(" | ".join(model_rows[-1]), flush=True)
    md = (
        "# Staged layouts between pattern convs\n\n"
        f"{args.threads} threads, medians of {args.rounds} interleaved rounds. Stride-1 3x3 "
        f"layers (8x fewer FLOPs, kernels per group of {args.filter_group} filters, bias + "
        "ReLU) whose default kernel reads lane-segmented rows, called directly: NCHW in and "
        "out, reading the input already staged, writing the output staged, both (ms, speed-up "
        "over NCHW).\n\n"
        + markdown_table(["model", "layer", *(f"{v} ms" for v in VARIANTS)], layer_rows)
        + "\n\nWhole models compiled without / with `PairStagedLayouts` (its default: pairs "
        "whose consumer reads rows of >= 4 vectors), ms:\n\n"
        + markdown_table(["model", "without", "with", "speed-up"], model_rows)
        + "\n"
    )
    print(md)
    write_results(args.out, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
