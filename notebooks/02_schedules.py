# %% [markdown]
# # 02 · Schedules, explored
#
# The pattern conv kernel is generated per layer by
# `schedules.pattern_conv2d.pattern_conv2d_primfunc` (TIR built with TVM's IRBuilder). Its
# schedule knobs are `PatternConvConfig`:
#
# | knob | meaning |
# |---|---|
# | `rows` | output rows per tile (the tile `rows x cols` lives in vector registers) |
# | `cols` | output columns per tile, a multiple of `vector` (0: the whole row) |
# | `vector` | fp32 lanes along the output width (8: AVX2 / half AVX-512, 16: AVX-512, 4: NEON) |
# | `filters` | filters computed together, sharing each input vector load (dense convs only) |
# | `shifted` | stage the input pre-shifted per tap column (aligned loads, `kw` x staging memory) |
# | `segmented` | lane l computes column `S * l + j` (S vectors per row), input staged to match |
#
# This notebook prints the TIR of a small layer, then compiles and times one layer over a grid of
# knobs, and shows where the configuration the compiler picks (`default_config` +
# `tile_defaults`) lands.

# %%
# %matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    default_config,
    pattern_conv2d_primfunc,
    tile_defaults,
)
from tvm_sparse.benchmarking import machine_description
from tvm_sparse.formats import PatternWeight
from tvm_sparse.kernel_bounds import kernel_bounds
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.testing import notebook_quick, pattern_conv_kernel, random_pattern_weight

QUICK = notebook_quick()  # TVM_SPARSE_NB_QUICK=1 (set by the tests): smaller budgets
TARGET = resolve_target("x86")
LANES, REGISTERS = vector_lanes(TARGET), vector_registers(TARGET)
print(f"target {TARGET}")
print(
    f"{machine_description()['cpu']}, {os.cpu_count()} cores: "
    f"{LANES} fp32 lanes, {REGISTERS} vector registers"
)

# %% [markdown]
# ## The TIR of a small layer
#
# 8 -> 8 channels on 8x8, 2 patterns, a fused bias + ReLU epilogue and a 2-row tile, so that the
# printout stays short. Read it top down: one parallel loop over shares (one per core), each a
# contiguous run of the (row tile, column tile, filter) jobs. A share first stages the zero-padded
# input rows its own tiles read (one copy per stride phase, every channel), then runs its jobs.
# Each job zeroes one small accumulator buffer per output row of its tile (small enough to stay
# on the stack, where LLVM keeps it in registers), then runs one loop per pattern over that
# filter's run of kernels (`kernel_ptr[i, p] : kernel_ptr[i, p + 1]`), loading the kernel's
# channel and its 4 weights once and applying them with the pattern's tap offsets `(dy, dx)`
# written in as constants, for every row of the tile; finally the epilogue (bias, ReLU) writes
# the tile to filter `filter_order[i]`.

# %%
small_geom = ConvGeometry(
    batch=1,
    in_channels=8,
    height=8,
    width=8,
    out_channels=8,
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1, 1, 1),
)
small = PatternWeight.from_dense(random_pattern_weight(8, 8, num_patterns=2, kernel_keep=0.5))
small_cfg = PatternConvConfig(rows=2, vector=8)
print(f"patterns {small.patterns}, {small.num_kernels} kernels, config {small_cfg}\n")
func = pattern_conv2d_primfunc(
    small_geom,
    small.patterns,
    small.num_kernels,
    small.kernel_values.shape[1],
    Epilogue(bias=True, activation="relu"),
    small_cfg,
)
print(func.script())

# %% [markdown]
# ## A layer to time
#
# A ResNet-18-like layer: 64 -> 64 channels on 28x28 (stride 1, padding 1), pattern-pruned
# (8 patterns of 4 taps, 28 % of kernels kept). `build_and_time` compiles the kernel for one
# config on its own (`tvm_sparse.testing.pattern_conv_kernel`, as `tests/kernel_utils.py` does),
# checks it against PyTorch, and times it with TVM's `time_evaluator` (median over `repeat`
# measurements of `number` runs each).
# `dense=True` packs every kernel with the full 3x3 pattern (zeros included): the dense kernel the
# compiler uses for convs that are not sparse enough, where `filters` applies.

# %%
GEOM = ConvGeometry(
    batch=1,
    in_channels=64,
    height=28,
    width=28,
    out_channels=64,
    kernel=(3, 3),
    stride=(1, 1),
    padding=(1, 1, 1, 1),
)
weight = random_pattern_weight(64, 64, num_patterns=8, kernel_keep=0.28, seed=0)
x = np.random.default_rng(0).standard_normal((1, 64, 28, 28)).astype("float32")
reference = torch.nn.functional.conv2d(
    torch.from_numpy(x), torch.from_numpy(weight), padding=1
).numpy()
NUMBER, REPEAT = (10, 3) if QUICK else (40, 7)
packings = {
    dense: PatternWeight.from_dense(weight, num_shares=os.cpu_count(), keep_zeros=dense)
    for dense in (False, True)
}


