#!/usr/bin/env python3
"""Build the notebooks of this folder from the cell sources below, execute them, save them.

    python notebooks/build_notebooks.py             # build + execute + save every notebook
    python notebooks/build_notebooks.py 02 04       # only those whose name starts so
    python notebooks/build_notebooks.py --quick     # TVM_SPARSE_NB_QUICK=1, nothing saved
    python notebooks/build_notebooks.py --out DIR   # save into DIR instead (a trial run)

The sources here are the truth: edit a cell here, then rebuild (``tests/test_notebooks.py`` checks
that the stored notebooks hold exactly these cells, executed in order, and runs each in a fresh
kernel with ``TVM_SPARSE_NB_QUICK=1``, which shrinks budgets). The stored outputs are the ones this
script's normal (not quick) run produced on the machine named in each notebook's metadata;
run it on an otherwise idle machine, since notebooks 02 and 03 time kernels and models.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
CELL_TIMEOUT_S = 600
QUICK_ENV = "TVM_SPARSE_NB_QUICK"


def md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
    return ("code", textwrap.dedent(text).strip("\n"))


# ------------------------------------------------------------------------------ 01 patterns

NB01 = [
    md(r"""
# 01 · Pattern sparsity, seen

What a pattern-pruned 3x3 conv weight looks like to tvm-sparse, and what the compiler makes of it:

1. the **kernel → pattern map** of one layer and its **pattern library** (PatDNN / PCONV: each
   kept kernel keeps 4 of its 9 taps, in one of ~8 shapes; connectivity pruning drops whole
   kernels),
2. the **FKW packing** (`PatternWeight`): kernels grouped by filter, then by pattern, so that each
   pattern is one code path of the generated kernel,
3. the **filter reorder** that balances the work of each core's share of filters,
4. the **FLOPs saved**, for the layer and for a whole pattern-pruned ResNet-18.

Nothing is compiled here: everything is NumPy on the packed arrays the compiler builds.
"""),
    code(r"""
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from tvm_sparse.formats import PatternWeight, choose_conv_format, conv_sparsity, pattern_library
from tvm_sparse.formats.pattern import kernel_masks
from tvm_sparse.models import resnet18
from tvm_sparse.testing import pattern_prune_model_, random_pattern_weight

QUICK = os.environ.get("TVM_SPARSE_NB_QUICK") == "1"  # set by the tests: smaller budgets
np.set_printoptions(linewidth=100, precision=3, suppress=True)
"""),
    md(r"""
## A pattern-pruned layer

`random_pattern_weight` draws what PatDNN-style pruning produces: a library of 8 patterns of 4
taps (each containing the centre tap), every kept kernel using one of them, and 28 % of the
kernels kept. `conv_sparsity` measures it the way the compiler does, and `choose_conv_format`
makes the compiler's decision.
"""),
    code(r"""
OUT_CH, IN_CH = 32, 48
weight = random_pattern_weight(OUT_CH, IN_CH, num_patterns=8, kernel_keep=0.28, seed=0)
stats = conv_sparsity(weight)
fmt, why = choose_conv_format(stats)
print(f"weight {weight.shape} (OIHW), {int((weight != 0).sum())} of {weight.size} nonzero")
print(stats)
print(f"format: {fmt} ({why})")
o, c = np.argwhere(np.abs(weight).sum(axis=(2, 3)) > 0)[0]
print(f"kernel (filter {o}, channel {c}):")
print(weight[o, c])
"""),
    md(r"""
## Kernel → pattern map and the pattern library

Each cell below is one kernel (filter `o`, input channel `c`), coloured by the index of its
pattern in the library (`pattern_library`: most used first); white kernels were pruned away by
connectivity pruning. Underneath, the library itself: the 4 kept taps of each 3x3 pattern.
"""),
    code(r"""
library = pattern_library(weight)
codes = kernel_masks(weight).astype(np.int64) @ (1 << np.arange(9))  # (O, C) tap-set codes
kernel_pattern = np.full(codes.shape, -1)
for i, pat in enumerate(library):
    kernel_pattern[codes == sum(1 << t for t in pat)] = i
counts = [int((kernel_pattern == i).sum()) for i in range(len(library))]

colors = ["white", *plt.cm.tab10.colors[: len(library)]]
fig, ax = plt.subplots(figsize=(9, 5.5))
image = ax.imshow(
    kernel_pattern,
    cmap=ListedColormap(colors),
    vmin=-1.5,
    vmax=len(library) - 0.5,
    interpolation="nearest",
)
bar = fig.colorbar(image, ax=ax, ticks=range(-1, len(library)))
bar.ax.set_yticklabels(["pruned", *[f"p{i}" for i in range(len(library))]])
ax.set_xlabel("input channel c")
ax.set_ylabel("filter (output channel) o")
ax.set_title(f"kernel -> pattern map ({stats.kernel_density:.0%} of kernels kept)")
plt.show()

