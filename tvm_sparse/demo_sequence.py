"""``tvm-sparse demo --model gru-bcr | bert-bsr``: a block-pruned sequence model compiled,
checked against PyTorch and timed against ONNX Runtime and PyTorch (interleaved medians)."""

from __future__ import annotations

import os
import time

import numpy as np

from .benchmarking import (
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_runner,
    quiet_third_party,
    time_interleaved,
    torch_runner,
    tvm_runner,
)
from .demo import TOLERANCE, round_progress, say
from .validation import check_int

SEQUENCE_DEMOS = ("gru-bcr", "bert-bsr")


def run_sequence_demo(name: str, rounds: int = 15, threads: int | None = None) -> dict:
    """Compile the built-in ``name`` (``SEQUENCE_DEMOS``), check it, print the latency table.
    Returns the medians (ms), the max error against PyTorch and the compile time."""
    if name not in SEQUENCE_DEMOS:
        raise ValueError(f"unknown sequence demo {name!r} (one of {', '.join(SEQUENCE_DEMOS)})")
    check_int("rounds", rounds)
    threads = threads or os.cpu_count() or 1
    with quiet_third_party():
        return _run(name, rounds, threads)


def _run(name: str, rounds: int, threads: int) -> dict:
    import onnx
    import torch

    import tvm_sparse

    from .sequence_models import encoder_model, recurrent_model

    net, x = recurrent_model("GRU") if name == "gru-bcr" else encoder_model()
    what = "2-layer GRU 39->1024, 100 steps, W_hh at 10 % of 8x8 blocks"
    if name == "bert-bsr":
        what = "4-layer encoder (768, 12 heads, ff 3072), 128 tokens, 10 % of 16x1 blocks"
    model_onnx = onnx_bytes(net, (x,))
    say(f"compiling {what} ...")
    start = time.perf_counter()
    source = onnx.load_from_string(model_onnx) if name == "gru-bcr" else net
    cm = tvm_sparse.compile(source, (x,), verbose=True)
    compile_s = time.perf_counter() - start
    print(cm.report())
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).numpy()
    err = float(np.max(np.abs(cm(x) - reference)))
    np.testing.assert_allclose(cm(x), reference, **TOLERANCE, err_msg="tvm-sparse vs PyTorch")
    runners = {
        "tvm-sparse": tvm_runner(cm, (x,)),
        "ONNX Runtime": ort_runner(model_onnx, (x,), threads),
        "PyTorch": torch_runner(net, (x,), threads),
    }
    say(f"timing {len(runners)} runtimes, {rounds} interleaved rounds, {threads} threads ...")
    ms = time_interleaved(runners, rounds=rounds, progress=round_progress(rounds))
    rows = [[k, f"{v:.2f}", f"{v / ms['tvm-sparse']:.2f}x"] for k, v in sorted(ms.items())]
    machine = machine_description()
    print(f"\n{what}; {machine['cpu']} ({machine.get('isa')}), {threads} threads")
    print(markdown_table(["runtime", "median ms", "time / tvm-sparse"], rows))
    print(f"max |tvm-sparse - PyTorch| {err:.1e}; compile {compile_s:.1f} s")
    return {"ms": ms, "max_abs_err": err, "compile_s": compile_s}