def build_and_time(cfg: PatternConvConfig, dense: bool = False) -> float:
    # Compile the layer's kernel with `cfg`, check it against PyTorch; median ms per call.
    run, _ = pattern_conv_kernel(
        GEOM, weight, config=cfg, keep_zeros=dense, target=TARGET, num_shares=os.cpu_count()
    )
    np.testing.assert_allclose(run(x).numpy(), reference, rtol=1e-4, atol=1e-4)
    return float(np.median(run.time(x, number=NUMBER, repeat=REPEAT)) * 1e3)


sparse_default = default_config(GEOM, **tile_defaults(GEOM, REGISTERS, LANES))
dense_default = default_config(
    GEOM, filter_group=packings[True].filter_group, **tile_defaults(GEOM, REGISTERS, LANES)
)
useful = 2 * GEOM.out_height * GEOM.out_width * packings[False].num_taps
print(f"sparse default: {sparse_default}")
print(f"dense default:  {dense_default}")
print(f"useful work: {useful / 1e6:.1f} MFLOP (dense: {2 * 28 * 28 * 64 * 64 * 9 / 1e6:.1f} MFLOP)")

# %% [markdown]
# ## Sweep: sparse kernel, `rows` x `vector` x staging layout
#
# `cols` stays 0 (the whole 28-wide row), which is also what the default picks at this width.
# The layouts: `phase` (one staged copy per stride phase, loads at a tap's column shift
# unaligned), `shifted`, `segmented` (S = 2 vectors per row at 16 lanes, 4 at 8; the default
# picks it from 4 up).

# %%
ROWS = [1, 4, 14] if QUICK else [1, 2, 4, 7, 14]
LAYOUTS = {"phase": {}, "shifted": {"shifted": True}, "segmented": {"segmented": True}}


def layout(cfg: PatternConvConfig) -> str:
    return "shifted" if cfg.shifted else "segmented" if cfg.segmented else "phase"


sparse_ms = {}
for vector in (8, 16):
    for knobs in LAYOUTS.values():
        for rows in ROWS:
            cfg = PatternConvConfig(rows=rows, vector=vector, **knobs)
            sparse_ms[cfg] = build_and_time(cfg)
if sparse_default not in sparse_ms:
    sparse_ms[sparse_default] = build_and_time(sparse_default)
best = min(sparse_ms, key=sparse_ms.get)
print(f"{'rows':>4} {'vector':>6} {'layout':>9} {'ms':>8} {'GFLOP/s':>8}")
for cfg, ms in sorted(sparse_ms.items(), key=lambda kv: kv[1]):
    mark = "  <- default" if cfg == sparse_default else ""
    print(
        f"{cfg.rows:>4} {cfg.vector:>6} {layout(cfg):>9} {ms:8.4f} {useful / ms / 1e6:8.1f}{mark}"
    )

# %% [markdown]
# ## What bounds each point: the static model
#
# `tvm_sparse.kernel_bounds` counts, from the generator's own tiling and the packed weight, each
# kernel's vector FMAs against the load-port slots they need (input vectors, those split across
# two cache lines counted twice, weight broadcasts, the channel index, prefetches), the FMA
# latency per accumulator, the lanes that compute outputs and the cores' imbalance, and gives the
# in-core ceiling: the fraction of the FMA peak the useful FLOPs can reach with every load in L1.
# Per-filter pattern kernels are load-port bound (the taps of one kernel share few loads, and
# most 16-lane loads at a tap's column shift split across two cache lines); the dense kernel with
# filters computed together is FMA bound. The ceiling is an upper bound, not a ranking: the
# measured GFLOP/s sit below `ceiling x peak` (~380 GFLOP/s on 2 cores here) by what memory
# costs on top: the `shifted` layout has no split loads and the higher ceiling, but stages three
# copies of the input and measures slower; the `segmented` one also has none, and shares each
# load among the vectors and taps that read it; the columns past a vector's lanes are lane
# shifts in registers.

# %%
print(
    f"{'rows':>4} {'vector':>6} {'layout':>9} {'load/FMA':>9} {'split':>6} "
    f"{'bound':>11} {'ceiling':>7} {'GFLOP/s':>8}"
)
for cfg, ms in sorted(sparse_ms.items(), key=lambda kv: kv[1]):
    b = kernel_bounds(GEOM, cfg, packings[False])
    mark = f"  <- default (prefetch {cfg.prefetch})" if cfg == sparse_default else ""
    print(
        f"{cfg.rows:>4} {cfg.vector:>6} {layout(cfg):>9} {b['load_vs_fma']:9.2f} "
        f"{b['split_share']:6.0%} {b['bound']:>11} {b['ceiling']:7.0%} "
        f"{useful / ms / 1e6:8.1f}{mark}"
    )
