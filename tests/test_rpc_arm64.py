"""Cross-compile for aarch64 Linux and Android, deploy over TVM RPC to an emulated aarch64 device
(qemu-user, scripts/emulated_arm64.py), and check numerics, timing, NEON code and error paths.

The device is set up on first use (apt-get + downloads, ~30 s cold, cached after). Without a way
to set it up (no root apt-get, no network) the device tests are skipped, except under CI=true,
where they fail.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program
from tvm.rpc import base as rpc_base

from tvm_sparse.rpc import RPCError, benchmark_remote, connect, run_remote
from tvm_sparse.targets import host_cpu
from tvm_sparse.targets import resolve_target as target_for
from tvm_sparse.toolchain import ToolchainError, export_library, find_linker

ROOT = Path(__file__).resolve().parents[1]
RTOL = ATOL = 1e-4  # float32 on both sides; only the summation order differs
FAST_S = 5.0  # an error path must answer within this


def _load_emulator():
    spec = importlib.util.spec_from_file_location(
        "emulated_arm64", ROOT / "scripts/emulated_arm64.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


emu = _load_emulator()


class ConvReluLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def model() -> tuple[tvm.IRModule, np.ndarray, np.ndarray]:
    """(Relax module, input NCHW 1x3x8x8, PyTorch's output 1x10)."""
    torch.manual_seed(0)
    net, x = ConvReluLinear().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    mod = from_exported_program(torch.export.export(net, (x,)), unwrap_unit_return_tuple=True)
    return mod, x.numpy(), ref


@pytest.fixture(scope="session")
def device():
    """A tracker on a free port with one emulated aarch64 server under key "emulated-arm64"."""
    try:
        emu.setup(binfmt=False, quiet=True)  # the in-process server needs no binfmt_misc
    except emu.SetupError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot set up the emulated aarch64 device here: {err}")
    handle = emu.start(emu.free_port(), "emulated-arm64", quiet=True)
    yield handle
    handle.stop()


# ------------------------------------------------------------------------------ targets, linkers


def test_target_for_names() -> None:
    arm = target_for("arm64")
    assert str(arm.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert list(arm.attrs["mattr"]) == ["+neon"]
    assert str(target_for("android").attrs["mtriple"]) == "aarch64-linux-android"
    x86 = target_for("x86")
    assert int(x86.attrs["num-cores"]) == os.cpu_count()
    assert str(x86.attrs.get("mcpu", "")) == host_cpu()
    assert target_for(arm) is arm
    with pytest.raises(ValueError, match="unknown target"):
        target_for("riscv")


def test_arm64_code_uses_neon(model) -> None:
    mod, _, _ = model
    executable = tvm.compile(mod, target=target_for("arm64"))
    llvm = [m for m in executable.mod._collect_dso_modules() if m.kind == "llvm"]
    asm = llvm[0].inspect_source("asm")
    assert re.search(r"\bfmla\s+v\d+\.4s", asm), "no NEON fused multiply-add (fmla v.4s)"


def test_x86_export_runs_locally(model, tmp_path) -> None:
    mod, x, ref = model
    path = export_library(tvm.compile(mod, target=target_for("x86")), tmp_path / "m.so")
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_missing_toolchain_names_what_to_install(model, tmp_path, monkeypatch) -> None:
    empty = str(tmp_path)  # a PATH with no compiler on it
    for var in ("TVM_NDK_CC", "ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ToolchainError, match="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        find_linker("arm64", path=empty)
    with pytest.raises(ToolchainError, match="TVM_NDK_CC.*clang lld"):
        find_linker("android", path=empty)
    with pytest.raises(ToolchainError, match="apt-get install -y gcc"):
        find_linker("x86", path=empty)
    executable = tvm.compile(model[0], target=target_for("arm64"))
    with pytest.raises(ToolchainError):
        export_library(executable, tmp_path / "m.so", linker_path=empty)


def test_ndk_compiler_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TVM_NDK_CC", "/opt/ndk/bin/aarch64-linux-android29-clang")
    assert find_linker("android").cc == "/opt/ndk/bin/aarch64-linux-android29-clang"
    monkeypatch.delenv("TVM_NDK_CC")
    bin_dir = tmp_path / "toolchains/llvm/prebuilt/linux-x86_64/bin"
    bin_dir.mkdir(parents=True)
    for api in (21, 24, 33):
        (bin_dir / f"aarch64-linux-android{api}-clang").touch()
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    assert find_linker("android").cc.endswith("aarch64-linux-android33-clang")


# ------------------------------------------------------------------------- the emulated device


@pytest.mark.parametrize("name", ["arm64", "android"])
def test_deploy_and_time_on_emulated_device(device, model, tmp_path, name) -> None:
    mod, x, ref = model
    executable = tvm.compile(mod, target=target_for(name))
    lib = export_library(executable, tmp_path / f"{name}.so")
    assert lib.read_bytes()[18] == 0xB7, "not an aarch64 ELF (e_machine EM_AARCH64)"
    with connect(tracker=device.tracker, key=device.key) as remote:
        (out,) = run_remote(lib, [x], remote)
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
        (out,) = run_remote(executable, [x], remote)  # linked on the fly for its own target
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
        ms = benchmark_remote(lib, [x], remote, number=2, repeat=3)
    assert math.isfinite(ms) and ms > 0


def test_unreachable_tracker_fails_fast() -> None:
    port = emu.free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RPCError, match=f"cannot reach RPC tracker 127.0.0.1:{port}"):
        connect(tracker=f"127.0.0.1:{port}", key="emulated-arm64", timeout=2)
    with pytest.raises(RPCError, match=f"RPC server 127.0.0.1:{port}"):
        connect(host="127.0.0.1", port=port, timeout=2)
    assert time.monotonic() - t0 < FAST_S


def test_silent_peer_times_out() -> None:
    with socket.socket() as sock:  # accepts connections, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(RPCError, match=f"RPC server 127.0.0.1:{port}: no answer within 1 s"):
            connect(host="127.0.0.1", port=port, timeout=1)
        with pytest.raises(RPCError, match=f"127.0.0.1:{port}: no answer to the handshake"):
            connect(tracker=f"127.0.0.1:{port}", key="k", timeout=1)
        assert time.monotonic() - t0 < FAST_S


def test_wrong_key_names_the_registered_keys(device) -> None:
    t0 = time.monotonic()
    with pytest.raises(RPCError, match=r"no device under key 'pixel-9'.*emulated-arm64"):
        connect(tracker=device.tracker, key="pixel-9", timeout=5)
    assert time.monotonic() - t0 < FAST_S


def test_busy_device_times_out(device) -> None:
    with connect(tracker=device.tracker, key=device.key):
        t0 = time.monotonic()
        with pytest.raises(RPCError, match="became free within 1 s"):
            connect(tracker=device.tracker, key=device.key, timeout=1)
        assert time.monotonic() - t0 < FAST_S


def test_dead_device_still_listed_by_tracker(device) -> None:
    """A device that died without the tracker noticing: the tracker hands out a dead address."""
    dead_port = emu.free_port()
    host, port = device.host, device.tracker_port
    with socket.create_connection((host, port), timeout=5) as sock:  # register like a server
        sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
        rpc_base.recvall(sock, 4)
        info = {"key": "server:ghost", "addr": [None, dead_port]}
        put = [rpc_base.TrackerCode.PUT, "ghost", [dead_port, "ghost:0.1"], None]
        for msg in ([rpc_base.TrackerCode.UPDATE_INFO, info], put):
            rpc_base.sendjson(sock, msg)
            assert rpc_base.recvjson(sock) == rpc_base.TrackerCode.SUCCESS
        t0 = time.monotonic()
        with pytest.raises(RPCError, match=rf"key 'ghost' \(device 127.0.0.1:{dead_port}\)"):
            connect(tracker=device.tracker, key="ghost", timeout=5)
        assert time.monotonic() - t0 < FAST_S


def test_emulator_records_its_processes(device) -> None:
    recorded = {h.tracker_port: h for h in emu.running()}
    assert device.tracker_port in recorded
    assert recorded[device.tracker_port].server_pid == device.server_pid
    assert device.alive()
    assert emu.tracker_keys(device.tracker_port)[device.key]["free"] >= 0


# ------------------------------------------------------------ tvm-sparse models on the device
@pytest.mark.parametrize("target", ["arm64", "android"])
def test_pattern_sparse_model_runs_on_the_device(device, target, tmp_path) -> None:
    """The sparse kernels (NEON, 4 lanes) cross-compiled, exported, deployed, vs PyTorch."""
    import tvm_sparse
    from tvm_sparse.models import resnet18
    from tvm_sparse.rpc import benchmark_remote, connect, run_remote
    from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_

    torch.manual_seed(0)
    net = randomize_batchnorm_(pattern_prune_model_(resnet18(num_classes=10, width=8))).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    cm = tvm_sparse.compile(net, (x,), target=target)
    assert sum(r.format == "pattern" for r in cm.layers) == 16
    with pytest.raises(tvm_sparse.InputError, match="run it on the device"):
        cm(x)
    path = cm.export(tmp_path / "r18.so")
    with connect(tracker=device.tracker, key=device.key) as remote:
        (got,) = run_remote(str(path), [x], remote)
        assert benchmark_remote(str(path), [x], remote, repeat=2) > 0
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))