fig, axes = plt.subplots(1, len(library), figsize=(1.5 * len(library), 2.1))
for i, (ax, pat) in enumerate(zip(axes, library, strict=True)):
    taps = np.zeros(9)
    taps[list(pat)] = 1
    ax.imshow(taps.reshape(3, 3), cmap=ListedColormap(["#eeeeee", colors[i + 1]]), vmin=0, vmax=1)
    ax.set_xticks(np.arange(-0.5, 3), minor=True)
    ax.set_yticks(np.arange(-0.5, 3), minor=True)
    ax.grid(which="minor", color="black", linewidth=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(f"p{i} {pat}\n{counts[i]} kernels", fontsize=8)
fig.suptitle("the pattern library (taps numbered dy * 3 + dx)", fontsize=10)
plt.show()
"""),
    md(r"""
## FKW packing: `PatternWeight`

`PatternWeight.from_dense(weight, num_shares=cores)` stores the layer as PatDNN's FKW
(filter-kernel-weight) layout:

| array | shape | meaning |
|---|---|---|
| `patterns` | P tuples | the library: flat tap indices of each pattern |
| `filter_order` | (O,) | original filter stored at packed position `i` (the reorder, below) |
| `kernel_ptr` | (O, P + 1) | `kernel_ptr[i, p] : kernel_ptr[i, p + 1]`: filter `i`, pattern `p` |
| `kernel_channel` | (K,) | input channel of kernel `k` |
| `kernel_values` | (K, 4) | the 4 kept weights of kernel `k`, in its pattern's tap order |

Kernels are sorted by (packed filter, pattern, channel), so the kernels of one filter that share a
pattern form one contiguous **run**. The generated kernel has one loop per pattern over its run,
with the pattern's tap offsets as compile-time constants: no per-kernel branch, no mask.
"""),
    code(r"""
packed = PatternWeight.from_dense(weight, num_shares=2)
for name in ("filter_order", "kernel_ptr", "kernel_channel", "kernel_values"):
    arr = getattr(packed, name)
    print(f"{name:<15} {str(arr.dtype):<8} {arr.shape}")
packed_bytes = sum(
    getattr(packed, n).nbytes
    for n in ("filter_order", "kernel_ptr", "kernel_channel", "kernel_values")
)
print(f"{packed.num_kernels} kernels kept; {packed_bytes} bytes packed vs {weight.nbytes} dense")
print()
i = 0
print(f"packed filter {i} is original filter {packed.filter_order[i]}; its runs:")
for p, pat in enumerate(packed.patterns):
    lo, hi = packed.kernel_ptr[i, p], packed.kernel_ptr[i, p + 1]
    print(f"  p{p} {pat}: kernels {lo}:{hi}, channels {packed.kernel_channel[lo:hi].tolist()}")
k = packed.kernel_ptr[i, 0]
print(f"kernel_values[{k}] = {packed.kernel_values[k]}")
assert np.array_equal(packed.to_dense(), weight), "the packing is an exact round trip"
print("to_dense() round trip: exact")
"""),
    md(r"""
Each bar below is one packed filter: its kernels' span of the `kernel_channel` /
`kernel_values` arrays, cut into its runs (coloured by pattern, as above).
"""),
    code(r"""
runs = np.diff(packed.kernel_ptr, axis=1)  # (O, P): kernels per (packed filter, pattern)
fig, ax = plt.subplots(figsize=(10, 5.5))
for i in range(OUT_CH):
    for p in range(len(packed.patterns)):
        if runs[i, p]:
            ax.barh(i, runs[i, p], left=packed.kernel_ptr[i, p], color=colors[p + 1], height=0.8)
ax.invert_yaxis()
ax.set_xlabel("kernel index k (position in kernel_channel / kernel_values)")
ax.set_ylabel("packed filter i")
ax.set_title("kernel_ptr: one run per (filter, pattern)")
handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p + 1]) for p in range(len(library))]
ax.legend(handles, [f"p{p}" for p in range(len(library))], ncol=8, loc="lower left", fontsize=8)
plt.show()
"""),
    md(r"""
## Filter reorder and per-core balance

The kernel's outer loop is parallel over (row tile, column tile, filter) jobs, filters
innermost, and TVM's parallel loop hands each core a contiguous chunk of jobs. The work of a
filter is the number of taps over its kept kernels (its multiply-adds per output pixel), which
varies with connectivity pruning. So `balanced_filter_order` sorts filters by work (then by
pattern mix, so that neighbours run the same code paths), deals them into `num_shares`
contiguous shares greedily (each filter to the lightest open share) and concatenates the shares.
The order matters where a core's chunk cuts through the filters of a tile: most of all on the
small late-stage maps where one tile covers the whole output (when the number of tiles is a
multiple of the number of cores, every core gets whole tiles and the order does not matter).

Pruning with a per-layer budget leaves some filters much denser than others; the second layer
below (`skewed`: the first half of the filters keeps 45 % of its kernels, the second half 10 %)
shows what the reorder buys then.
"""),
    code(r"""
def filter_work(packed):
    # Work (taps) of each filter, in packed order and in the original order.
    taps = np.array([len(p) for p in packed.patterns])
    in_packed = np.diff(packed.kernel_ptr, axis=1) @ taps
    original = np.empty_like(in_packed)
    original[packed.filter_order] = in_packed
    return original, in_packed


def imbalance(work, shares):
    # Heaviest contiguous share / mean share: the slowdown of the slowest core.
    loads = [s.sum() for s in np.array_split(work, shares)]
    return max(loads) / np.mean(loads)


