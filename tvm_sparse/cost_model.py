"""Measure a cost table: the time of every kernel the block-format choice compares, on the CPU a
target names, as ``overhead_ms + ms_per_unit * units`` per kernel kind (a line through two sizes).

Kinds (``formats.block.CostTable``; units in ``UNITS``):

- ``fc_*``: batch-1 FC layers (the GEMV, BSR / BCR kernels at one row);
- ``linear_*``: linear layers over ``TOKENS`` rows (the dense GEMM, BSR / BCR over tokens);
- ``conv_*``: 1x1 convs (the dense GEMM, the pattern kernel on unstructured weights, BSR / BCR).

``measure_cost_table(target)`` runs them here (the target must run on this host: its ISA, e.g.
``x86-avx2`` on an AVX-512 machine) and ``write_cost_table`` stores the table where
``formats.block.load_cost_table`` finds it: ``<mcpu>.json``, or ``<family>.json`` (``avx512``,
``avx2``, ``neon``) for ``--family``. ``tvm-sparse costs`` is the command (a minute or two).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import tvm

from schedules.bsr_matmul import (
    Conv1x1Geometry,
    bsr_conv1x1_primfunc,
    bsr_matmul_primfunc,
    default_bsr_conv_config,
    default_bsr_matmul_config,
)
from schedules.dense_gemm import (
    conv1x1_gemm_config,
    conv1x1_gemm_primfunc,
    default_gemm_config,
    pack_columns,
    pack_rows,
)
from schedules.dense_linear import linear_gemm_primfunc
from schedules.dense_matmul import default_matmul_config, dense_matmul_primfunc, pack_weight
from schedules.epilogue import Epilogue
from schedules.pattern_conv2d import (
    ConvGeometry,
    default_config,
    pattern_conv2d_primfunc,
    tile_defaults,
)

from .errors import InputError
from .formats import BSRWeight, PatternWeight
from .formats.block import BCR_SHAPES, BLOCK_SHAPES, BCRWeight, cost_table_path
from .targets import (
    Target,
    cost_family,
    isa_name,
    num_cores,
    resolve_target,
    runs_here,
    vector_lanes,
    vector_registers,
)
from .testing import random_bsr

TOKENS = 128  # rows of the linear_* kernels (a Transformer's sequence)
KEEP = 0.2  # block density of the measured BSR weights
UNITS = {
    "fc_dense": "multiply-adds",
    "fc_bsr_RxC": "nonzero blocks x batch rows",
    "fc_bcr_RxC": "blocks x kept rows x kept columns x batch rows",
    "linear_dense": "multiply-adds",
    "linear_bsr_RxC": "nonzero blocks x rows",
    "linear_bcr_RxC": "blocks x kept rows x kept columns x rows",
    "conv_dense": "multiply-adds",
    "conv_pattern": "nonzero weights x output pixels",
    "conv_bsr_RxC": "nonzero blocks x output pixels x images",
    "conv_bcr_RxC": "blocks x kept rows x kept columns x output pixels x images",
}
BLOCK_KINDS = [(b, False) for b in BLOCK_SHAPES] + [(b, True) for b in BCR_SHAPES]
Say = Callable[[str], None]


def _time(func: tvm.tirx.PrimFunc, args: list[np.ndarray], target: Target) -> float:
    """Median ms of one standalone kernel call."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    rt = tvm.compile(mod, target=target).jit()
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    timer = rt.time_evaluator("main", tvm.cpu(), number=5, repeat=7, min_repeat_ms=40)
    return float(np.median(timer(*tensors).results) * 1e3)


def _fit(points: list[tuple[float, float]]) -> dict:
    """overhead_ms + ms_per_unit through the (units, ms) points (least squares, clamped >= 0)."""
    u = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    slope, icept = np.polyfit(u, t, 1) if len(points) > 1 else (t[0] / u[0], 0.0)
    if slope <= 0:
        slope, icept = float(t[-1] / u[-1]), 0.0
    return {"overhead_ms": max(0.0, float(icept)), "ms_per_unit": float(slope),
            "points": [[float(a), float(b)] for a, b in points]}  # fmt: skip


