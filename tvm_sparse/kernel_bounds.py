"""What bounds the pattern-conv kernel on a layer: a static count, from the kernel generator's
own tiling (``schedules.pattern_conv2d.tiling`` / ``tap_offset``) and the packed weight, of

- the vector FMAs of each kernel (one input channel's taps) per tile, against the load-port work
  they need: input vectors (distinct addresses: taps of neighbouring output rows share loads),
  those of them split across two cache lines (a 16-lane load at a tap column shift), weight
  broadcasts, the channel index and the software prefetches;
- the vector lanes computed past the output's edges (row ends, the last row tile);
- the imbalance of the per-core shares (each a contiguous run of jobs).

Model (an x86 core with two 512-bit FMA units, as the benchmarks' machine, a Sapphire Rapids
class Xeon): per cycle 2 vector FMAs (8-lane ones at half the lanes) and 3 load slots (a 64-byte
load takes 1.5, a smaller one or a broadcast 1, a load split across cache lines twice its
cost); an accumulator takes one FMA per 4 cycles (latency), so a kernel's taps, added in turn,
take at least 4 cycles each; a segmented vector made in registers (a lane shift) takes an FMA
slot. Vectors past the output's last column of a one-column-tile layout
are not counted (never stored, LLVM drops them). The in-core ceiling is the FMA share
of the busiest of those limits, times the lanes used, over the imbalance: the fraction of the
FMA peak the layer's useful FLOPs can reach with every load hitting L1. The rest (L1 misses,
staging the input, storing the output) comes on top. ``applied_configs`` gives the configs
``compile`` builds (tuned or default) to feed it; ``lanes_kernel_bounds`` counts the same for the
filters-in-lanes kernel.
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
    prefetch_lines,
    segmented_vector,
    tap_offset,
    tiling,
)
from schedules.pattern_conv2d_lanes import LanesConfig, lines_read, share_split, tile_readers
from schedules.tunable import kernel_name, knobs_of, tunable_block
from tvm_sparse.formats.pattern import PatternWeight
from tvm_sparse.pipeline import lower, prepare
from tvm_sparse.targets import resolve_target
from tvm_sparse.tuning.apply import lowered_with_records
from tvm_sparse.tuning.model_check_store import load_check, workload_key

LINE = 16  # floats per cache line
LANES = 16  # fp32 lanes of the widest vector (AVX-512): 8-lane FMAs run at half the peak
FMA_PER_CYCLE = 2  # vector FMAs per core and cycle
LOAD_SLOTS_PER_CYCLE = 3  # load ports: 3 loads of <= 32 bytes per cycle, or 2 of 64 bytes
WIDE_LOAD = 1.5  # slots a 64-byte load takes; a load split across two lines takes twice its own
FMA_LATENCY = 4  # cycles: an accumulator takes one FMA per 4 cycles (a kernel's taps in turn)


def kernel_bounds(geom: ConvGeometry, cfg: PatternConvConfig, packed: PatternWeight) -> dict:
    """Per-layer counts and the in-core ceiling (the channel-blocked loop order is counted as
    the registers-only one: same kernels per tile, its partial sums not counted)."""
    tl = tiling(geom, cfg)
    vec, group, kw = cfg.vector, cfg.filters, geom.kernel[1]
    vectors = tl.cols // vec
    if tl.col_tiles == 1 and tl.fold == 1:
        # One column tile: the vectors past the output's last column are never stored, and
        # LLVM drops their loads and FMAs.
        vectors = min(vectors, math.ceil(geom.out_width / vec))
    accumulators = cfg.rows * vectors * group
    # Weight broadcasts, the channel index, and (prefetching) the prefetched kernel's channel
    # and its rows' lines: per kernel, beside the input vectors.
    prefetch = 1 + tl.planes * len(prefetch_lines(geom, cfg, tl)[0]) if cfg.prefetch else 0
    per_pattern = []  # (FMAs, loads, split loads, load slots, shuffles, cycles) per kernel, tile
    for pattern in packed.patterns:
        taps = [tap_offset(geom, tl, cfg.shifted, *divmod(t, kw)) for t in pattern]
        reads = {
            (plane, r * tl.row_step + dy, xo + dx if tl.segment else xo * vec + dx)
            for plane, dy, dx in taps
            for r in range(cfg.rows)
            for xo in range(vectors)
        }
        if tl.segment:  # vectors past the S staged: a lane shift (one per read) of a staged one
            made = [(p, row, *segmented_vector(tl, vec, x)[:2]) for p, row, x in reads]
            shuffles = sum(1 for *_, move in made if move)
            loads = {(p, row, at * vec) for p, row, at, _ in made}
        else:
            shuffles, loads = 0, reads
        fma = len(pattern) * accumulators
        split = len(loads) * _split_share(loads, tl, vec)
        load_cost = WIDE_LOAD if vec * 4 > 32 else 1.0
        slots = (len(loads) + split) * load_cost + len(pattern) * group + 1 + prefetch
        # (Shuffles take an FMA port: port 5 on Intel cores.)
        cycles = max(
            (fma + shuffles) / FMA_PER_CYCLE,
            slots / LOAD_SLOTS_PER_CYCLE,
            len(pattern) * FMA_LATENCY,
        )
        per_pattern.append((fma, len(loads), split, slots, shuffles, cycles))
    counts = np.diff(packed.kernel_ptr, axis=1)[::group]  # kernels per job and pattern
    fma, loads, split, slots, shuffles, cycles = (counts @ np.array(per_pattern)).T  # per job
    total_fma = float(fma.sum())
    computed = tl.tiles * cfg.rows * tl.col_tiles * vectors * vec
    lanes_used = geom.out_height * geom.out_width / computed * vec / LANES
    # Jobs run tile by tile, column tile, then filter job (``pattern_conv2d_primfunc``).
    imbalance = _imbalance(np.tile(cycles, tl.tiles * tl.col_tiles), cfg.shares)
    fma_cycles, load_cycles = total_fma / FMA_PER_CYCLE, float(slots.sum()) / LOAD_SLOTS_PER_CYCLE
    in_core = fma_cycles / float(cycles.sum())
    return {
        "fma_per_kernel": total_fma / float(counts.sum()),
        "loads_per_fma": float(loads.sum()) / total_fma,
        "load_vs_fma": load_cycles / fma_cycles,  # load-port time over FMA-port time
        "split_share": float(split.sum() / loads.sum()),
        "lanes_used": lanes_used,
        "imbalance": imbalance,
        "vectors": vectors,  # per tile row
        "fold": tl.fold,
        "accumulators": accumulators,
        "shuffles_per_fma": float(shuffles.sum()) / total_fma,
        "bound": _bound(fma_cycles, float(shuffles.sum()), load_cycles, float(cycles.sum())),
        "ceiling": in_core * lanes_used / imbalance,
    }


def lanes_kernel_bounds(
    geom: ConvGeometry, cfg: LanesConfig, packed: PatternWeight, lanes: int = LANES
) -> dict:
    """The same counts for the filters-in-lanes kernel (``schedules.pattern_conv2d_lanes``):
    per kernel and tile, rows x cols x taps FMAs (a group's filters in the lanes) against one
    broadcast per distinct input pixel the tile reads, a 64-byte weight vector per tap, the
    channel index and the prefetches (the in-place path's: rows ``width`` apart). Lanes are
    wasted only by tiles past the map's last column (rows past the map are skipped); no lane
    shifts, no split loads."""
    (kh, kw), (sh, sw) = geom.kernel, geom.stride
    rows, cols = cfg.rows, cfg.cols
    reach, span = (rows - 1) * sh + kh, (cols - 1) * sw + kw
    prefetch = 1 + len(lines_read(reach, span, geom.width, ())) if cfg.prefetch else 0
    per_pattern = []  # (FMAs, loads, split loads, load slots, shuffles, cycles) per kernel, tile
    for pattern, pixels in zip(
        packed.patterns, tile_readers(geom, packed.patterns, rows, cols), strict=True
    ):
        fma = len(pattern) * rows * cols
        slots = len(pixels) + len(pattern) * WIDE_LOAD + 1 + prefetch
        cycles = max(fma / FMA_PER_CYCLE, slots / LOAD_SLOTS_PER_CYCLE, len(pattern) * FMA_LATENCY)
        per_pattern.append((fma, len(pixels), 0, slots, 0, cycles))
    counts = np.diff(packed.kernel_ptr, axis=1)[::lanes]  # kernels per group and pattern
    fma, loads, _, slots, _, cycles = (counts @ np.array(per_pattern)).T  # per group
    tiles_y, tiles_x = math.ceil(geom.out_height / rows), math.ceil(geom.out_width / cols)
    # Jobs run row tile, group, column tile (``pattern_conv2d_lanes_primfunc``), each core
    # the groups of its share where the groups split (``share_split``), else a run of them.
    group_shares, _ = share_split(geom, len(cycles), tiles_y * tiles_x, cfg.shares)
    if group_shares > 1:
        jobs = cycles.reshape(group_shares, -1).sum(1)  # one per core
    else:
        jobs = np.tile(np.repeat(cycles, tiles_x), tiles_y)
    total_fma = float(fma.sum())
    fma_cycles, load_cycles = total_fma / FMA_PER_CYCLE, float(slots.sum()) / LOAD_SLOTS_PER_CYCLE
    in_core = fma_cycles / float(cycles.sum())
    lanes_used = geom.out_width / (tiles_x * cols)
    imbalance = _imbalance(jobs, group_shares if group_shares > 1 else cfg.shares)
    return {
        "fma_per_kernel": total_fma / float(counts.sum()),
        "loads_per_fma": float(loads.sum()) / total_fma,
        "load_vs_fma": load_cycles / fma_cycles,
        "split_share": 0.0,
        "lanes_used": lanes_used,
        "imbalance": imbalance,
        "vectors": cols,  # per tile row: one per output pixel
        "fold": 1,
        "accumulators": rows * cols,
        "shuffles_per_fma": 0.0,
        "bound": _bound(fma_cycles, 0.0, load_cycles, float(cycles.sum())),
        "ceiling": in_core * lanes_used / imbalance,
    }


def _bound(fma: float, shuffles: float, load: float, cycles: float) -> str:
    """Which limit the in-core cycles come from (``fma``, ``load``: cycles of those ports'
    work; ``shuffles``: lane shifts, which take FMA-port slots)."""
    ports = fma + shuffles / FMA_PER_CYCLE
    if cycles <= max(ports, load) * 1.02:
        if load > ports:
            return "load ports"
        return "FMA + shifts" if shuffles else "FMA"
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


def _imbalance(job_cost: Sequence[float], shares: int) -> float:
    """Busiest share over the mean, jobs split in contiguous runs of ceil(jobs / shares)."""
    per = math.ceil(len(job_cost) / shares)
    loads = [float(np.sum(job_cost[i : i + per])) for i in range(0, len(job_cost), per)]
    return max(loads) / (sum(loads) / shares)


def applied_configs(
    net, x: np.ndarray, work_dir: str | None
) -> dict[str, PatternConvConfig | LanesConfig]:
    """The config ``compile`` builds each pattern-conv kernel of ``net`` with (by kernel name):
    its tuned knobs from ``work_dir`` (unless the in-model check put it back at its default),
    else the default; a ``LanesConfig`` for the filters-in-lanes kernel."""
    tgt = resolve_target("x86")
    prepared = prepare(net, (x,), tgt, True)[0]
    if work_dir is None:
        lowered = applied = lower(prepared, tgt)
        reverted: set[str] = set()
    else:
        lowered, applied, _ = lowered_with_records(prepared, tgt, work_dir)
        check = load_check(work_dir, prepared, tgt)
        reverted = set(check.reverted()) if check else set()
    config_of = {"pattern_conv2d": knobs_config, "pattern_conv2d_lanes": lambda k: LanesConfig(**k)}
    configs = {}
    for gv, func in lowered.functions.items():
        block = tunable_block(func)
        if block is None or kernel_name(block) not in config_of:
            continue
        chosen = func if workload_key(func) in reverted else applied[gv]
        configs[gv.name_hint] = config_of[kernel_name(block)](knobs_of(tunable_block(chosen)))
    return configs
