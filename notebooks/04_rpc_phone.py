# %% [markdown]
# # 04 · Run on a phone over RPC
#
# tvm-sparse cross-compiles for `"arm64"` (aarch64 Linux) and `"android"` (aarch64 Android), links
# the library for the device (`tvm_sparse.toolchain`), and runs and times it there over TVM RPC
# (`tvm_sparse.rpc`). Devices are found through an **RPC tracker** under a **key**: the tracker
# keeps a queue of free devices per key, and a client asks it for "a free device under key
# `android`".
#
# ## With a real Android phone
#
# On the host (the machine with this notebook):
#
# ```bash
# python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190      # keep it running
# ```
#
# On the phone: build and install TVM's RPC app (`apps/android_rpc` in the TVM sources:
# `gradle clean build`, sign the APK, `adb install`), open it, set **Address** to the host's IP
# (phone and host on the same network), **Port** `9190`, **Key** `android`, and press
# **START RPC**. Check on the host that the tracker lists it:
#
# ```bash
# python -m tvm.exec.query_rpc_tracker --host 127.0.0.1 --port 9190   # "android  1  1  0"
# ```
#
# Then tell tvm-sparse which linker to use (the NDK's clang for your API level) and where the
# device is, and run this notebook (or the CLI):
#
# ```bash
# NDK_BIN=$ANDROID_NDK_HOME/toolchains/llvm/prebuilt/linux-x86_64/bin
# export TVM_NDK_CC=$NDK_BIN/aarch64-linux-android24-clang           # the linker (API level 24)
# export TVM_TRACKER=127.0.0.1:9190 TVM_KEY=android    # read by this notebook
# jupyter nbconvert --to notebook --execute --inplace notebooks/04_rpc_phone.ipynb
# tvm-sparse bench model.onnx --target android --rpc 127.0.0.1:9190 --key android
# ```
#
# (`TVM_TARGET=arm64` makes the notebook compile for aarch64 Linux instead, e.g. for a board
# such as a Raspberry Pi running `python -m tvm.exec.rpc_server --tracker HOST:9190 --key pi`.)
#
# ## Without a phone: the emulated aarch64 device
#
# `scripts/emulated_arm64.py` runs a TVM RPC server in an aarch64 Python under qemu-user,
# registered with a local tracker: the same workflow, on any Linux x86-64 machine with apt
# (`setup()` installs what is missing, cached; CI runs it). When neither a phone
# (`TVM_TRACKER` / `TVM_KEY` unset) nor the emulator is available, the cells below say so and
# skip.

# %%
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
from tvm_sparse.testing import notebook_quick, pattern_prune_model_, randomize_batchnorm_

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecations
QUICK = notebook_quick()  # TVM_SPARSE_NB_QUICK=1 (set by the tests): smaller budgets
ROOT = Path(tvm_sparse.__file__).resolve().parents[1]

# %%
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

# %% [markdown]
# ## Compile for the device
#
# A small pattern-pruned ResNet-18 (width 8, 32x32 input). A model compiled for the device cannot
# run on the host; `export` links it with the device's linker (aarch64 gcc, clang + lld, or the
# NDK's clang from `TVM_NDK_CC`). The same model is compiled for the host, to compare.

# %%
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

# %% [markdown]
# ## Run and time it there
#
# `run_remote` uploads the library, loads it in a Relax VM on the device and returns the outputs;
# `benchmark_remote` times it on the device with the VM's `time_evaluator`. Under qemu-user the
# device timing measures the emulator, not an ARM core: it shows the workflow, not the speed.

# %%
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

# %% [markdown]
# On a real device, the dense build of the same weights is the baseline to beat (skipped on the
# emulator, where the timings mean nothing):

# %%
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

# %% [markdown]
# ## Tuning over RPC
#
# Untuned, every kernel gets its configuration from `default_config` + `tile_defaults` (on
# aarch64: 4-lane NEON vectors and up to 28 accumulator registers; see notebook 02 for that space
# on the host). `tvm_sparse.tune` searches those knobs with MetaSchedule; given a tracker and
# key, it measures the candidates on the devices registered there:
#
# ```python
# tvm_sparse.tune(model, (x,), target="android", rpc="HOST:9190", key="android",
#                 work_dir="tuned-phone/")
# cm = tvm_sparse.compile(model, (x,), target="android", tuning="tuned-phone/")
# ```
#
# (README, "Tune"). From the command line:
#
# ```bash
# tvm-sparse tune model.onnx --target android --rpc 127.0.0.1:9190 --key android \
#     --work-dir tuned-phone/
# ```
#
# Not run here: on the emulated device the measurements would time qemu, not an ARM core.

# %%
if emulator is not None:
    emulator.stop()
    print("emulated device stopped")
if HAVE_DEVICE:
    workdir.cleanup()