b = kernel_bounds(GEOM, dense_default, packings[True])
print(
    f"dense default (filters {dense_default.filters}): load / FMA port time "
    f"{b['load_vs_fma']:.2f}, {b['bound']} bound, ceiling {b['ceiling']:.0%}"
)

# %% [markdown]
# ## Sweep: dense kernel, `rows` x `filters`
#
# The dense kernel (every kernel packed with all 9 taps) with the default vector width: `filters`
# filters per job share each input load (`filters` x `rows` x `width / vector` accumulators).

# %%
dense_ms = {}
for filters in (1, 2, 4):
    for rows in [1, 4] if QUICK else [1, 2, 4, 7]:
        cfg = PatternConvConfig(rows=rows, vector=dense_default.vector, filters=filters)
        dense_ms[cfg] = build_and_time(cfg, dense=True)
if dense_default not in dense_ms:
    dense_ms[dense_default] = build_and_time(dense_default, dense=True)
print(f"{'rows':>4} {'filters':>7} {'ms':>8}")
for cfg, ms in sorted(dense_ms.items(), key=lambda kv: kv[1]):
    mark = "  <- default" if cfg == dense_default else ""
    print(f"{cfg.rows:>4} {cfg.filters:>7} {ms:8.4f}{mark}")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
for j, vector in enumerate((8, 16)):
    for name, style in zip(LAYOUTS, ("o-", "s--", "^:"), strict=True):
        pts = sorted(
            (c.rows, ms)
            for c, ms in sparse_ms.items()
            if c.vector == vector and layout(c) == name and c.rows in ROWS
        )
        left.plot(*zip(*pts, strict=True), style, color=f"C{j}", label=f"vector {vector}, {name}")
left.plot(
    sparse_default.rows,
    sparse_ms[sparse_default],
    "*",
    color="red",
    markersize=18,
    label=f"default (rows {sparse_default.rows}, vector {sparse_default.vector})",
)
left.set_title("pattern-sparse kernel, 64x64x3x3 on 28x28")
for filters in (1, 2, 4):
    pts = sorted((c.rows, ms) for c, ms in dense_ms.items() if c.filters == filters)
    right.plot(*zip(*pts, strict=True), "o-", color=f"C{filters + 2}", label=f"filters {filters}")
right.plot(
    dense_default.rows,
    dense_ms[dense_default],
    "*",
    color="red",
    markersize=18,
    label=f"default (rows {dense_default.rows}, filters {dense_default.filters})",
)
right.set_title(f"dense kernel (vector {dense_default.vector}), same layer unpruned")
for ax in (left, right):
    ax.set_xticks(ROWS if ax is left else sorted({c.rows for c in dense_ms}))
    ax.set_xlabel("rows per tile")
    ax.set_ylabel("median ms")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
best_dense = min(dense_ms.values())
print(
    f"sparse default {sparse_ms[sparse_default]:.4f} ms, best {sparse_ms[best]:.4f} ms "
    f"({best}); default / best = {sparse_ms[sparse_default] / sparse_ms[best]:.2f}"
)
print(
    f"dense default {dense_ms[dense_default]:.4f} ms, best {best_dense:.4f} ms; "
    f"sparse default is {dense_ms[dense_default] / sparse_ms[sparse_default]:.1f}x faster than "
    f"dense default ({2 * 28 * 28 * 64 * 64 * 9 / useful:.1f}x fewer FLOPs)"
)

# %% [markdown]
# ## Defaults and the tuner
#
# `tvm_sparse.compile` uses one point of this space per layer: `default_config(geom,
# filter_group, **tile_defaults(geom, registers, lanes))`, a rule rather than a search: the widest
# useful vector for the target, tall tiles two vectors wide on wide maps (else the whole row),
# then the largest tile (`filters x rows x cols / vector` accumulators) within the target's
# register budget, preferring a `rows` that divides the output height. The red stars above are
# that rule; the sweeps show how far it is from the best point of this small grid, on this
# machine, for this one layer.
#
# `tvm_sparse.tune(model, x, trials=..., work_dir=...)` searches the same knobs (and the loop
# order) with MetaSchedule: each kernel is a template whose rule samples the knobs, an XGBoost
# cost model picks candidates, the best few are re-timed against this default before one is kept,
# the kept kernels are compared with their defaults inside the model (those slower there go back),
# and `tvm_sparse.compile(..., tuning=work_dir)` applies the records (README, "Tune").
