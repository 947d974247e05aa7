# %% [markdown]
# # 03 · Compile a model
#
# A pattern-pruned ResNet-18 (`tvm_sparse.models.resnet18`, every 3x3 conv given 8 patterns of
# 4 taps with 28 % of kernels kept by `tvm_sparse.testing.pattern_prune_model_`, BatchNorm given
# non-trivial statistics by `randomize_batchnorm_`), compiled by tvm-sparse sparse and dense, and
# compared with PyTorch and ONNX Runtime: numerics first, then latency (medians of interleaved
# rounds, `tvm_sparse.benchmarking`), then the compile report. Narrow (width 32) and small
# (64x64 input) so that it runs in seconds; `tvm-sparse demo` is the full-size version.

# %%
# %matplotlib inline
import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
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
from tvm_sparse.testing import notebook_quick, pattern_prune_model_, randomize_batchnorm_

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
QUICK = notebook_quick()  # TVM_SPARSE_NB_QUICK=1 (set by the tests): smaller budgets
THREADS = os.cpu_count()
WIDTH, IMAGE, ROUNDS = (16, 64, 5) if QUICK else (32, 64, 20)
machine = machine_description()
print(
    f"{machine['cpu']}, {THREADS} cores; TVM {machine['tvm']}, torch {machine['torch']}, "
    f"onnxruntime {machine.get('onnxruntime', '-')}"
)

# %% [markdown]
# ## The model

# %%
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

# %% [markdown]
# ## Compile: sparse and dense
#
# `tvm_sparse.compile` imports the model (`torch.export` -> Relax, BatchNorm folded into the convs),
# rewrites every conv into a generated kernel (pattern-sparse where the weights allow, else
# tvm-sparse's dense kernel) with bias / residual / ReLU fused, and builds it with TVM's Relax
# pipeline. `sparse=False` gives the dense baseline from the same weights.

# %%
sparse = tvm_sparse.compile(model, (x,))
dense = tvm_sparse.compile(model, (x,), sparse=False)
print(f"compiled sparse in {sparse.compile_seconds:.1f} s, dense in {dense.compile_seconds:.1f} s")

# %% [markdown]
# ## Numerics
#
# Every runtime against PyTorch (float32; only the summation order differs, so the tolerance is
# that of `tvm-sparse demo`: rtol = atol = 1e-3).

# %%
ort = ort_runner(onnx_bytes(model, (x,)), (x,), THREADS)
outputs = {"tvm-sparse": sparse(x), "TVM dense": dense(x), "ONNX Runtime": ort()[0]}
errors = {"PyTorch": 0.0}
for name, out in outputs.items():
    np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-3, err_msg=name)
    errors[name] = float(np.abs(out - reference).max())
    same = np.array_equal(out.argmax(1), reference.argmax(1))
    print(f"{name:<13} max |out - PyTorch| = {errors[name]:.1e}, same top-1: {same}")
print(f"output scale: max |PyTorch| = {np.abs(reference).max():.2f}")

# %% [markdown]
# ## Latency
#
# `time_interleaved` measures the runtimes in interleaved rounds (each round times every runtime,
# in a rotating order, after a few untimed calls) and reports the median over rounds per runtime,
# so drift in machine load hits all alike. All runtimes use every core.

# %%
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

# %%
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

# %% [markdown]
# ## The report
#
# Per layer: weight and input shape, format chosen (`pattern` / `dense` / `tvm`), density, FLOPs
# kept, the epilogue fused into the kernel, and why.

# %%
print(sparse.report())

# %% [markdown]
# ## Export and load
#
# `export` writes a shared library plus a `.json` with the inputs, target and report; `load` needs
# only those two files (no PyTorch, no model).


# %%
@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
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