skewed = np.concatenate(
    [
        random_pattern_weight(OUT_CH // 2, IN_CH, kernel_keep=0.45, seed=1),
        random_pattern_weight(OUT_CH // 2, IN_CH, kernel_keep=0.10, seed=2),
    ]
)
layers = {"random layer": weight, "skewed layer": skewed}
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, (title, w) in zip(axes[:2], layers.items(), strict=True):
    original, in_packed = filter_work(PatternWeight.from_dense(w, num_shares=2))
    ax.bar(np.arange(OUT_CH) - 0.2, original, 0.4, label="original order")
    ax.bar(np.arange(OUT_CH) + 0.2, in_packed, 0.4, label="packed order (2 shares)")
    ax.axvline(OUT_CH / 2 - 0.5, color="gray", ls=":")
    ax.set_title(f"{title}: taps per filter")
    ax.set_xlabel("filter position")
    ax.legend(fontsize=8)
cores = [2, 4, 8]
print(f"{'layer':<14} {'cores':>5} {'original order':>15} {'reordered':>10}   (max / mean share)")
for j, (title, w) in enumerate(layers.items()):
    before, after = [], []
    for n in cores:
        original, in_packed = filter_work(PatternWeight.from_dense(w, num_shares=n))
        before.append(imbalance(original, n))
        after.append(imbalance(in_packed, n))
        print(f"{title:<14} {n:>5} {before[-1]:>15.3f} {after[-1]:>10.3f}")
    x = np.arange(len(cores)) + 0.2 * (2 * j - 1)
    axes[2].plot(x, before, "o--", color=f"C{j}", label=f"{title}, original")
    axes[2].plot(x, after, "s-", color=f"C{j}", label=f"{title}, reordered")
axes[2].set_xticks(range(len(cores)), [f"{n} cores" for n in cores])
axes[2].axhline(1, color="gray", lw=0.5)
axes[2].set_ylabel("heaviest share / mean share")
axes[2].set_title("per-core balance")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()
"""),
    md(r"""
## FLOPs saved

For the layer above at a 56x56 output: the dense conv does `O * C * 9` multiply-adds per output
pixel, connectivity pruning alone would keep `kernels kept * 9`, and pattern + connectivity
pruning keeps `kernels kept * 4` (`PatternWeight.num_taps`), which is what the pattern kernel
computes.
"""),
    code(r"""
pixels = 56 * 56
flops = {
    "dense": 2 * pixels * OUT_CH * IN_CH * 9,
    "connectivity only": 2 * pixels * packed.num_kernels * 9,
    "pattern + connectivity": 2 * pixels * packed.num_taps,
}
for name, f in flops.items():
    print(f"{name:<24} {f / 1e6:8.1f} MFLOP  ({flops['dense'] / f:4.1f}x fewer than dense)")
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.barh(list(flops), [f / 1e6 for f in flops.values()], color=["gray", "C1", "C2"])
ax.invert_yaxis()
ax.set_xlabel("MFLOP at 56x56")
plt.show()
"""),
    md(r"""
The same for every conv of a pattern-pruned ResNet-18 (224x224, `pattern_prune_model_`: every
3x3 conv gets 8 patterns, 28 % of kernels). The 7x7 stem and the 1x1 downsample convs are not
pattern-pruned, and `choose_conv_format` keeps them dense, as the compiler would; output sizes
come from forward hooks.
"""),
    code(r"""
torch.manual_seed(0)
net = pattern_prune_model_(resnet18(width=32 if QUICK else 64)).eval()
sizes = {}


def record(name):
    def hook(module, inputs, output):
        sizes[name] = tuple(output.shape[-2:])

    return hook


convs = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
hooks = [m.register_forward_hook(record(n)) for n, m in convs.items()]
with torch.no_grad():
    net(torch.zeros(1, 3, 224, 224))
for h in hooks:
    h.remove()

names, dense_f, kept_f = [], [], []
for name, m in convs.items():
    w = m.weight.detach().numpy()
    s = conv_sparsity(w)
    fmt, _ = choose_conv_format(s)
    dense = 2 * w.size * sizes[name][0] * sizes[name][1]
    names.append(name.replace("layer", "L").replace(".downsample.0", ".ds"))
    dense_f.append(dense / 1e6)
    kept_f.append(dense * s.density / 1e6 if fmt == "pattern" else dense / 1e6)
fig, ax = plt.subplots(figsize=(12, 3.8))
pos = np.arange(len(names))
ax.bar(pos - 0.2, dense_f, 0.4, label="dense", color="gray")
ax.bar(pos + 0.2, kept_f, 0.4, label="tvm-sparse computes", color="C2")
ax.set_xticks(pos, names, rotation=60, ha="right", fontsize=8)
ax.set_ylabel("MFLOP")
ax.legend()
ax.set_title("ResNet-18 convs, 224x224: FLOPs per layer")
plt.show()
total_dense, total_kept = sum(dense_f), sum(kept_f)
print(
    f"convs: {total_kept:.0f} of {total_dense:.0f} MFLOP kept "
    f"({total_dense / total_kept:.1f}x fewer); the unpruned stem and 1x1 convs cap the ratio"
)
"""),
]

# ----------------------------------------------------------------------------- 02 schedules

NB02 = [
    md(r"""
# 02 · Schedules, explored

The pattern conv kernel is generated per layer by
`schedules.pattern_conv2d.pattern_conv2d_primfunc` (TIR built with TVM's IRBuilder). Its
schedule knobs are `PatternConvConfig`:

| knob | meaning |
|---|---|
| `rows` | output rows per tile (the tile `rows x cols` lives in vector registers) |
| `cols` | output columns per tile, a multiple of `vector` (0: the whole row) |
| `vector` | fp32 lanes along the output width (8: AVX2 / half AVX-512, 16: AVX-512, 4: NEON) |
| `filters` | filters computed together, sharing each input vector load (dense convs only) |
| `shifted` | stage the input pre-shifted per tap column (aligned loads, `kw` x staging memory) |
| `segmented` | lane l computes column `S * l + j` (S vectors per row), input staged to match |

This notebook prints the TIR of a small layer, then compiles and times one layer over a grid of
knobs, and shows where the configuration the compiler picks (`default_config` +
`tile_defaults`) lands.
"""),
    code(r"""
%matplotlib inline
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
import tvm

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
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.testing import random_pattern_weight

QUICK = os.environ.get("TVM_SPARSE_NB_QUICK") == "1"  # set by the tests: smaller budgets
TARGET = resolve_target("x86")
LANES, REGISTERS = vector_lanes(TARGET), vector_registers(TARGET)
print(f"target {TARGET}")
print(
    f"{machine_description()['cpu']}, {os.cpu_count()} cores: "
    f"{LANES} fp32 lanes, {REGISTERS} vector registers"
)
"""),
    md(r"""
## The TIR of a small layer

8 -> 8 channels on 8x8, 2 patterns, a fused bias + ReLU epilogue and a 2-row tile, so that the
printout stays short. Read it top down: one parallel loop over shares (one per core), each a
contiguous run of the (row tile, column tile, filter) jobs. A share first stages the zero-padded
input rows its own tiles read (one copy per stride phase, every channel), then runs its jobs.
Each job zeroes one small accumulator buffer per output row of its tile (small enough to stay on the
stack, where LLVM keeps it in registers), then runs one loop per pattern over that filter's run
of kernels (`kernel_ptr[i, p] : kernel_ptr[i, p + 1]`), loading the kernel's channel and its 4
weights once and applying them with the pattern's tap offsets `(dy, dx)` written in as
constants, for every row of the tile; finally the epilogue (bias, ReLU) writes the tile to
filter `filter_order[i]`.
"""),
    code(r"""
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
"""),
    md(r"""
## A layer to time

A ResNet-18-like layer: 64 -> 64 channels on 28x28 (stride 1, padding 1), pattern-pruned
(8 patterns of 4 taps, 28 % of kernels kept). `build_and_time` compiles the kernel for one
config on its own (as `tests/kernel_utils.py` does), checks it against PyTorch, and times it with
TVM's `time_evaluator` (median over `repeat` measurements of `number` runs each).
`dense=True` packs every kernel with the full 3x3 pattern (zeros included): the dense kernel the
compiler uses for convs that are not sparse enough, where `filters` applies.
"""),
    code(r"""
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
DEV = tvm.cpu()
packings = {
    dense: PatternWeight.from_dense(weight, num_shares=os.cpu_count(), keep_zeros=dense)
    for dense in (False, True)
}


def build_and_time(cfg, dense=False):
    # Compile the layer's kernel with `cfg`, check it against PyTorch; median ms per call.
    packed = packings[dense]
    func = pattern_conv2d_primfunc(
        GEOM,
        packed.patterns,
        packed.num_kernels,
        packed.kernel_values.shape[1],
        Epilogue(),
        cfg,
        filter_group=packed.filter_group,
    )
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=TARGET).jit()
    arrays = [
        x,
        packed.kernel_ptr,
        packed.kernel_channel,
        packed.kernel_values,
        packed.filter_order,
        np.zeros(reference.shape, "float32"),
    ]
    args = [tvm.runtime.tensor(a, DEV) for a in arrays]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), reference, rtol=1e-4, atol=1e-4)
    timer = lib.time_evaluator("main", DEV, number=NUMBER, repeat=REPEAT)
    return float(np.median(timer(*args).results) * 1e3)


