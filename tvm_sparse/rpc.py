"""Run and time compiled models on a remote device over TVM RPC (a phone, a board, an emulator).

    remote = connect(tracker="127.0.0.1:9190", key="android")   # or connect(host=..., port=...)
    outputs = run_remote(executable, [x], remote)               # list of numpy arrays
    ms = benchmark_remote(executable, [x], remote)              # median ms per run

An executable from `tvm.compile` is linked for its own target by `tvm_sparse.toolchain`, uploaded,
loaded and run by `relax.VirtualMachine(lib, remote.cpu())`. Every failure to reach or use the
device (unreachable tracker, unknown key, no free device, dead server, a remote error) raises
`RPCError` naming the address/key and the step that failed; connecting never waits longer than
`timeout` seconds.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tvm
from tvm import relax
from tvm.rpc import base as _base

from tvm_sparse import toolchain
from tvm_sparse.errors import InputError, TvmSparseError

__all__ = [
    "RPCError",
    "RemoteDevice",
    "benchmark_remote",
    "connect",
    "load_vm",
    "run_remote",
    "to_numpy",
]

T = TypeVar("T")


class RPCError(TvmSparseError, RuntimeError):
    """A remote device could not be reached or failed; the message names it and the step."""


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"expected an RPC address as host:port, got {addr!r}")
    return host, int(port)


def _with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run fn() in a daemon thread; RPCError if it raises or takes longer than `timeout` s."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = fn()
        except Exception as err:  # re-raised below with context
            result["error"] = err

    thread = threading.Thread(target=work, daemon=True, name=f"tvm-sparse-rpc: {what}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RPCError(f"{what}: no answer within {timeout:g} s")
    if "error" in result:
        err = result["error"]
        raise RPCError(f"{what}: {_first_line(err)}") from err
    return result["value"]


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    # TVM errors put the message last, after a traceback.
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".strip()


def _tracker_request(host: str, port: int, key: str, timeout: float) -> tuple[str, int, str]:
    """Ask the tracker for a free device under `key`: (host, port, match key)."""
    where = f"RPC tracker {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise RPCError(f"cannot reach {where}: {err.strerror or err}") from err
    servers: list[str] = []  # keys of the registered devices, one entry per device
    step = "handshake"
    with sock:
        try:
            sock.sendall(struct.pack("<i", _base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", _base.recvall(sock, 4))[0] != _base.RPC_TRACKER_MAGIC:
                raise RPCError(f"{host}:{port} is not a TVM RPC tracker")
            step = "summary"
            _base.sendjson(sock, [_base.TrackerCode.SUMMARY])
            _, summary = _base.recvjson(sock)
            servers += [s["key"].split(":", 1)[-1] for s in summary.get("server_info", [])]
            if key not in servers:
                known = sorted(set(servers))
                raise RPCError(
                    f"{where} has no device under key {key!r} (registered keys: {known or 'none'})"
                )
            step = "request"
            _base.sendjson(sock, [_base.TrackerCode.REQUEST, key, "", 1])
            code, value = _base.recvjson(sock)
        except TimeoutError as err:
            if step == "request":
                msg = (
                    f"none of the {servers.count(key)} device(s) under key {key!r} became free "
                    f"within {timeout:g} s (is another session still open?)"
                )
            else:
                msg = f"no answer to the {step} within {timeout:g} s (is it a TVM RPC tracker?)"
            raise RPCError(f"{where}: {msg}") from err
        except (OSError, ValueError, struct.error) as err:
            raise RPCError(f"{where} failed in the {step} for key {key!r}: {err}") from err
    if code != _base.TrackerCode.SUCCESS:
        raise RPCError(f"{where} refused the request for key {key!r}: {value}")
    url, dev_port, matchkey = value
    return url, int(dev_port), matchkey


class RemoteDevice:
    """An open RPC session to one device; use as a context manager or call `close()`."""

    def __init__(self, session: tvm.rpc.RPCSession, address: str) -> None:
        self.session = session
        self.address = address  # e.g. "127.0.0.1:9190 key 'android' (device 127.0.0.1:9091)"

    def cpu(self) -> tvm.runtime.Device:
        """The remote CPU device."""
        return self.session.cpu(0)

    def upload(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a local file to the device's work dir; returns its remote name."""
        name = name or Path(path).name
        self._call(f"upload {path}", lambda: self.session.upload(str(path), name))
        return name

    def load_module(self, name: str) -> tvm.runtime.Module:
        """Load an uploaded shared library on the device."""
        return self._call(f"load_module {name}", lambda: self.session.load_module(name))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as err:  # TVM raises RPC failures as assorted RuntimeErrors
            raise RPCError(f"{what} on {self.address} failed: {_first_line(err)}") from err

    def close(self) -> None:
        """End the session (the device goes back to the tracker's free pool)."""
        self.session = None  # the session closes when its last reference goes:
        gc.collect()  # remote modules, VMs and tensors caught in reference cycles included

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteDevice({self.address})"