def test_block_sparse_encoder_runs_on_the_device(device, tmp_path) -> None:
    """A 16x1-block-pruned Transformer encoder (BSR linears over tokens, fused attention, fused
    LayerNorm, NEON) cross-compiled for aarch64 and deployed, vs PyTorch."""
    import tvm_sparse
    from tvm_sparse.testing import block_prune_model_

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    block_prune_model_(net, keep=0.3, block=(16, 1))
    x = np.random.default_rng(0).standard_normal((1, 13, 64)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    cm = tvm_sparse.compile(net, (x,), target="arm64")
    ops = {(r.op, r.format) for r in cm.layers}
    assert {("matmul", "bsr"), ("attention", "dense")} <= ops
    path = cm.export(tmp_path / "encoder.so")
    with connect(tracker=device.tracker, key=device.key) as remote:
        (got,) = run_remote(str(path), [x], remote)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))


def test_block_sparse_gru_runs_on_the_device(device, tmp_path) -> None:
    """A 2-layer GRU whose W_hh keeps 20 % of 8x8 blocks (ONNX: one recurrence kernel per
    layer, BSR W_hh, NEON) cross-compiled for aarch64 and deployed, vs PyTorch."""
    import onnx

    import tvm_sparse
    from tvm_sparse.benchmarking import onnx_bytes
    from tvm_sparse.sequence_models import recurrent_model

    net, x = recurrent_model("GRU", 0.2, features=7, hidden=40, steps=9, batch=2)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    cm = tvm_sparse.compile(onnx.load_from_string(onnx_bytes(net, (x,))), (x,), target="arm64")
    assert [r.format for r in cm.layers if r.op == "gru"] == ["bsr 8x8"] * 2
    path = cm.export(tmp_path / "gru.so")
    with connect(tracker=device.tracker, key=device.key) as remote:
        (got,) = run_remote(str(path), [x], remote)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL * max(1.0, np.abs(ref).max()))