def block_column_row(rng: np.random.Generator, rows: int, cols: int, block) -> np.ndarray:
    """A random (rows, cols) matrix whose (r, c) blocks each keep half their rows and columns."""
    r, c = block
    mask = np.zeros((rows, cols), bool)
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            kept_r = i + rng.choice(min(r, rows - i), max(1, min(r, rows - i) // 2), False)
            kept_c = j + rng.choice(min(c, cols - j), max(1, min(c, cols - j) // 2), False)
            mask[np.ix_(kept_r, kept_c)] = True
    return (rng.standard_normal((rows, cols)) * mask).astype("float32")


class _Measure:
    """Times the kernel kinds on one target; ``entries`` collects the fitted lines."""

    def __init__(self, target: Target, say: Say) -> None:
        self.target, self.say = target, say
        self.lanes, self.regs = vector_lanes(target), vector_registers(target)
        self.cores = num_cores(target)
        self.rng = np.random.default_rng(0)
        self.entries: dict[str, dict] = {}

    def add(self, kind: str, points: list[tuple[float, float]]) -> None:
        self.entries[kind] = _fit(points)
        self.say(f"{kind}: {self.entries[kind]['ms_per_unit']:.3g} ms per unit")

    def dense_rows(self, kind: str, sizes: list[tuple[int, int, int]]) -> None:
        """The GEMV at batch 1 (fc_dense) or the GEMM over tokens (linear_dense)."""
        pts = []
        for m, k, n in sizes:
            x = self.rng.standard_normal((m, k)).astype("float32")
            w = self.rng.standard_normal((k, n)).astype("float32")
            if kind == "fc_dense":
                cfg = default_matmul_config(m, self.lanes)
                func = dense_matmul_primfunc(m, k, n, Epilogue(), cfg)
                packed = pack_weight(w, cfg)
            else:
                cfg = default_gemm_config(self.lanes, self.regs)
                func = linear_gemm_primfunc((m,), k, n, Epilogue(), cfg, self.cores)
                packed = pack_columns(w, cfg.width)
            args = [x, packed, np.zeros((m, n), "float32")]
            pts.append((m * k * n, _time(func, args, self.target)))
        self.add(kind, pts)

    def block_rows(self, op: str, sizes: list[tuple[int, int, int]]) -> None:
        """BSR / BCR kernels of an FC (op "fc", one row) or over tokens (op "linear")."""
        for block, bcr in BLOCK_KINDS:
            pts = []
            for m, k, n in sizes:
                cfg = default_bsr_matmul_config(m, self.cores)
                if bcr:
                    mat = block_column_row(self.rng, n, k, block)
                    packed = BCRWeight.from_dense(mat, block, cfg.shares)
                    kept, units = packed.kept, packed.num_blocks * packed.kept[0] * packed.kept[1]
                else:
                    mat = random_bsr(n, k, block, KEEP, self.rng)
                    packed = BSRWeight.from_dense(mat, block, cfg.shares)
                    kept, units = None, packed.num_blocks
                func = bsr_matmul_primfunc(
                    m, k, n, block, packed.num_blocks, Epilogue(), cfg, kept=kept
                )
                x = self.rng.standard_normal((m, k)).astype("float32")
                args = [x, *packed.kernel_args(), np.zeros((m, n), "float32")]
                pts.append((units * m, _time(func, args, self.target)))
            self.add(f"{op}_{'bcr' if bcr else 'bsr'}_{block[0]}x{block[1]}", pts)

    def conv(self, sizes: list[tuple[int, int, int]]) -> None:
        """1x1 convs (C, O, H=W): the dense GEMM, the pattern kernel, BSR / BCR."""
        pts_dense, pts_pattern = [], []
        for c, o, hw in sizes:
            x = self.rng.standard_normal((1, c, hw, hw)).astype("float32")
            out = np.zeros((1, o, hw, hw), "float32")
            w = self.rng.standard_normal((o, c)).astype("float32")
            cfg = conv1x1_gemm_config(self.lanes, self.regs, hw * hw, c)
            func = conv1x1_gemm_primfunc(1, c, o, hw * hw, Epilogue(), cfg, self.cores,
                                         out_dims=(hw, hw))  # fmt: skip
            pts_dense.append((o * c * hw * hw, _time(func, [x, pack_rows(w, cfg.rows), out],
                                                     self.target)))  # fmt: skip
            sparse = (w * (self.rng.random((o, c)) < KEEP)).reshape(o, c, 1, 1)
            geom = ConvGeometry(1, c, hw, hw, o, (1, 1), (1, 1), (0, 0, 0, 0))
            packed = PatternWeight.from_dense(sparse, num_shares=self.cores)
            pcfg = default_config(geom, filter_group=packed.filter_group,
                                  **tile_defaults(geom, self.regs, self.lanes))  # fmt: skip
            func = pattern_conv2d_primfunc(geom, packed.patterns, packed.num_kernels,
                                           packed.kernel_values.shape[1], Epilogue(), pcfg,
                                           filter_group=packed.filter_group)  # fmt: skip
            args = [x, packed.kernel_ptr, packed.kernel_channel, packed.kernel_values,
                    packed.filter_order, out]  # fmt: skip
            units = int((sparse != 0).sum()) * hw * hw
            pts_pattern.append((units, _time(func, args, self.target)))
        self.add("conv_dense", pts_dense)
        self.add("conv_pattern", pts_pattern)
        for block, bcr in BLOCK_KINDS:
            pts = []
            for c, o, hw in sizes:
                geom = Conv1x1Geometry(1, c, hw, hw, o)
                cfg = default_bsr_conv_config(geom, block[0], self.lanes, self.cores, bcr=bcr)
                if bcr:
                    packed = BCRWeight.from_dense(block_column_row(self.rng, o, c, block), block,
                                                  cfg.shares)  # fmt: skip
                    kept, units = packed.kept, packed.num_blocks * packed.kept[0] * packed.kept[1]
                else:
                    mat = random_bsr(o, c, block, KEEP, self.rng)
                    packed = BSRWeight.from_dense(mat, block, cfg.shares)
                    kept, units = None, packed.num_blocks
                func = bsr_conv1x1_primfunc(geom, block, packed.num_blocks, Epilogue(), cfg,
                                            kept=kept)  # fmt: skip
                x = self.rng.standard_normal((1, c, hw, hw)).astype("float32")
                args = [x, *packed.kernel_args(), np.zeros((1, o, hw, hw), "float32")]
                pts.append((units * hw * hw, _time(func, args, self.target)))
            self.add(f"conv_{'bcr' if bcr else 'bsr'}_{block[0]}x{block[1]}", pts)


def measure_cost_table(target: Target, say: Say | None = None) -> dict:
    """The table's entries for ``target`` (which must run on this host), with progress."""
    say = say or (lambda msg: print(f"[tvm-sparse] {msg}", file=sys.stderr, flush=True))
    m = _Measure(target, say)
    m.dense_rows("fc_dense", [(1, 1024, 1024), (1, 4096, 4096)])
    m.block_rows("fc", [(1, 1024, 1024), (1, 4096, 4096)])
    m.dense_rows("linear_dense", [(TOKENS, 512, 512), (TOKENS, 1024, 2048)])
    m.block_rows("linear", [(TOKENS, 512, 512), (TOKENS, 1024, 2048)])
    m.conv([(128, 128, 14), (256, 256, 28)])
    # A call's fixed cost does not depend on the block shape and two-point intercepts are mostly
    # noise: every block kernel of an op gets the median intercept, so the shape choice on small
    # layers follows the per-block costs.
    for op in ("fc", "linear", "conv"):
        kinds = [k for k in m.entries if k.startswith((f"{op}_bsr_", f"{op}_bcr_"))]
        common = float(np.median([m.entries[k]["overhead_ms"] for k in kinds]))
        for k in kinds:
            m.entries[k]["overhead_ms"] = common
    return m.entries


def write_cost_table(target: Target, entries: dict, name: str, machine: dict) -> str:
    """Store the table as ``<name>.json`` among the shipped ones; the path."""
    path = cost_table_path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {
        "cpu": name, "isa": isa_name(target), "threads": num_cores(target),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine, "units": UNITS, "entries": entries,
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def refresh_cost_table(target_name: str = "x86", family: bool = False) -> str:
    """Measure ``target_name``'s table here and store it under its ``mcpu`` (its ISA family's
    name with ``family``); the path. The target's code must run on this host."""
    from .benchmarking import machine_description

    target = resolve_target(target_name)
    if not runs_here(target):
        raise InputError(f"target {target_name}: its code does not run on this host")
    name = cost_family(target) if family else str(target.attrs.get("mcpu", "")) or "generic"
    return write_cost_table(target, measure_cost_table(target), name, machine_description())