def connect(
    tracker: str | None = None,
    key: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    timeout: float = 30.0,
    session_timeout: float = 0.0,
) -> RemoteDevice:
    """Open a session: through a tracker ("host:port" + key) or directly (host, port[, key]).

    `timeout` bounds each connection step (seconds); `session_timeout` > 0 makes the server end
    the session after that many seconds (0: never).
    """
    if tracker is not None:
        if not key:
            raise InputError("connect(tracker=...) needs the device key, e.g. key='android'")
        t_host, t_port = split_addr(tracker)
        url, dev_port, matchkey = _tracker_request(t_host, t_port, key, timeout)
        address = f"tracker {t_host}:{t_port} key {key!r} (device {url}:{dev_port})"
    elif host is not None and port is not None:
        url, dev_port, matchkey = host, int(port), key or ""
        address = f"RPC server {host}:{port}"
    else:
        raise InputError("connect() needs tracker='host:port' and key, or host= and port=")
    session = _with_timeout(
        lambda: tvm.rpc.connect(url, dev_port, matchkey, session_timeout),
        timeout,
        f"connecting to {address}",
    )
    return RemoteDevice(session, address)


Lib = str | os.PathLike | Any  # a path to a shared library, or an executable from tvm.compile


def load_vm(
    lib: Lib, remote: RemoteDevice, target: str | tvm.target.Target | None
) -> relax.VirtualMachine:
    """Upload `lib` (linking it first if it is an executable) and open a VM on the remote CPU."""
    with tempfile.TemporaryDirectory(prefix="tvm-sparse-rpc-") as tmp:
        if isinstance(lib, str | os.PathLike):
            path = Path(lib)
        else:
            path = toolchain.export_library(lib, Path(tmp) / "model.so", target)
        # A unique remote name: re-uploading over a library the device has loaded (mmapped)
        # corrupts it, and dlopen of the same path returns the stale handle.
        name = remote.upload(path, f"{path.stem}-{uuid.uuid4().hex[:12]}{path.suffix}")
    rlib = remote.load_module(name)
    return remote._call(
        "creating a VirtualMachine", lambda: relax.VirtualMachine(rlib, remote.cpu())
    )


def to_numpy(value: Any) -> list[np.ndarray]:
    """A VM's output (a tensor or nested tuples of them, here or remote) as numpy arrays."""
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    if isinstance(value, Sequence):  # tvm_ffi's Array is a Sequence
        return [arr for item in value for arr in to_numpy(item)]
    raise TypeError(f"unexpected VM output of type {type(value).__name__}")


def run_remote(
    lib: Lib,
    inputs: Sequence[np.ndarray],
    remote: RemoteDevice,
    *,
    func: str = "main",
    target: str | tvm.target.Target | None = None,
) -> list[np.ndarray]:
    """Run `func` of `lib` on the device with `inputs`; its outputs (flattened) as numpy arrays.

    `target` picks the linker for an executable (default: the target it was compiled for).
    """
    vm = load_vm(lib, remote, target)
    dev = remote.cpu()

    def run() -> list[np.ndarray]:
        args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
        return to_numpy(vm[func](*args))

    return remote._call(f"running {func}", run)


def benchmark_remote(
    lib: Lib,
    inputs: Sequence[np.ndarray],
    remote: RemoteDevice,
    *,
    func: str = "main",
    target: str | tvm.target.Target | None = None,
    number: int = 1,
    repeat: int = 5,
    min_repeat_ms: int = 0,
) -> float:
    """Median over `repeat` measurements of the mean time of `number` runs, in ms, timed on
    the device by the VM's `time_evaluator` (one warm-up run is discarded)."""
    vm = load_vm(lib, remote, target)
    dev = remote.cpu()

    def bench() -> float:
        args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
        timer = vm.time_evaluator(func, dev, number=number, repeat=repeat,
                                  min_repeat_ms=min_repeat_ms)  # fmt: skip
        return float(np.median(timer(*args).results)) * 1e3

    return remote._call(f"timing {func}", bench)
