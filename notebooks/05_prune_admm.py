# %% [markdown]
# # 05 · Prune with ADMM
#
# The pruning toolkit (`tvm_sparse.prune`) on real data: a small CNN on scikit-learn's digits
# (8x8 grey images), trained dense, then pruned to 8 patterns on every 3x3 conv plus
# connectivity pruning (conv2 / conv3 keep a fraction `kernel_keep` of their kernels) in two ways:
#
# - **ADMM** (ADMM-NN / PatDNN): train with the augmented-Lagrangian penalty pulling the weights
#   towards the constraint set, hard-prune, fine-tune under the masks;
# - **one-shot**: project the dense weights onto the set (magnitude), fine-tune with the same
#   total epoch budget.
#
# Budgets here are small (a narrow model, 20 dense + 24 pruning epochs, one seed) so that it runs
# in seconds; ADMM updates Z / U every 5 steps (`update_every=5`) so that its penalty weight rho
# grows to its maximum within that budget. `benchmarks/prune_digits.py` is the full experiment.
# Then the pruned CNN is compiled with tvm-sparse and checked against PyTorch.

# %%
# %matplotlib inline
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
from tvm_sparse.testing import notebook_quick

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecations
QUICK = notebook_quick()  # TVM_SPARSE_NB_QUICK=1 (set by the tests): smaller budgets
WIDTH = (16, 32, 32)
if QUICK:
    RECIPE = Recipe(dense_epochs=3, admm_epochs=2, finetune_epochs=1, update_every=5)
    KEEPS = [0.27, 0.05]
else:
    RECIPE = Recipe(dense_epochs=20, admm_epochs=12, finetune_epochs=12, update_every=5)
    KEEPS = [0.5, 0.27, 0.12, 0.05, 0.02]
print(RECIPE)

# %% [markdown]
# ## Data
#
# scikit-learn's 1797 digits, split 75 / 25 (stratified, seeded): 1347 training and 450 test
# images, so one test image is 0.22 points of accuracy.

# %%
data = load_digits_data()
print(f"train {tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}")
fig, axes = plt.subplots(1, 10, figsize=(10, 1.4))
for digit, ax in enumerate(axes):
    ax.imshow(data.x_train[data.y_train == digit][0, 0], cmap="gray_r")
    ax.set_title(str(digit))
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Dense, then ADMM vs one-shot at several sparsities

# %%
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

# %%
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

# %% [markdown]
# With budgets this small and a single seed, differences of a test image or two (0.22 points
# each) are noise. `benchmarks/results/prune_digits.md` has the full-budget, two-seed numbers:
# there ADMM is ahead at 41x fewer weights, one-shot at 90x, and elsewhere they are within a test
# image of each other.
#
# ## The pruned model
#
# The ADMM model at `kernel_keep = 0.05`: its sparsity report (measured with the compiler's own
# detection, BatchNorm folded in) and the 8 patterns the library kept.

# %%
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

# %% [markdown]
# ## Compile it and check against PyTorch
#
# The whole test set as one batch (450 x 1 x 8 x 8). The compiler must pick the pattern kernel for
# the same layers, at the same densities, as the report above; outputs must match PyTorch's
# (rtol = atol = 1e-4), and so must the accuracy computed from them.

# %%
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
