# %% [markdown]
# # 01 · Pattern sparsity, seen
#
# What a pattern-pruned 3x3 conv weight looks like to tvm-sparse, and what the compiler makes of it:
#
# 1. the **kernel → pattern map** of one layer and its **pattern library** (PatDNN / PCONV: each
#    kept kernel keeps 4 of its 9 taps, in one of ~8 shapes; connectivity pruning drops whole
#    kernels),
# 2. the **FKW packing** (`PatternWeight`): kernels grouped by filter, then by pattern, so that each
#    pattern is one code path of the generated kernel,
# 3. the **filter reorder** that balances the work of each core's share of filters,
# 4. the **FLOPs saved**, for the layer and for a whole pattern-pruned ResNet-18.
#
# Nothing is compiled here: everything is NumPy on the packed arrays the compiler builds.

# %%
# %matplotlib inline
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from tvm_sparse.formats import PatternWeight, choose_conv_format, conv_sparsity, pattern_library
from tvm_sparse.formats.pattern import kernel_masks
from tvm_sparse.models import resnet18
from tvm_sparse.testing import notebook_quick, pattern_prune_model_, random_pattern_weight

QUICK = notebook_quick()  # TVM_SPARSE_NB_QUICK=1 (set by the tests): smaller budgets
np.set_printoptions(linewidth=100, precision=3, suppress=True)

# %% [markdown]
# ## A pattern-pruned layer
#
# `random_pattern_weight` draws what PatDNN-style pruning produces: a library of 8 patterns of 4
# taps (each containing the centre tap), every kept kernel using one of them, and 28 % of the
# kernels kept. `conv_sparsity` measures it the way the compiler does, and `choose_conv_format`
# makes the compiler's decision.

# %%
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

# %% [markdown]
# ## Kernel → pattern map and the pattern library
#
# Each cell below is one kernel (filter `o`, input channel `c`), coloured by the index of its
# pattern in the library (`pattern_library`: most used first); white kernels were pruned away by
# connectivity pruning. Underneath, the library itself: the 4 kept taps of each 3x3 pattern.

# %%
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

# %% [markdown]
# ## FKW packing: `PatternWeight`
#
# `PatternWeight.from_dense(weight, num_shares=cores)` stores the layer as PatDNN's FKW
# (filter-kernel-weight) layout:
#
# | array | shape | meaning |
# |---|---|---|
# | `patterns` | P tuples | the library: flat tap indices of each pattern |
# | `filter_order` | (O,) | original filter stored at packed position `i` (the reorder, below) |
# | `kernel_ptr` | (O, P + 1) | `kernel_ptr[i, p] : kernel_ptr[i, p + 1]`: filter `i`, pattern `p` |
# | `kernel_channel` | (K,) | input channel of kernel `k` |
# | `kernel_values` | (K, 4) | the 4 kept weights of kernel `k`, in its pattern's tap order |
#
# Kernels are sorted by (packed filter, pattern, channel), so the kernels of one filter that share a
# pattern form one contiguous **run**. The generated kernel has one loop per pattern over its run,
# with the pattern's tap offsets as compile-time constants: no per-kernel branch, no mask.

# %%
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

# %% [markdown]
# Each bar below is one packed filter: its kernels' span of the `kernel_channel` /
# `kernel_values` arrays, cut into its runs (coloured by pattern, as above).

# %%
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

# %% [markdown]
# ## Filter reorder and per-core balance
#
# The kernel's outer loop is parallel over (row tile, column tile, filter) jobs, filters
# innermost, and TVM's parallel loop hands each core a contiguous chunk of jobs. The work of a
# filter is the number of taps over its kept kernels (its multiply-adds per output pixel), which
# varies with connectivity pruning. So `balanced_filter_order` sorts filters by work (then by
# pattern mix, so that neighbours run the same code paths), deals them into `num_shares`
# contiguous shares greedily (each filter to the lightest open share) and concatenates the shares.
# The order matters where a core's chunk cuts through the filters of a tile: most of all on the
# small late-stage maps where one tile covers the whole output (when the number of tiles is a
# multiple of the number of cores, every core gets whole tiles and the order does not matter).
#
# Pruning with a per-layer budget leaves some filters much denser than others; the second layer
# below (`skewed`: the first half of the filters keeps 45 % of its kernels, the second half 10 %)
# shows what the reorder buys then.


# %%
def filter_work(packed: PatternWeight) -> tuple[np.ndarray, np.ndarray]:
    # Work (taps) of each filter, in packed order and in the original order.
    taps = np.array([len(p) for p in packed.patterns])
    in_packed = np.diff(packed.kernel_ptr, axis=1) @ taps
    original = np.empty_like(in_packed)
    original[packed.filter_order] = in_packed
    return original, in_packed


def imbalance(work: np.ndarray, shares: int) -> float:
    # Heaviest contiguous share / mean share: the slowdown of the slowest core.
    loads = [s.sum() for s in np.array_split(work, shares)]
    return float(max(loads) / np.mean(loads))


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

# %% [markdown]
# ## FLOPs saved
#
# For the layer above at a 56x56 output: the dense conv does `O * C * 9` multiply-adds per output
# pixel, connectivity pruning alone would keep `kernels kept * 9`, and pattern + connectivity
# pruning keeps `kernels kept * 4` (`PatternWeight.num_taps`), which is what the pattern kernel
# computes.

# %%
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

# %% [markdown]
# The same for every conv of a pattern-pruned ResNet-18 (224x224, `pattern_prune_model_`: every
# 3x3 conv gets 8 patterns, 28 % of kernels). The 7x7 stem and the 1x1 downsample convs are not
# pattern-pruned, and `choose_conv_format` keeps them dense, as the compiler would; output sizes
# come from forward hooks.

# %%
torch.manual_seed(0)
net = pattern_prune_model_(resnet18(width=32 if QUICK else 64)).eval()
sizes = {}


def record(name: str) -> Callable:
    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
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