sparse_default = default_config(GEOM, **tile_defaults(GEOM, REGISTERS, LANES))
dense_default = default_config(
    GEOM, filter_group=packings[True].filter_group, **tile_defaults(GEOM, REGISTERS, LANES)
)
useful = 2 * GEOM.out_height * GEOM.out_width * packings[False].num_taps
print(f"sparse default: {sparse_default}")
print(f"dense default:  {dense_default}")
print(f"useful work: {useful / 1e6:.1f} MFLOP (dense: {2 * 28 * 28 * 64 * 64 * 9 / 1e6:.1f} MFLOP)")
"""),
    md(r"""
## Sweep: sparse kernel, `rows` x `vector` x staging layout

`cols` stays 0 (the whole 28-wide row), which is also what the default picks at this width.
The layouts: `phase` (one staged copy per stride phase, loads at a tap's column shift
unaligned), `shifted`, `segmented` (S = 2 vectors per row at 16 lanes, 4 at 8; the default
picks it from 4 up).
"""),
    code(r"""
ROWS = [1, 4, 14] if QUICK else [1, 2, 4, 7, 14]
LAYOUTS = {"phase": {}, "shifted": {"shifted": True}, "segmented": {"segmented": True}}


def layout(cfg):
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
"""),
    md(r"""
## What bounds each point: the static model

