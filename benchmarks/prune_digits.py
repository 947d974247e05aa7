"""Accuracy vs sparsity on scikit-learn's digits: ADMM vs one-shot magnitude projection.

For each seed a dense DigitsCNN is trained once; for each conv2/conv3 kernel keep rate (8 patterns
on every 3x3 conv) it is pruned (a) by ADMM then hard prune + masked fine-tune and (b) by one-shot
projection of the dense weights + masked fine-tune with the same epoch budget. Writes
benchmarks/results/prune_digits.{json,md,png}. Runs on one thread, ~4 minutes.

    python benchmarks/prune_digits.py [--seeds 0 1] [--keeps 0.5 0.27 0.12 0.05 0.02]
        [--filter-group 4]   # patterns + connectivity per group of 4 filters: prune_digits_g4.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tvm_sparse.prune.digits import (
    WIDTH,
    Recipe,
    accuracy,
    load_digits_data,
    prune_digits,
    train_dense,
)
from tvm_sparse.prune.report import sparsity_report

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("admm", "oneshot")


def machine() -> dict:
    """CPU model, core count, Python / torch versions."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": 1,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run(seeds: list[int], keeps: list[float], recipe: Recipe, filter_group: int = 1) -> list[dict]:
    data = load_digits_data()
    rows = []
    for seed in seeds:
        t0 = time.perf_counter()
        dense = train_dense(data, seed, recipe)
        dense_acc = accuracy(dense, data.x_test, data.y_test)
        print(f"seed {seed}: dense {dense_acc:.2f}% ({time.perf_counter() - t0:.0f}s)", flush=True)
        for keep in keeps:
            for method in METHODS:
                t0 = time.perf_counter()
                model = prune_digits(dense, data, method, 8, keep, seed, recipe, filter_group)
                report = sparsity_report(model, (data.x_test[:1],))
                row = {
                    "seed": seed,
                    "kernel_keep": keep,
                    "method": method,
                    "compression": report.conv3x3_compression,
                    "nonzero_3x3_weights": report.conv3x3_nonzeros,
                    "dense_3x3_weights": report.conv3x3_weights,
                    "dense_acc": dense_acc,
                    "acc": accuracy(model, data.x_test, data.y_test),
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(
                    f"  keep {keep:<5} {method:<8} {row['compression']:5.1f}x "
                    f"acc {row['acc']:.2f}% ({row['seconds']:.0f}s)",
                    flush=True,
                )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (keep, method)."""
    out = []
    for keep in sorted({r["kernel_keep"] for r in rows}, reverse=True):
        for method in METHODS:
            sel = [r for r in rows if r["kernel_keep"] == keep and r["method"] == method]
            n = len(sel)
            out.append(
                {
                    "kernel_keep": keep,
                    "method": method,
                    "compression": sum(r["compression"] for r in sel) / n,
                    "dense_acc": sum(r["dense_acc"] for r in sel) / n,
                    "acc": sum(r["acc"] for r in sel) / n,
                    "acc_min": min(r["acc"] for r in sel),
                    "seeds": n,
                }
            )
    return out


def write_markdown(path: Path, info: dict, summary: list[dict], rows: list[dict]) -> None:
    m = info["machine"]
    lines = [
        "# Digits: accuracy vs 3x3 conv sparsity (ADMM vs one-shot projection)"
        + (
            f", choices per group of {info['filter_group']} filters"
            if info.get("filter_group", 1) > 1
            else ""
        ),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch on {m['torch_threads']} thread), "
        f"Python {m['python']}, torch {m['torch']}. Total run time {info['seconds']:.0f} s.",
        "",
        f"Model: DigitsCNN width {info['width']} (three 3x3 convs + BN, FC), scikit-learn digits "
        "8x8, 1347 train / 450 test (1 test image = 0.22 points). Every 3x3 conv keeps 4 of 9 taps "
        "(8-pattern library); conv2/conv3 keep `kernel_keep` of their kernels (conv1 keeps all). "
        f"Seeds {info['seeds']}. Recipe: {info['recipe']}.",
        "",
        "Mean over seeds (min in brackets); accuracy is top-1 on the test split, in percent.",
        "",
        "| kernel keep | 3x3 weights | dense acc | ADMM acc | one-shot acc |",
        "|---|---|---|---|---|",
    ]
    for keep in sorted({s["kernel_keep"] for s in summary}, reverse=True):
        a = next(s for s in summary if s["kernel_keep"] == keep and s["method"] == "admm")
        o = next(s for s in summary if s["kernel_keep"] == keep and s["method"] == "oneshot")
        lines.append(
            f"| {keep} | {a['compression']:.1f}x fewer | {a['dense_acc']:.2f} | "
            f"{a['acc']:.2f} ({a['acc_min']:.2f}) | {o['acc']:.2f} ({o['acc_min']:.2f}) |"
        )
    lines += ["", "Per seed:", "", "| seed | keep | method | compression | dense acc | acc |"]
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['kernel_keep']} | {r['method']} | {r['compression']:.2f}x | "
            f"{r['dense_acc']:.2f} | {r['acc']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, summary: list[dict], rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        pts = sorted((s["compression"], s["acc"]) for s in summary if s["method"] == method)
        ax.plot(*zip(*pts, strict=True), "o-", color=color, label=f"{method} (mean)")
        each = [(r["compression"], r["acc"]) for r in rows if r["method"] == method]
        ax.scatter(*zip(*each, strict=True), color=color, alpha=0.35, s=12)
    dense = sum(s["dense_acc"] for s in summary) / len(summary)
    ax.axhline(dense, color="gray", ls="--", label="dense (mean)")
    ax.axhline(dense - 1, color="gray", ls=":", label="dense - 1 point")
    ax.set_xscale("log")
    ticks = sorted({round(s["compression"], 1) for s in summary})
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("3x3 conv weights: x fewer than dense")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: 8 patterns + connectivity pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.27, 0.12, 0.05, 0.02])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--filter-group", type=int, default=1)
    args = parser.parse_args()
    recipe = Recipe()
    t0 = time.perf_counter()
    rows = run(args.seeds, args.keeps, recipe, args.filter_group)
    summary = summarize(rows)
    info = {
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "width": list(WIDTH),
        "seeds": args.seeds,
        "recipe": asdict(recipe),
        "filter_group": args.filter_group,
        "summary": summary,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "prune_digits" + (f"_g{args.filter_group}" if args.filter_group > 1 else "")
    (args.out / f"{stem}.json").write_text(json.dumps(info, indent=1) + "\n")
    write_markdown(args.out / f"{stem}.md", info, summary, rows)
    plot(args.out / f"{stem}.png", summary, rows)
    print(f"wrote {args.out}/{stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
