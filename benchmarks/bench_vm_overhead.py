"""What the Relax VM's per-call tensor views cost a compiled model, uninstrumented.

Relax plans a model's intermediates into a few storage blocks (``StaticPlanBlockMemory``, in
TVM's build); per call the VM makes one tensor view into them per kernel output
(``vm.builtin.alloc_tensor``) and drops it after its last use (``vm.builtin.null_value``). The
profile's rows for those calls mostly show its instrument (a Python callback per call), so this
measures them apart:

1. a chain of ``--chain`` tiny kernels (16 floats + 1), each writing a new view, against the
   same chain in place (``call_tir_inplace``: no view): the difference per kernel is what a
   view costs, create and drop (medians of interleaved rounds);
2. per model (ResNet-18 / ResNet-50 / MobileNetV2, unpruned, 224x224): the views and storage
   blocks its executable makes per call, its run time, and views x that cost as a share of it.

    python benchmarks/bench_vm_overhead.py [--rounds 9] [--chain 400]

Writes benchmarks/results/vm_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
import tvm
from tvm import relax, te
from tvm.script import tirx as T

import tvm_sparse
from tvm_sparse.benchmarking import markdown_table, time_interleaved, tvm_runner, write_results
from tvm_sparse.models import mobilenet_v2, resnet18, resnet50

MODELS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
WIDTH = 16  # floats a chain kernel writes


@T.prim_func(check_well_formed=False)
def _add_one_in_place(a: T.Buffer((WIDTH,), "float32")):
    for i in range(WIDTH):
        with T.sblock("a"):
            vi = T.axis.spatial(WIDTH, i)
            a[vi] = a[vi] + T.float32(1)


def _add_one() -> tvm.tirx.PrimFunc:
    a = te.placeholder((WIDTH,), "float32", "a")
    return te.create_prim_func([a, te.compute((WIDTH,), lambda i: a[i] + 1.0, "b")])


def chain(length: int, in_place: bool) -> relax.VirtualMachine:
    """A VM running ``length`` + 1 chained kernels on a 16-float input: each on a new view, or
    (``in_place``) all but the first on the first one's output."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((WIDTH,), "float32"))
    out_of_place = bb.add_func(_add_one().without_attr("global_symbol"), "add_one")
    in_place_fn = bb.add_func(_add_one_in_place.without_attr("global_symbol"), "add_one_ip")
    ty = relax.TensorType((WIDTH,), "float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(out_of_place, [x], ty))
            for _ in range(length):
                if in_place:
                    y = bb.emit(relax.call_tir_inplace(in_place_fn, [y], [0], ty))
                else:
                    y = bb.emit(relax.call_tir(out_of_place, [y], ty))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())


def vm_calls(executable) -> dict[str, int]:
    """Calls per run of ``main`` by name (its straight-line VM code)."""
    main = executable.as_text().split("\n\n")[0]
    names = re.findall(r"call\s+(\S+)", main)
    return {name: names.count(name) for name in set(names)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chain", type=int, default=400)
    args = parser.parse_args()
    x16 = tvm.runtime.tensor(np.zeros(WIDTH, "float32"))
    vms = {kind: chain(args.chain, kind == "in place") for kind in ("views", "in place")}
    for kind, vm in vms.items():
        got = vm["main"](x16).numpy()[0]
        assert got == args.chain + 1, f"{kind}: {got}"
    runners = {kind: (lambda f=vm["main"]: f(x16)) for kind, vm in vms.items()}
    ms = time_interleaved(runners, rounds=args.rounds, settle_s=0.2)
    per_view_us = (ms["views"] - ms["in place"]) / args.chain * 1e3
    print(f"per view {per_view_us:.3f} us", file=sys.stderr)
    rows, results = [], []
    for name, build in MODELS.items():
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32")
        cm = tvm_sparse.compile(build().eval(), (x,))
        calls = vm_calls(cm.executable)
        run_ms = time_interleaved({name: tvm_runner(cm, (x,))}, rounds=args.rounds)[name]
        views = calls.get("vm.builtin.alloc_tensor", 0)
        share = views * per_view_us / 1e3 / run_ms
        results.append({
            "model": name, "run_ms": run_ms, "views": views,
            "storage_blocks": calls.get("vm.builtin.alloc_storage", 0),
            "kernels": sum(n for c, n in calls.items() if not c.startswith("vm.builtin.")),
            "views_ms": views * per_view_us / 1e3, "share": share,
        })  # fmt: skip
        r = results[-1]
        rows.append([name, r["kernels"], views, r["storage_blocks"], f"{run_ms:.3f}",
                     f"{r['views_ms'] * 1e3:.1f}", f"{share:.2%}"])  # fmt: skip
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    summary = (
        f"A view into the planned storage (`vm.builtin.alloc_tensor` and its drop), measured "
        f"on a chain of {args.chain} tiny kernels against the chain in place: "
        f"**{per_view_us:.3f} us** (medians of {args.rounds} interleaved rounds: "
        f"{ms['views']:.4f} vs {ms['in place']:.4f} ms). Per model: the views and storage "
        "blocks one call makes, and views x that cost against the run (unpruned, batch 1, "
        "224x224, the host's ISA)."
    )
    table = markdown_table(
        ["model", "kernels", "views", "storage blocks", "run ms", "views us", "share"], rows
    )
    write_results(
        "benchmarks/results/vm_overhead",
        {"rounds": args.rounds, "chain": args.chain, "chain_ms": ms,
         "per_view_us": per_view_us, "rows": results},
        f"# Tensor views per call (vm.builtin.alloc_tensor)\n\n{summary}\n\n{table}",
    )  # fmt: skip
    print(summary)


if __name__ == "__main__":
    main()