`tvm_sparse.kernel_bounds` counts, from the generator's own tiling and the packed weight, each
kernel's vector FMAs against the load-port slots they need (input vectors, those split across
two cache lines counted twice, weight broadcasts, the channel index, prefetches), the FMA
latency per accumulator, the lanes that compute outputs and the cores' imbalance, and gives the
in-core ceiling: the fraction of the FMA peak the useful FLOPs can reach with every load in L1.
Per-filter pattern kernels are load-port bound (the taps of one kernel share few loads, and
most 16-lane loads at a tap's column shift split across two cache lines); the dense kernel with
filters computed together is FMA bound. The ceiling is an upper bound, not a ranking: the
measured GFLOP/s sit below `ceiling x peak` (~380 GFLOP/s on 2 cores here) by what memory
costs on top: the `shifted` layout has no split loads and the higher ceiling, but stages three
copies of the input and measures slower; the `segmented` one also has none, and shares each
load among the vectors and taps that read it; the columns past a vector's lanes are lane
shifts in registers.
"""),
    code(r"""
from tvm_sparse.kernel_bounds import kernel_bounds

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
"""),
    md(r"""
## Sweep: dense kernel, `rows` x `filters`

The dense kernel (every kernel packed with all 9 taps) with the default vector width: `filters`
filters per job share each input load (`filters` x `rows` x `width / vector` accumulators).
"""),
    code(r"""
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
"""),
    code(r"""
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
"""),
    md(r"""
## Defaults and the tuner

`tvm_sparse.compile` uses one point of this space per layer: `default_config(geom,
filter_group, **tile_defaults(geom, registers, lanes))`, a rule rather than a search: the widest
useful vector for the target, tall tiles two vectors wide on wide maps (else the whole row),
then the largest tile (`filters x rows x cols / vector` accumulators) within the target's
register budget, preferring a `rows` that divides the output height. The red stars above are
that rule; the sweeps show how far it is from the best point of this small grid, on this
machine, for this one layer.

`tvm_sparse.tune(model, x, trials=..., work_dir=...)` searches the same knobs (and the loop
order) with MetaSchedule: each kernel is a template whose rule samples the knobs, an XGBoost
cost model picks candidates, the best few are re-timed against this default before one is kept,
the kept kernels are compared with their defaults inside the model (those slower there go back),
and `tvm_sparse.compile(..., tuning=work_dir)` applies the records (README, "Tune").
"""),
]

# ------------------------------------------------------------------------ 03 compile a model

NB03 = [
    md(r"""
# 03 · Compile a model

A pattern-pruned ResNet-18 (`tvm_sparse.models.resnet18`, every 3x3 conv given 8 patterns of
4 taps with 28 % of kernels kept by `tvm_sparse.testing.pattern_prune_model_`, BatchNorm given
non-trivial statistics by `randomize_batchnorm_`), compiled by tvm-sparse sparse and dense, and
compared with PyTorch and ONNX Runtime: numerics first, then latency (medians of interleaved
rounds, `tvm_sparse.benchmarking`), then the compile report. Narrow (width 32) and small
(64x64 input) so that it runs in seconds; `tvm-sparse demo` is the full-size version.
"""),
    code(r"""
%matplotlib inline
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

import tvm_sparse
from tvm_sparse.benchmarking import (
    machine_description,
    markdown_table,
    onnx_bytes,
    ort_runner,
    time_interleaved,
    torch_runner,
    tvm_runner,
)
from tvm_sparse.models import resnet18
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
QUICK = os.environ.get("TVM_SPARSE_NB_QUICK") == "1"  # set by the tests: smaller budgets
THREADS = os.cpu_count()
WIDTH, IMAGE, ROUNDS = (16, 64, 5) if QUICK else (32, 64, 20)
machine = machine_description()
print(
    f"{machine['cpu']}, {THREADS} cores; TVM {machine['tvm']}, torch {machine['torch']}, "
    f"onnxruntime {machine.get('onnxruntime', '-')}"
)
"""),
    md(r"""
## The model
"""),
    code(r"""
torch.manual_seed(0)
model = resnet18(num_classes=10, width=WIDTH)
pattern_prune_model_(model, num_patterns=8, kernel_keep=0.28, seed=0)
randomize_batchnorm_(model, seed=0)
model.eval()
x = np.random.default_rng(0).standard_normal((1, 3, IMAGE, IMAGE)).astype("float32")
with torch.no_grad():
    reference = model(torch.from_numpy(x)).numpy()
params = sum(p.numel() for p in model.parameters())
nonzero = sum(int((p != 0).sum()) for p in model.parameters())
print(f"ResNet-18 width {WIDTH}, input {x.shape}: {params} parameters, {nonzero} nonzero")
"""),
    md(r"""
## Compile: sparse and dense

`tvm_sparse.compile` imports the model (`torch.export` -> Relax, BatchNorm folded into the convs),
rewrites every conv into a generated kernel (pattern-sparse where the weights allow, else
tvm-sparse's dense kernel) with bias / residual / ReLU fused, and builds it with TVM's Relax
pipeline. `sparse=False` gives the dense baseline from the same weights.
"""),
    code(r"""
sparse = tvm_sparse.compile(model, (x,))
dense = tvm_sparse.compile(model, (x,), sparse=False)
print(f"compiled sparse in {sparse.compile_seconds:.1f} s, dense in {dense.compile_seconds:.1f} s")
"""),
    md(r"""
## Numerics

Every runtime against PyTorch (float32; only the summation order differs, so the tolerance is
that of `tvm-sparse demo`: rtol = atol = 1e-3).
"""),
    code(r"""
ort = ort_runner(onnx_bytes(model, (x,)), (x,), THREADS)
outputs = {"tvm-sparse": sparse(x), "TVM dense": dense(x), "ONNX Runtime": ort()[0]}
errors = {"PyTorch": 0.0}
for name, out in outputs.items():
    np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-3, err_msg=name)
    errors[name] = float(np.abs(out - reference).max())
    same = np.array_equal(out.argmax(1), reference.argmax(1))
    print(f"{name:<13} max |out - PyTorch| = {errors[name]:.1e}, same top-1: {same}")
print(f"output scale: max |PyTorch| = {np.abs(reference).max():.2f}")
"""),
    md(r"""
## Latency

`time_interleaved` measures the runtimes in interleaved rounds (each round times every runtime,
in a rotating order, after a few untimed calls) and reports the median over rounds per runtime,
so drift in machine load hits all alike. All runtimes use every core.
"""),
    code(r"""
runners = {
    "tvm-sparse": tvm_runner(sparse, (x,)),
    "TVM dense": tvm_runner(dense, (x,)),
    "PyTorch": torch_runner(model, (x,), THREADS),
    "ONNX Runtime": ort,
}
ms = time_interleaved(runners, rounds=ROUNDS)
convs = [r for r in sparse.layers if r.op == "conv2d"]
kept = sum(r.flops_kept for r in convs)
dense_flops = sum(r.flops_dense for r in convs)
best_dense = min(t for name, t in ms.items() if name != "tvm-sparse")
rows = [
    [name, f"{t:.3f}", f"{best_dense / t:.2f}x", f"{kept / t / 1e6:.1f}", f"{errors[name]:.1e}"]
    for name, t in sorted(ms.items(), key=lambda kv: kv[1])
]
display(
    Markdown(
        f"ResNet-18 width {WIDTH}, 1x3x{IMAGE}x{IMAGE}: conv FLOPs kept {kept / 1e6:.1f} of "
        f"{dense_flops / 1e6:.1f} M ({dense_flops / kept:.1f}x fewer), {ROUNDS} rounds, "
        f"{THREADS} threads\n\n"
        + markdown_table(
            ["runtime", "median ms", "vs best dense", "useful conv GFLOP/s", "max err"], rows
        )
    )
)
print(
    f"tvm-sparse by its own time_evaluator (CompiledModel.benchmark): "
    f"{sparse.benchmark(x, number=20, repeat=5):.3f} ms"
)
"""),
    code(r"""
fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [1, 2]})
order = sorted(ms, key=ms.get)
bars = left.barh(
    order, [ms[n] for n in order], color=["C2" if n == "tvm-sparse" else "gray" for n in order]
)
left.bar_label(bars, [f"{ms[n]:.2f} ms" for n in order], padding=3)
left.invert_yaxis()
left.set_xlabel("median ms (lower is better)")
left.set_xlim(0, max(ms.values()) * 1.3)
left.set_title("latency")
pos = np.arange(len(convs))
right.bar(pos - 0.2, [r.flops_dense / 1e6 for r in convs], 0.4, color="gray", label="dense")
right.bar(pos + 0.2, [r.flops_kept / 1e6 for r in convs], 0.4, color="C2", label="kept")
right.set_xticks(pos, [f"{r.name}\n{r.format}" for r in convs], rotation=90, fontsize=7)
right.set_ylabel("MFLOP")
right.set_title("per conv layer, as compiled")
right.legend()
plt.tight_layout()
plt.show()
"""),
    md(r"""
## The report

Per layer: weight and input shape, format chosen (`pattern` / `dense` / `tvm`), density, FLOPs
kept, the epilogue fused into the kernel, and why.
"""),
    code(r"""
print(sparse.report())
"""),
    md(r"""
## Export and load

`export` writes a shared library plus a `.json` with the inputs, target and report; `load` needs
only those two files (no PyTorch, no model).
"""),
    code(r"""
@contextlib.contextmanager
def native_stderr_muted():
    # TVM 0.27 logs a "Scope Saving" / "Scope Loaded" warning per constant on export / load.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