def test_cli_run_on_the_device(device, tmp_path) -> None:
    from tvm_sparse.benchmarking import onnx_bytes
    from tvm_sparse.models import resnet18
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(1)
    net = pattern_prune_model_(resnet18(num_classes=10, width=8)).eval()
    onnx_path = tmp_path / "r.onnx"
    onnx_path.write_bytes(onnx_bytes(net, (np.zeros((1, 3, 32, 32), "float32"),)))
    res = subprocess.run(
        [sys.executable, "-m", "tvm_sparse.cli", "bench", str(onnx_path), "--rpc",
         device.tracker, "--key", device.key, "--repeat", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "max |device - host|" in res.stdout and "median" in res.stdout


# ------------------------------------------------------------------------------ tuning over RPC
def test_tuning_on_the_device_then_deploy(device, tmp_path) -> None:
    """MetaSchedule measures cross-compiled candidates on the device (RPC runner, real index
    arrays); the tuned build, deployed there, matches PyTorch."""
    import tvm_sparse
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
    net = pattern_prune_model_(net, kernel_keep=0.5).eval()
    x = np.random.default_rng(2).standard_normal((1, 8, 12, 12)).astype("float32")
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    work = tmp_path / "tuned"
    result = tvm_sparse.tune(net, (x,), target="arm64", trials=3, work_dir=str(work),
                             rpc=device.tracker, key=device.key, tvm_kernels=False,
                             min_task_trials=3, progress=False)  # fmt: skip
    (task,) = result.tasks
    assert task.template and task.trials >= 2 and task.best_ms and task.best_ms > 0
    cm = tvm_sparse.compile(net, (x,), target="arm64", tuning=str(work))
    path = cm.export(tmp_path / "tuned.so")
    with connect(tracker=device.tracker, key=device.key) as remote:
        (got,) = run_remote(str(path), [x], remote)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
