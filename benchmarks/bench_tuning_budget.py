"""Is one tuning budget enough? Whole pattern-pruned ResNet-18 tuned with ``--trials`` (the
budget, timed), then the same work directory tuned on to ``--factor`` x that budget (a resumed
run: the first run's records count), and the builds of both budgets timed whole against the
default build and ONNX Runtime, interleaved.

    python benchmarks/bench_tuning_budget.py [--trials 300] [--factor 4] [--rounds 11]

Writes benchmarks/results/tuning_budget.{json,md} and tuning_budget_curve.png (estimated kernel
time vs trials over both runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch
from bench_tuning import assert_matches_torch, model_curve, plot_curve

import tvm_sparse
from tvm_sparse.benchmarking import (
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_runner,
    time_interleaved,
    tvm_runner,
    write_results,
)
from tvm_sparse.models import resnet18
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_


def tune_timed(net, x, work_dir: str, trials: int, quiet: bool) -> dict:
    """Tune (resuming ``work_dir``) up to ``trials``; wall seconds and the records' count."""
    t0 = time.perf_counter()
    result = tvm_sparse.tune(net, (x,), trials=trials, work_dir=work_dir, progress=not quiet)
    return {
        "seconds": time.perf_counter() - t0,
        "trials": sum(t.trials for t in result.tasks),
        "kept": result.model_check.kept if result.model_check else None,
        "tasks": [vars(t) for t in result.tasks],
    }


def render(payload: dict) -> str:
    ms, budget, more = payload["ms"], payload["budget"], payload["more"]
    factor = payload["factor"]
    text = (
        f"# Tuning budget: pattern-pruned ResNet-18\n\n{payload['threads']} threads, medians of "
        f"{payload['rounds']} interleaved rounds. The budget run tuned {budget['trials']} "
        f"trials in {budget['seconds'] / 60:.1f} min (with verification and the in-model "
        f"check); the same work directory then tuned on to {factor}x the budget "
        f"({more['trials']} trials, {more['seconds'] / 60:.1f} min more).\n\n"
    )
    rows = [
        [name, f"{ms[key]:.2f}", f"{ms['onnxruntime'] / ms[key]:.2f}x",
         f"{ms[key] / ms['tuned_more']:.3f}"]
        for name, key in (("default", "default"), (f"tuned, budget ({budget['trials']} trials)",
                          "tuned_budget"), (f"tuned, {factor}x budget ({more['trials']} trials)",
                          "tuned_more"), ("ONNX Runtime (dense)", "onnxruntime"))
    ]  # fmt: skip
    text += markdown_table(["build", "ms", "vs ORT", f"ms / {factor}x-budget ms"], rows)
    curve, at = payload["curve"], payload["budget_point"]
    text += (
        f"\n\nEstimated kernel time (sum of calls x best per task): {curve[0][1]:.2f} ms "
        f"untuned, {curve[at - 1][1]:.2f} ms at the budget ({at} measured candidates), "
        f"{curve[-1][1]:.2f} ms at {curve[-1][0]}. Curve: `tuning_budget_curve.png`."
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--work-dir", default="/tmp/tvm-sparse-bench-budget")
    parser.add_argument("--out", default="benchmarks/results/tuning_budget")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.manual_seed(0)
    net = randomize_batchnorm_(pattern_prune_model_(resnet18())).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
    shutil.rmtree(args.work_dir, ignore_errors=True)
    work, snapshot = (os.path.join(args.work_dir, d) for d in ("tuned", "budget"))
    budget = tune_timed(net, x, work, args.trials, args.quiet)
    shutil.copytree(work, snapshot)  # the budget's records (and its in-model check)
    budget_point = len(model_curve(os.path.join(work, "curve.jsonl"), budget["tasks"]))
    more = tune_timed(net, x, work, args.factor * args.trials, args.quiet)
    builds = {
        "default": tvm_sparse.compile(net, (x,)),
        "tuned_budget": tvm_sparse.compile(net, (x,), tuning=snapshot),
        "tuned_more": tvm_sparse.compile(net, (x,), tuning=work),
    }
    assert_matches_torch(net, x, builds.values())
    runners = {name: tvm_runner(cm, (x,)) for name, cm in builds.items()}
    runners["onnxruntime"] = ort_runner(onnx_bytes(net, (x,)), (x,), threads)
    ms = time_interleaved(runners, rounds=args.rounds, warm=3, inner=5)
    curve = model_curve(os.path.join(work, "curve.jsonl"), more["tasks"])
    plot_curve(curve, args.out + "_curve.png", "ResNet-18")
    payload = {"ms": ms, "budget": budget, "more": more, "factor": args.factor,
               "budget_point": budget_point, "curve": curve, "threads": threads,
               "rounds": args.rounds, "machine": machine_description()}  # fmt: skip
    text = render(payload)
    write_results(args.out, payload, text)
    print(text)


if __name__ == "__main__":
    main()