with tempfile.TemporaryDirectory() as tmp:
    with native_stderr_muted():
        path = sparse.export(Path(tmp) / "resnet18_pattern.so")
        loaded = tvm_sparse.load(path)
    files = {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir())}
    print("exported:", ", ".join(f"{n} ({s / 1024:.0f} KiB)" for n, s in files.items()))
    np.testing.assert_allclose(loaded(x), outputs["tvm-sparse"], rtol=1e-6, atol=1e-6)
    assert loaded.report() == sparse.report()
print("the loaded library gives the same outputs and report")
"""),
]

# --------------------------------------------------------------------------------- 04 RPC

NB04 = [
    md(r"""
# 04 · Run on a phone over RPC

tvm-sparse cross-compiles for `"arm64"` (aarch64 Linux) and `"android"` (aarch64 Android), links
the library for the device (`tvm_sparse.toolchain`), and runs and times it there over TVM RPC
(`tvm_sparse.rpc`). Devices are found through an **RPC tracker** under a **key**: the tracker
keeps a queue of free devices per key, and a client asks it for "a free device under key
`android`".

## With a real Android phone

On the host (the machine with this notebook):

```bash
python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190      # keep it running
```

On the phone: build and install TVM's RPC app (`apps/android_rpc` in the TVM sources:
`gradle clean build`, sign the APK, `adb install`), open it, set **Address** to the host's IP
(phone and host on the same network), **Port** `9190`, **Key** `android`, and press
**START RPC**. Check on the host that the tracker lists it:

```bash
python -m tvm.exec.query_rpc_tracker --host 127.0.0.1 --port 9190   # "android  1  1  0"
```

