"""A/B of pattern conv kernel variants: each layer's kernel built per variant, timed directly
(no Relax VM) in one process, interleaved in tight loops, medians; numerics checked first.

    python benchmarks/ab_kernel.py --layers 2,4 --filter-group 4 \
        --variant default --variant prefetch=0 --variant rows=2,filters=2

``--layers``: indices into ``bench_conv_layers.LAYERS`` (default: all). A variant is ``default``
(the config ``tvm_sparse.compile`` picks on this host) or comma-separated overrides of its
``PatternConvConfig`` fields (``LanesConfig``'s with ``--lanes 16``: the filters-in-lanes
kernel, for ``--filter-group 16``); an UPPERCASE key sets that environment variable while the
variant is built (for generator switches under experiment). For kernel decisions this is far
steadier than the side-by-side tables: variants share the process, the inputs and the minute.

``--diagnose`` also times each variant's kernel on altered index data (results not checked):
``[input in L1]``, every kernel reading input channel 0 (the same FMAs, every input load an L1
hit: the gap to the real run is memory), and ``[no kernels]``, every kernel list empty (what
is left: staging, zeroing and storing the tiles, the loops and the parallel region).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

import numpy as np
import torch
import tvm
from bench_conv_layers import LAYERS, layer_case

from schedules.pattern_conv2d import ConvGeometry, default_config, tile_defaults
from schedules.pattern_conv2d_lanes import lanes_default_config
from tvm_sparse.benchmarking import markdown_table, time_interleaved, write_results
from tvm_sparse.formats import PatternWeight
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.testing import pattern_conv_kernel


def parse_variant(spec: str) -> dict[str, str]:
    """``"rows=2,PREFETCH_X=1"`` -> {"rows": "2", "PREFETCH_X": "1"}; ``default`` -> {}."""
    if spec == "default":
        return {}
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"variant {spec!r}: expected key=value[,key=value...] or 'default'")
    return dict(pairs)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the duration of the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def variant_config(base, overrides: dict[str, str]):
    """``base`` with the lowercase overrides applied (ints, or booleans for bool fields)."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in overrides.items():
        if key.isupper():
            continue
        if key not in fields:
            raise SystemExit(f"unknown config field {key!r}: one of {sorted(fields)}")
        current = getattr(base, key)
        changes[key] = value.lower() in ("1", "true") if isinstance(current, bool) else int(value)
    return dataclasses.replace(base, **changes)


def layer_runners(
    index: int,
    variants: list[str],
    filter_group: int,
    threads: int,
    check: bool = True,
    diagnose: bool = False,
    in_lanes: int = 0,
) -> dict[str, object]:
    """One runner per variant for layer ``LAYERS[index]``, each checked against PyTorch
    (unless ``check`` is off: diagnostic builds that skip part of the work); ``diagnose``:
    two more per variant on altered index data (see the module docstring); ``in_lanes``: the
    filters-in-lanes kernel with that many lanes."""
    _, o, c, size, stride = LAYERS[index]
    weight, x = layer_case(index, filter_group)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), None, stride, 1)
    geom = ConvGeometry(1, c, size, size, o, (3, 3), (stride, stride), (1, 1, 1, 1))
    sparse = PatternWeight.from_dense(weight, num_shares=2)
    group, per_filter = sparse.filter_group, sparse.num_kernels / o
    target = resolve_target("x86")
    lanes, registers = vector_lanes(target), vector_registers(target)
    runners = {}
    for spec in variants:
        overrides = parse_variant(spec)
        with environment({k: v for k, v in overrides.items() if k.isupper()}):
            if in_lanes:
                base = lanes_default_config(geom, registers, threads, per_filter)
            else:
                tiles = tile_defaults(geom, registers, lanes)
                base = default_config(geom, filter_group=group, shares=threads, **tiles)
            config = variant_config(base, overrides)
            run, packed = pattern_conv_kernel(geom, weight, config=config, lanes=in_lanes)
        out = run(x)
        if check:
            np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-3, atol=1e-3)
        xt = tvm.runtime.tensor(x)
        runners[spec] = lambda run=run, xt=xt, out=out: run(xt, out=out)
        if diagnose:
            ptr, chan = packed.kernel_ptr, packed.kernel_channel
            values = packed.lane_values(in_lanes) if in_lanes else packed.kernel_values
            rest = (values, packed.filter_order)
            altered = {
                "input in L1": (ptr, np.zeros_like(chan), *rest),
                "no kernels": (np.zeros_like(ptr), chan, *rest),
            }
            for label, arrays in altered.items():
                index_data = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
                runners[f"{spec} [{label}]"] = (
                    lambda run=run, xt=xt, out=out, index_data=index_data: run(
                        xt, out=out, index=index_data
                    )
                )
    return runners


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=",".join(str(i) for i in range(len(LAYERS))))
    ap.add_argument("--filter-group", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--lanes", type=int, default=0, help="the filters-in-lanes kernel (16)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--no-check", action="store_true", help="skip the numerics check (diagnostic variants)"
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also time each variant with every input load an L1 hit, and with no kernels",
    )
    ap.add_argument("--out", default="", help="write OUT.json / OUT.md")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    variants = args.variant or ["default"]
    rows, payload = [], {"filter_group": args.filter_group, "variants": variants, "layers": []}
    columns = variants
    for index in (int(i) for i in args.layers.split(",")):
        model, o, c, size, stride = LAYERS[index]
        runners = layer_runners(
            index,
            variants,
            args.filter_group,
            args.threads,
            not args.no_check,
            args.diagnose,
            args.lanes,
        )
        ms = time_interleaved(runners, rounds=args.rounds, warm=20, settle_s=0.0, window_s=0.02)
        name = f"{o}x{c}x3x3 s{stride} on {size}x{size}"
        columns = list(runners)
        base = ms[columns[0]]
        cells = [f"{ms[v]:.4f} ({base / ms[v]:.2f}x)" for v in columns]
        rows.append([model, name, *cells])
        payload["layers"].append({"model": model, "layer": name, "ms": ms})
        print(" | ".join(rows[-1]), flush=True)
    header = ["model", "layer", *(f"`{v}` ms (speed-up)" for v in columns)]
    table = markdown_table(header, rows)
    print(table)
    if args.out:
        note = f"Kernel variants, {args.threads} threads, filter group {args.filter_group}, "
        note += f"filters in {args.lanes} lanes, " if args.lanes else ""
        note += f"medians of {args.rounds} interleaved rounds, kernel called directly.\n\n"
        write_results(args.out, payload, note + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
