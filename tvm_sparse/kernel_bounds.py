"""What bounds the pattern-conv kernel on a layer: a static count, from the kernel generator's
own tiling (``schedules.pattern_conv2d.tiling`` / ``tap_offset``) and the packed weight, of

- the vector FMAs of each kernel (one input channel's taps) per tile, against the load-port work
  they need: input vectors (distinct addresses: taps of neighbouring output rows share loads),
  those of them split across two cache lines (a 16-lane load at a tap column shift), weight
  broadcasts, the channel index and the software prefetches;
- the vector lanes computed past the output's edges (row ends, the last row tile);
- the imbalance of the per-core shares (each a contiguous run of jobs).

Model (an x86 core with AVX-512, as the benchmarks' machine): per cycle 2 vector FMAs and 2
loads, a split load costing two; an accumulator takes one FMA per 4 cycles (latency), so a
kernel's taps, added in turn, take at least 4 cycles each. The in-core ceiling is the FMA share
of the busiest of those limits, times the lanes used, over the imbalance: the fraction of the
FMA peak the layer's useful FLOPs can reach with every load hitting L1. The rest (L1 misses,
staging the input, storing the output) comes on top. ``applied_configs`` gives the configs
``compile`` builds (tuned or default) to feed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from schedules.pattern_conv2d import (
    ConvGeometry,
    PatternConvConfig,
    Tiling,
    knobs_config,
    tap_offset,
    tiling,
)
from schedules.tunable import kernel_name, knobs_of, tunable_block
from tvm_sparse.compiler import lower, prepare
from tvm_sparse.formats.pattern import PatternWeight
from tvm_sparse.targets import resolve_target
from tvm_sparse.tuning import lowered_with_records
from tvm_sparse.tuning.model_check import load_check, workload_key

LINE = 16  # floats per cache line
LANES = 16  # fp32 lanes of the widest vector (AVX-512): 8-lane FMAs run at half the peak
FMA_LATENCY = 4  # cycles: an accumulator takes one FMA per 4 cycles (a kernel's taps in turn)


def kernel_bounds(geom: ConvGeometry, cfg: PatternConvConfig, packed: PatternWeight) -> dict:
    """Per-layer counts and the in-core ceiling (the channel-blocked loop order is counted as
    the registers-only one: same kernels per tile, its partial sums not counted)."""
    tl = tiling(geom, cfg)
    vec, group, kw = cfg.vector, cfg.filters, geom.kernel[1]
    vectors = tl.cols // vec
    accumulators = cfg.rows * vectors * group
    # Weight broadcasts, the channel index, and (prefetching) the prefetched kernel's channel
    # and its rows' lines: per kernel, beside the input vectors.
    prefetch = 1 + _prefetch_lines(geom, cfg, tl) if cfg.prefetch else 0
    per_pattern = []  # (FMAs, loads, split loads, load-port slots, cycles) per kernel, one tile
    for pattern in packed.patterns:
        taps = [tap_offset(geom, tl, cfg.shifted, *divmod(t, kw)) for t in pattern]
        loads = {
            (plane, r * tl.row_step + dy, xo * vec + dx)
            for plane, dy, dx in taps
            for r in range(cfg.rows)
            for xo in range(vectors)
        }
        fma = len(pattern) * accumulators
        split = len(loads) * _split_share(loads, tl, vec)
        slots = len(loads) + split + len(pattern) * group + 1 + prefetch
        cycles = max(fma / 2, slots / 2, len(pattern) * FMA_LATENCY)
        per_pattern.append((fma, len(loads), split, slots, cycles))
    counts = np.diff(packed.kernel_ptr, axis=1)[::group]  # kernels per job and pattern
    fma, loads, split, slots, cycles = (counts @ np.array(per_pattern)).T  # per job
    total_fma = float(fma.sum())
    computed = tl.tiles * cfg.rows * tl.col_tiles * tl.cols
    lanes_used = geom.out_height * geom.out_width / computed * vec / LANES
    # Jobs run tile by tile, column tile, then filter job (``pattern_conv2d_primfunc``).
    imbalance = _imbalance(np.tile(cycles, tl.tiles * tl.col_tiles), cfg.shares)
    in_core = total_fma / 2 / float(cycles.sum())
    return {
        "fma_per_kernel": total_fma / float(counts.sum()),
        "loads_per_fma": float(loads.sum()) / total_fma,
        "load_slots_per_fma": float(slots.sum()) / total_fma,
        "split_share": float(split.sum() / loads.sum()),
        "lanes_used": lanes_used,
        "imbalance": imbalance,
        "vectors": vectors,  # per tile row
        "accumulators": accumulators,
        "bound": _bound(total_fma / 2, float(slots.sum()) / 2, float(cycles.sum())),
        "ceiling": in_core * lanes_used / imbalance,
    }


def _bound(fma: float, load: float, cycles: float) -> str:
    """Which limit the in-core cycles come from."""
    if cycles <= max(fma, load) * 1.02:
        return "load ports" if load > fma else "FMA"
    return "FMA latency"


def _split_share(loads: set, tl: Tiling, vec: int) -> float:
    """Share of the loads that cross a cache line, over the row tiles and column tiles (rows
    of a plane start where the previous ended; planes start on a line)."""
    split = total = 0
    for tile in range(tl.tiles):
        for ct in range(tl.col_tiles):
            for _plane, row, col in loads:
                offset = (tile * tl.tile_row + row) * tl.row_w + ct * tl.cols + col
                split += offset % LINE + vec > LINE
                total += 1
    return split / max(total, 1)


def _prefetch_lines(geom: ConvGeometry, cfg: PatternConvConfig, tl: Tiling) -> int:
    """Prefetches issued per kernel (``prefetch_rows``)."""
    span = tl.cols + (0 if cfg.shifted else (geom.kernel[1] - 1) // geom.stride[1])
    if span >= tl.row_w:
        per_plane = math.ceil(tl.rows_in * tl.row_w / LINE) + 1
    else:
        per_plane = tl.rows_in * (math.ceil(span / LINE) + 1)
    return tl.planes * per_plane


def _imbalance(job_cost: Sequence[float], shares: int) -> float:
    """Busiest share over the mean, jobs split in contiguous runs of ceil(jobs / shares)."""
    per = math.ceil(len(job_cost) / shares)
    loads = [float(np.sum(job_cost[i : i + per])) for i in range(0, len(job_cost), per)]
    return max(loads) / (sum(loads) / shares)


def applied_configs(net, x: np.ndarray, work_dir: str | None) -> dict[str, PatternConvConfig]:
    """The config ``compile`` builds each pattern-conv kernel of ``net`` with (by kernel name):
    its tuned knobs from ``work_dir`` (unless the in-model check put it back at its default),
    else the default."""
    tgt = resolve_target("x86")
    prepared = prepare(net, (x,), tgt, True)[0]
    if work_dir is None:
        lowered = applied = lower(prepared, tgt)
        reverted: set[str] = set()
    else:
        lowered, applied, _ = lowered_with_records(prepared, tgt, work_dir)
        check = load_check(work_dir, prepared, tgt)
        reverted = set(check.reverted()) if check else set()
    configs = {}
    for gv, func in lowered.functions.items():
        block = tunable_block(func)
        if block is not None and kernel_name(block) == "pattern_conv2d":
            chosen = func if workload_key(func) in reverted else applied[gv]
            configs[gv.name_hint] = knobs_config(knobs_of(tunable_block(chosen)))
    return configs