Then tell tvm-sparse which linker to use (the NDK's clang for your API level) and where the
device is, and run this notebook (or the CLI):

```bash
NDK_BIN=$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/linux-x86_64/bin
export TVM_NDK_CC=$NDK_BIN/aarch64-linux-android24-clang           # the linker (API level 24)
export TVM_TRACKER=127.0.0.1:9190 TVM_KEY=android    # read by this notebook
jupyter nbconvert --to notebook --execute --inplace notebooks/04_rpc_phone.ipynb
tvm-sparse bench model.onnx --target android --rpc 127.0.0.1:9190 --key android
```

(`TVM_TARGET=arm64` makes the notebook compile for aarch64 Linux instead, e.g. for a board
such as a Raspberry Pi running `python -m tvm.exec.rpc_server --tracker HOST:9190 --key pi`.)

## Without a phone: the emulated aarch64 device

`scripts/emulated_arm64.py` runs a TVM RPC server in an aarch64 Python under qemu-user,
registered with a local tracker: the same workflow, on any Linux x86-64 machine with apt
(`setup()` installs what is missing, cached; CI runs it). When neither a phone
(`TVM_TRACKER` / `TVM_KEY` unset) nor the emulator is available, the cells below say so and
skip.
"""),
    code(r"""
import atexit
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import tvm_sparse
from tvm_sparse.models import resnet18
from tvm_sparse.rpc import benchmark_remote, connect, run_remote
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecations
QUICK = os.environ.get("TVM_SPARSE_NB_QUICK") == "1"  # set by the tests: smaller budgets
ROOT = Path(tvm_sparse.__file__).resolve().parents[1]
"""),
    code(r"""
TRACKER, KEY = os.environ.get("TVM_TRACKER"), os.environ.get("TVM_KEY")
emulator = None
if TRACKER and KEY:
    TARGET = os.environ.get("TVM_TARGET", "android")
    print(f"a real device: key {KEY!r} at tracker {TRACKER}, target {TARGET!r}")
else:
    TARGET = "arm64"
    try:
        spec = importlib.util.spec_from_file_location(
            "emulated_arm64", ROOT / "scripts" / "emulated_arm64.py"
        )
        emu = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = emu  # its dataclasses look their module up here
        spec.loader.exec_module(emu)
        emu.setup(binfmt=False, quiet=True)  # idempotent; cached after the first time
        emulator = emu.start(emu.free_port(), "emulated-arm64", quiet=True)
        atexit.register(emulator.stop)  # even if a later cell fails
        TRACKER, KEY = emulator.tracker, emulator.key
        print(f"emulated aarch64 device: key {KEY!r} at tracker {TRACKER} ({emulator.mode})")
        print("tracker queue:", emu.tracker_keys(emulator.tracker_port))
    except Exception as err:  # no qemu / apt / network / scripts dir: nothing to run on
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(
            "SKIPPED: no phone (TVM_TRACKER / TVM_KEY unset) and the emulated aarch64 device "
            f"cannot be set up here: {reason}"
        )
        TRACKER = KEY = None
HAVE_DEVICE = TRACKER is not None
"""),
    md(r"""
## Compile for the device

A small pattern-pruned ResNet-18 (width 8, 32x32 input). A model compiled for the device cannot
run on the host; `export` links it with the device's linker (aarch64 gcc, clang + lld, or the
NDK's clang from `TVM_NDK_CC`). The same model is compiled for the host, to compare.
"""),
    code(r"""
torch.manual_seed(0)
model = randomize_batchnorm_(pattern_prune_model_(resnet18(num_classes=10, width=8))).eval()
x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
with torch.no_grad():
    reference = model(torch.from_numpy(x)).numpy()
if HAVE_DEVICE:
    device_cm = tvm_sparse.compile(model, (x,), target=TARGET)
    host_cm = tvm_sparse.compile(model, (x,), target="x86")
    print(f"compiled for {device_cm.target.attrs['mtriple']} in {device_cm.compile_seconds:.1f} s")
    layers = [r for r in device_cm.layers if r.op == "conv2d"]
    print(f"{sum(r.format == 'pattern' for r in layers)} of {len(layers)} convs pattern-sparse")
    try:
        device_cm(x)
    except tvm_sparse.InputError as err:
        print(f"on the host, as expected: {err}")
    workdir = tempfile.TemporaryDirectory(prefix="tvm-sparse-nb04-")  # removed at the end
    tmp = Path(workdir.name)
    lib_path = device_cm.export(tmp / f"resnet18_pattern_{TARGET}.so")
    machine = Path(lib_path).read_bytes()[18]
    print(
        f"exported {Path(lib_path).name}: ELF e_machine 0x{machine:02x}"
        f" ({'aarch64' if machine == 0xB7 else 'not aarch64!'})"
    )
else:
    print("skipped: no device")
"""),
    md(r"""
## Run and time it there

`run_remote` uploads the library, loads it in a Relax VM on the device and returns the outputs;
`benchmark_remote` times it on the device with the VM's `time_evaluator`. Under qemu-user the
device timing measures the emulator, not an ARM core: it shows the workflow, not the speed.
"""),
    code(r"""
if HAVE_DEVICE:
    repeat = 2 if QUICK else 5
    with connect(tracker=TRACKER, key=KEY, timeout=60) as remote:
        print(f"connected: {remote}")
        (device_out,) = run_remote(lib_path, [x], remote)
        device_ms = benchmark_remote(lib_path, [x], remote, number=1, repeat=repeat)
    host_out = host_cm(x)
    host_ms = host_cm.benchmark(x, number=10, repeat=repeat)
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(device_out, reference, rtol=1e-4, atol=1e-4 * scale)
    kind = "emulated aarch64 (qemu)" if emulator is not None else f"device {KEY!r}"
    print(f"{'':<26} {'median ms':>10} {'max |out - PyTorch|':>20}")
    print(f"{kind:<26} {device_ms:>10.2f} {np.abs(device_out - reference).max():>20.1e}")
    print(f"{'host (x86)':<26} {host_ms:>10.2f} {np.abs(host_out - reference).max():>20.1e}")
    print(f"max |device - host| = {np.abs(device_out - host_out).max():.1e}")
else:
    print("skipped: no device")
"""),
    md(r"""
On a real device, the dense build of the same weights is the baseline to beat (skipped on the
emulator, where the timings mean nothing):
"""),
    code(r"""
if HAVE_DEVICE and emulator is None:
    dense_cm = tvm_sparse.compile(model, (x,), target=TARGET, sparse=False)
    dense_path = dense_cm.export(tmp / f"resnet18_dense_{TARGET}.so")
    with connect(tracker=TRACKER, key=KEY, timeout=60) as remote:
        dense_ms = benchmark_remote(dense_path, [x], remote, number=1, repeat=5)
    print(
        f"sparse {device_ms:.2f} ms, dense {dense_ms:.2f} ms on the device: "
        f"{dense_ms / device_ms:.2f}x"
    )
else:
    print("skipped: " + ("no device" if not HAVE_DEVICE else "emulated device"))
"""),
    md(r"""
## Tuning over RPC: not implemented yet

tvm-sparse does no tuning yet, on the host or over RPC: every kernel gets its configuration from
`default_config` + `tile_defaults` (on aarch64: 4-lane NEON vectors and up to 28 accumulator
registers; see notebook 02 for that space on the host). Measuring candidates on the phone would
go through the same tracker and key (MetaSchedule's `RPCRunner` takes a tracker host, port and
key), but no search over the kernel's knobs is wired up yet.
"""),
    code(r"""
if emulator is not None:
    emulator.stop()
    print("emulated device stopped")
if HAVE_DEVICE:
    workdir.cleanup()
"""),
]

# ------------------------------------------------------------------------------ 05 ADMM

NB05 = [
    md(r"""
# 05 · Prune with ADMM

The pruning toolkit (`tvm_sparse.prune`) on real data: a small CNN on scikit-learn's digits
(8x8 grey images), trained dense, then pruned to 8 patterns on every 3x3 conv plus
connectivity pruning (conv2 / conv3 keep a fraction `kernel_keep` of their kernels) in two ways:

- **ADMM** (ADMM-NN / PatDNN): train with the augmented-Lagrangian penalty pulling the weights
  towards the constraint set, hard-prune, fine-tune under the masks;
- **one-shot**: project the dense weights onto the set (magnitude), fine-tune with the same
  total epoch budget.

Budgets here are small (a narrow model, 20 dense + 24 pruning epochs, one seed) so that it runs
in seconds; ADMM updates Z / U every 5 steps (`update_every=5`) so that its penalty weight rho
grows to its maximum within that budget. `benchmarks/prune_digits.py` is the full experiment.
Then the pruned CNN is compiled with tvm-sparse and checked against PyTorch.
"""),
    code(r"""
%matplotlib inline
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from matplotlib.colors import ListedColormap

import tvm_sparse
from tvm_sparse.formats import pattern_library
from tvm_sparse.prune.digits import Recipe, accuracy, load_digits_data, prune_digits, train_dense
from tvm_sparse.prune.report import sparsity_report

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecations
QUICK = os.environ.get("TVM_SPARSE_NB_QUICK") == "1"  # set by the tests: smaller budgets
WIDTH = (16, 32, 32)
if QUICK:
    RECIPE = Recipe(dense_epochs=3, admm_epochs=2, finetune_epochs=1, update_every=5)
    KEEPS = [0.27, 0.05]
else:
    RECIPE = Recipe(dense_epochs=20, admm_epochs=12, finetune_epochs=12, update_every=5)
    KEEPS = [0.5, 0.27, 0.12, 0.05, 0.02]
print(RECIPE)
"""),
    md(r"""
## Data

scikit-learn's 1797 digits, split 75 / 25 (stratified, seeded): 1347 training and 450 test
images, so one test image is 0.22 points of accuracy.
"""),
    code(r"""
data = load_digits_data()
print(f"train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}")
fig, axes = plt.subplots(1, 10, figsize=(10, 1.4))
for digit, ax in enumerate(axes):
    ax.imshow(data.x_train[data.y_train == digit][0, 0], cmap="gray_r")
    ax.set_title(str(digit))
    ax.axis("off")
plt.show()
"""),
    md(r"""
## Dense, then ADMM vs one-shot at several sparsities
"""),
    code(r"""
t0 = time.perf_counter()
dense = train_dense(data, seed=0, recipe=RECIPE, width=WIDTH)
dense_acc = accuracy(dense, data.x_test, data.y_test)
print(f"dense: {dense_acc:.2f} % test accuracy ({time.perf_counter() - t0:.1f} s)")
results, models = [], {}
for keep in KEEPS:
    for method in ("admm", "oneshot"):
        t0 = time.perf_counter()
        pruned = prune_digits(dense, data, method, num_patterns=8, kernel_keep=keep, recipe=RECIPE)
        report = sparsity_report(pruned, (data.x_test[:1],))
        acc = accuracy(pruned, data.x_test, data.y_test)
        results.append(
            {"keep": keep, "method": method, "acc": acc, "compression": report.conv3x3_compression}
        )
        models[keep, method] = pruned
        print(
            f"keep {keep:<5} {method:<8} {report.conv3x3_compression:5.1f}x fewer 3x3 weights: "
            f"{acc:.2f} % ({time.perf_counter() - t0:.1f} s)"
        )
"""),
    code(r"""
fig, ax = plt.subplots(figsize=(7, 4.2))
for method, color in (("admm", "C0"), ("oneshot", "C1")):
    pts = sorted((r["compression"], r["acc"]) for r in results if r["method"] == method)
    ax.plot(*zip(*pts, strict=True), "o-", color=color, label=method)
ax.axhline(dense_acc, color="gray", ls="--", label="dense")
ax.axhline(dense_acc - 1, color="gray", ls=":", label="dense - 1 point")
ax.set_xscale("log")
ticks = sorted({round(r["compression"], 1) for r in results})
ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
ax.minorticks_off()
ax.set_xlabel("3x3 conv weights: x fewer than dense")
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"digits, width {WIDTH}: 8 patterns + connectivity")
ax.legend()
plt.show()
lines = ["| kernel keep | 3x3 weights | ADMM acc | one-shot acc |", "|---|---|---|---|"]
for keep in KEEPS:
    a, o = (
        next(r for r in results if r["keep"] == keep and r["method"] == m)
        for m in ("admm", "oneshot")
    )
    lines.append(f"| {keep} | {a['compression']:.1f}x fewer | {a['acc']:.2f} | {o['acc']:.2f} |")
