"""ARM64 (NEON) code of the conv kernels, counted from the generated assembly (plan-only).

Emulated timings mean nothing, so this counts instead: for each layer, compile it for
aarch64-linux-gnu dense and pattern-sparse (8 patterns x 4 taps, 28 % of kernels), find the
innermost loops of the kernel that hold vector FMAs (`fmla v.4s`), and estimate the instructions
executed per output pixel: sum over those loops of (instructions per iteration x iterations).
Iterations come from the packed weight: one iteration per kept kernel and output tile. Loops
are matched to patterns in code order (one loop per pattern, as the generator emits them).

    python benchmarks/arm_neon_counts.py     # writes benchmarks/results/arm_neon_counts.{json,md}
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

import tvm_sparse
from schedules.pattern_conv2d import ConvGeometry, default_config, tile_defaults
from tvm_sparse.benchmarking import markdown_table, write_results
from tvm_sparse.formats import PatternWeight
from tvm_sparse.testing import random_pattern_weight

LAYERS = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]
BRANCH = re.compile(r"^\s+(b(\.\w+)?|cbn?z|tbn?z)\s.*?(\.LBB\w+)\s*$")
LABEL = re.compile(r"^(\.LBB\w+):")


def fma_loops(asm: str) -> list[dict]:
    """Innermost backward-branch loops containing `fmla`, in code order."""
    lines = asm.split("\n")
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    loops = []
    for i, line in enumerate(lines):
        m = BRANCH.match(line)
        if not m or labels.get(m.group(3), i) >= i:
            continue
        body = [x for x in lines[labels[m.group(3)] + 1 : i + 1] if re.match(r"^\s+[a-z]", x)]
        if any(x.strip().startswith("fmla") for x in body):
            loops.append({
                "start": labels[m.group(3)], "end": i, "instructions": len(body),
                "fmla": sum(x.strip().startswith("fmla") for x in body),
                "neon": sum(bool(re.search(r"\bv\d+\.|\bq\d+\b", x)) for x in body),
            })  # fmt: skip
    innermost = [a for a in loops if not any(a["start"] < b["start"] < a["end"] for b in loops)]
    return sorted(innermost, key=lambda d: d["start"])


def count_layer(o: int, c: int, size: int, sparse: bool) -> dict:
    weight = random_pattern_weight(o, c, 3, seed=0)
    if not sparse:
        weight = np.random.default_rng(0).standard_normal(weight.shape).astype("float32")
    net = torch.nn.Conv2d(c, o, 3, padding=1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(weight))
    x = np.zeros((1, c, size, size), "float32")
    cm = tvm_sparse.compile(net.eval(), (x,), target="arm64")
    (lib,) = [m for m in cm.executable.mod._collect_dso_modules() if m.kind == "llvm"]
    loops = fma_loops(lib.inspect_source("asm"))
    packed = PatternWeight.from_dense(weight, keep_zeros=not sparse)
    geom = ConvGeometry(1, c, size, size, o, (3, 3), (1, 1), (1, 1, 1, 1))
    cfg = default_config(geom, filter_group=packed.filter_group, **tile_defaults(geom, 32, 4))
    cols = cfg.cols or math.ceil(size / cfg.vector) * cfg.vector
    tiles = math.ceil(size / cfg.rows) * math.ceil(size / cols)
    per_pattern = np.diff(packed.kernel_ptr, axis=1).sum(0) // cfg.filters
    outputs = o * size * size
    result = {"layer": f"{o}x{c}x3x3 on {size}x{size}", "sparse": sparse,
              "fma_loops": len(loops), "patterns": len(packed.patterns)}  # fmt: skip
    if len(loops) == len(packed.patterns):
        iters = per_pattern * tiles
        result["instructions_per_output"] = float(
            sum(lp["instructions"] * n for lp, n in zip(loops, iters, strict=True)) / outputs
        )
        result["fmla_per_output"] = float(
            sum(lp["fmla"] * n for lp, n in zip(loops, iters, strict=True)) / outputs
        )
    return result


def main() -> None:
    rows, results = [], []
    for o, c, size in LAYERS:
        pair = [count_layer(o, c, size, s) for s in (False, True)]
        results += pair
        d, s = pair
        if "instructions_per_output" in d and "instructions_per_output" in s:
            rows.append([
                d["layer"], f"{d['fmla_per_output']:.1f}", f"{d['instructions_per_output']:.1f}",
                f"{s['fmla_per_output']:.1f}", f"{s['instructions_per_output']:.1f}",
                f"{d['instructions_per_output'] / s['instructions_per_output']:.2f}x",
            ])  # fmt: skip
        else:
            rows.append([d["layer"], "?", "?", "?", "?", "loops not matched"])
    table = markdown_table(
        ["layer", "dense fmla/output", "dense instr/output", "sparse fmla/output",
         "sparse instr/output", "dense / sparse instructions"], rows,
    )  # fmt: skip
    write_results(
        "benchmarks/results/arm_neon_counts",
        {"layers": results},
        "# NEON instruction counts, aarch64-linux-gnu (from the generated assembly)\n\n"
        "Inner-loop instructions executed per output pixel, estimated statically (instructions "
        "per loop iteration x iterations from the packed weight). 4-lane fp32 NEON: a dense "
        "3x3 conv needs C*9/4 fmla per output at best.\n\n" + table,
    )
    print(table)


if __name__ == "__main__":
    main()