display(Markdown(f"Dense: {dense_acc:.2f} %\n\n" + "\n".join(lines)))
"""),
    md(r"""
With budgets this small and a single seed, differences of a test image or two (0.22 points
each) are noise. `benchmarks/results/prune_digits.md` has the full-budget, two-seed numbers:
there ADMM is ahead at 41x fewer weights, one-shot at 90x, and elsewhere they are within a test
image of each other.

## The pruned model

The ADMM model at `kernel_keep = 0.05`: its sparsity report (measured with the compiler's own
detection, BatchNorm folded in) and the 8 patterns the library kept.
"""),
    code(r"""
CHOSEN = 0.05
pruned = models[CHOSEN, "admm"]
report = sparsity_report(pruned, (data.x_test[:1],))
display(Markdown(report.to_markdown()))
library = pattern_library(pruned.conv2.weight.detach().numpy())
fig, axes = plt.subplots(1, len(library), figsize=(1.4 * len(library), 1.9))
for i, (ax, pat) in enumerate(zip(np.atleast_1d(axes), library, strict=True)):
    taps = np.zeros(9)
    taps[list(pat)] = 1
    ax.imshow(taps.reshape(3, 3), cmap=ListedColormap(["#eeeeee", f"C{i}"]), vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(str(pat), fontsize=8)
fig.suptitle("conv2's pattern library after ADMM", fontsize=10)
plt.show()
"""),
    md(r"""
## Compile it and check against PyTorch

The whole test set as one batch (450 x 1 x 8 x 8). The compiler must pick the pattern kernel for
the same layers, at the same densities, as the report above; outputs must match PyTorch's
(rtol = atol = 1e-4), and so must the accuracy computed from them.
"""),
    code(r"""
x_test = data.x_test.numpy()
compiled = tvm_sparse.compile(pruned, (x_test,))
print(compiled.report())
with torch.no_grad():
    expected = pruned.eval()(data.x_test).numpy()
got = compiled(x_test)
np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
records = [r for r in compiled.layers if r.op == "conv2d"]
assert [(r.format, r.density) for r in records] == [
    (row.format, row.stats.density) for row in report.convs
]
tvm_acc = 100.0 * float((got.argmax(1) == data.y_test.numpy()).mean())
print(f"\nmax |tvm-sparse - PyTorch| = {np.abs(got - expected).max():.1e}")
print(
    f"test accuracy from tvm-sparse's outputs: {tvm_acc:.2f} % "
    f"(PyTorch: {accuracy(pruned, data.x_test, data.y_test):.2f} %)"
)
"""),
]

NOTEBOOKS = {
    "01_pattern_sparsity": NB01,
    "02_schedules": NB02,
    "03_compile_model": NB03,
    "04_rpc_phone": NB04,
    "05_prune_admm": NB05,
}


# ----------------------------------------------------------------------------------- driver


def build(name: str):
    """The unexecuted notebook ``name`` (an nbformat NotebookNode)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in NOTEBOOKS[name]:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids: rebuilds diff only where cells changed
    return nb


def execute(nb, timeout: int = CELL_TIMEOUT_S) -> float:
    """Run ``nb`` top to bottom in a fresh kernel started in this folder; returns seconds."""
    from nbclient import NotebookClient

    t0 = time.perf_counter()
    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL,
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="name prefixes, e.g. 02 04 (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ENV}=1, save nothing here")
    parser.add_argument("--out", type=Path, help="write the executed notebooks there instead")
    args = parser.parse_args(argv)
    import nbformat

    from tvm_sparse.benchmarking import machine_description

    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if args.quick:
        os.environ[QUICK_ENV] = "1"
    else:
        os.environ.pop(QUICK_ENV, None)
    machine = machine_description()
    total = 0.0
    for name in names:
        nb = build(name)
        seconds = execute(nb)
        total += seconds
        print(f"{name}: executed in {seconds:.1f} s", flush=True)
        if args.out or not args.quick:
            nb.metadata["tvm_sparse"] = {
                "executed_seconds": round(seconds, 1),
                "quick": args.quick,
                "machine": {k: machine.get(k) for k in ("cpu", "cores", "tvm", "torch")},
            }
            (args.out or HERE).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, (args.out or HERE) / f"{name}.ipynb")
    print(f"total: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
