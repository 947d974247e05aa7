#!/usr/bin/env python3
"""An emulated aarch64 TVM RPC device (qemu-user), for tests, CI and use by hand.

    python scripts/emulated_arm64.py setup                      # idempotent, cached
    python scripts/emulated_arm64.py start --tracker-port 9190 --key arm64
    python scripts/emulated_arm64.py status
    python scripts/emulated_arm64.py stop [--tracker-port 9190]

`setup` installs (apt-get, only what is missing) Debian's qemu-user-static and the cross
linkers (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, clang, lld), builds an arm64 Python 3.11
userland from Debian's arm64 .debs (a private apt state dir, download only, `dpkg-deb -x`) and
installs aarch64 wheels of TVM's runtime into it. Everything lives under the cache dir:
$TVM_SPARSE_ARM64_CACHE, else ~/.cache/tvm-sparse/arm64.

`start` runs `python -m tvm.exec.rpc_tracker` on 127.0.0.1 (host Python) and an emulated
aarch64 RPC server registered with it under the key, each in its own session (setsid) so that
`stop` ends the whole process group. PIDs are recorded in <cache>/run/<port>.json, logs beside.
The default server runs in-process (a listener thread + one forked child per session, no exec):
it needs no binfmt_misc and outlives a crashed session. `--mode stock` runs the stock
`tvm.exec.rpc_server`, which exec()s an aarch64 worker and so needs binfmt_misc; `setup` tries to
register qemu-aarch64 there (root, `mount -t binfmt_misc`) and says whether that worked.

From Python (pytest fixtures):

    import emulated_arm64 as emu
    emu.setup()
    with emu.start(tracker_port=9190, key="arm64") as dev:
        ...  # dev.tracker == "127.0.0.1:9190", dev.key == "arm64"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the layout of the cache changes: a stale cache is rebuilt.
CACHE_VERSION = 1
HOST_PACKAGES = {
    # apt package -> a file that proves it is installed
    "qemu-user-static": "/usr/bin/qemu-aarch64-static",
    "gcc-aarch64-linux-gnu": "/usr/bin/aarch64-linux-gnu-gcc",
    "libc6-dev-arm64-cross": "/usr/aarch64-linux-gnu/lib/crti.o",
    "clang": "/usr/bin/clang",
    "lld": "/usr/bin/ld.lld",
}
ARM64_DEBS = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1"]
ARM64_WHEELS = [
    "apache-tvm==0.27.0.post1",
    # 0.1.15 segfaults when pickling IR; keep the device on the host's version.
    "apache-tvm-ffi==0.1.14.post1",
    "numpy",
    "ml_dtypes",
    "typing_extensions",
    "cloudpickle",
    "psutil",
]
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
QEMU = "/usr/bin/qemu-aarch64-static"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# qemu's scripts/qemu-binfmt-conf.sh values for aarch64 ELF executables; flag F opens the
# interpreter at registration time, so it works from any mount namespace.
BINFMT_ENTRY = (
    ":qemu-aarch64:M::"
    r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:"
    r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:"
    f"{QEMU}:F"
)
# The stock server hands each session to an exec()ed worker (needs binfmt_misc), and its listener
# thread dies for good when one session crashes. This one serves from its own process (a thread
# listens, each session is a forked child, no exec) and survives a crashed session.
INPROCESS_SERVER = """
import os, sys
from tvm.rpc import server
host, port, port_end, tracker, key = sys.argv[1:6]
serve_one = server._serving
def _serving(sock, addr, opts, load_library):
    cwd = os.getcwd()
    try:
        serve_one(sock, addr, opts, load_library)
    except Exception as err:
        server.logger.warning("session from %s failed (%s); serving on", addr, err)
        os.chdir(cwd)
        sock.close()
server._serving = _serving
th, tp = tracker.rsplit(":", 1)
state = server.PopenRPCServerState(
    host, int(port), int(port_end), tracker_addr=(th, int(tp)), key=key
)
print(f"in-process rpc server on {host}:{state.port}, key {key}", flush=True)
state.thread.join()
"""


class SetupError(RuntimeError):
    """The emulated device cannot be set up or started on this machine."""


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache dir: `cache`, else $TVM_SPARSE_ARM64_CACHE, else ~/.cache/tvm-sparse/arm64."""
    if cache is None:
        cache = os.environ.get("TVM_SPARSE_ARM64_CACHE") or Path.home() / ".cache/tvm-sparse/arm64"
    return Path(cache).expanduser().resolve()


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[emulated_arm64] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SetupError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


# ----------------------------------------------------------------------------------------- setup


def missing_host_packages() -> list[str]:
    """Debian packages among HOST_PACKAGES that are not installed."""
    return [pkg for pkg, probe in HOST_PACKAGES.items() if not Path(probe).exists()]


def install_host_packages(quiet: bool = False) -> None:
    """apt-get install what is missing of HOST_PACKAGES (needs root and apt-get)."""
    missing = missing_host_packages()
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SetupError(
            "missing host packages and no root apt-get to install them; run as root: "
            f"apt-get install -y --no-install-recommends {' '.join(missing)}"
        )
    _log(f"apt-get install {' '.join(missing)}", quiet)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
        # Most often the package lists are stale or were never fetched.
        _run(["apt-get", "update", "-q"], "apt-get update", env=env)
        _run(cmd, "apt-get install", env=env)


def _apt_arm64_options(apt_dir: Path) -> list[str]:
    opts = {
        "Dir::State": apt_dir / "state",
        "Dir::State::status": apt_dir / "state/status",
        "Dir::Cache": apt_dir / "cache",
        "Dir::Cache::archives": apt_dir / "cache/archives",
        "APT::Architecture": "arm64",
        "APT::Architectures": "arm64",
        "Debug::NoLocking": "1",
        "APT::Install-Recommends": "0",
    }
    return [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]


def build_rootfs(cache: Path, quiet: bool = False) -> Path:
    """An arm64 Python 3.11 userland in <cache>/rootfs from Debian arm64 .debs (no root needed)."""
    rootfs, stamp = cache / "rootfs", cache / "rootfs/.tvm-sparse-done"
    if stamp.exists() and stamp.read_text() == json.dumps([CACHE_VERSION, ARM64_DEBS]):
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    (cache / ".probe-done").unlink(missing_ok=True)
    apt_dir = cache / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "state/status").touch()
    opts = _apt_arm64_options(apt_dir)
    _log("apt-get update (arm64, private state dir)", quiet)
    _run(["apt-get", *opts, "update", "-q"], "apt-get update for arm64")
    _log(f"apt-get --download-only {' '.join(ARM64_DEBS)} (arm64)", quiet)
    _run(
        ["apt-get", *opts, "install", "-y", "-q", "--download-only", *ARM64_DEBS],
        "downloading arm64 .debs",
    )
    debs = sorted((apt_dir / "cache/archives").glob("*_arm64.deb"))
    debs += sorted((apt_dir / "cache/archives").glob("*_all.deb"))
    rootfs.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(rootfs)], f"extracting {deb.name}")
    if not (rootfs / "usr/bin/python3.11").exists():
        raise SetupError(f"no usr/bin/python3.11 in {rootfs} after extracting {len(debs)} .debs")
    stamp.write_text(json.dumps([CACHE_VERSION, ARM64_DEBS]))
    return rootfs


def install_wheels(cache: Path, quiet: bool = False) -> Path:
    """aarch64 wheels (TVM runtime and friends) installed into <cache>/site."""
    site, stamp = cache / "site", cache / "site/.tvm-sparse-done"
    if stamp.exists() and stamp.read_text() == json.dumps([CACHE_VERSION, ARM64_WHEELS]):
        return site
    shutil.rmtree(site, ignore_errors=True)
    (cache / ".probe-done").unlink(missing_ok=True)
    wheels = cache / "wheels"
    tags = [f"--platform={p}" for p in WHEEL_PLATFORMS]
    tags += ["--python-version=3.11", "--implementation=cp", "--only-binary=:all:", "--no-deps"]
    tags += ["--abi=cp311", "--abi=abi3", "--abi=none"]
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _log(f"pip download (aarch64) {' '.join(ARM64_WHEELS)}", quiet)
    _run([*pip, "download", *tags, "--dest", str(wheels), *ARM64_WHEELS], "pip download")
    _run(
        [*pip, "install", *tags, "--no-index", "--find-links", str(wheels), "--target", str(site)]
        + ARM64_WHEELS,
        "pip install --target",
    )
    stamp.write_text(json.dumps([CACHE_VERSION, ARM64_WHEELS]))
    return site


def binfmt_registered() -> bool:
    """Whether the kernel runs aarch64 ELF binaries through qemu (binfmt_misc)."""
    for entry in BINFMT_DIR.glob("*aarch64*") if BINFMT_DIR.is_dir() else []:
        with contextlib.suppress(OSError):
            if entry.read_text().startswith("enabled"):
                return True
    return False


def register_binfmt(quiet: bool = False) -> str | None:
    """Try to register qemu-aarch64 with binfmt_misc; None on success, else the reason."""
    if binfmt_registered():
        return None
    try:
        if not (BINFMT_DIR / "register").exists():
            _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], "mount")
        (BINFMT_DIR / "register").write_text(BINFMT_ENTRY)
    except (OSError, SetupError) as err:
        reason = str(err).splitlines()[0]
        _log(f"binfmt_misc unavailable ({reason}): the server will run in-process", quiet)
        return reason
    return None if binfmt_registered() else "registered entry not enabled"


@dataclass
class Device:
    """Paths of a set-up emulated device."""

    cache: Path
    rootfs: Path
    site: Path

    @property
    def python(self) -> Path:
        return self.rootfs / "usr/bin/python3.11"

    def env(self) -> dict[str, str]:
        """Environment of an emulated TVM-runtime Python process."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.site),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "TVM_USE_RUNTIME_LIB": "1",  # the runtime only: no LLVM/compiler on the device
            "QEMU_LD_PREFIX": str(self.rootfs),  # for binaries exec()ed through binfmt_misc
        }

    def command(self, *args: str) -> list[str]:
        """argv running the emulated Python with `args`."""
        return [QEMU, "-L", str(self.rootfs), str(self.python), *args]


def setup(
    cache: str | os.PathLike | None = None, *, binfmt: bool = True, quiet: bool = False
) -> Device:
    """Make the emulated device ready (idempotent; a warm call takes well under a second).

    Raises SetupError when the machine cannot host it (no apt-get/root, no network).
    """
    t0 = time.perf_counter()
    root = cache_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    install_host_packages(quiet)
    dev = Device(root, build_rootfs(root, quiet), install_wheels(root, quiet))
    if binfmt:
        register_binfmt(quiet)
    probe = root / ".probe-done"
    if not probe.exists():
        code = "import tvm, numpy, tvm.rpc.server; print(tvm.__file__, numpy.__version__)"
        out = _run(dev.command("-c", code), "emulated import tvm", env=dev.env()).stdout
        _log(f"emulated Python works: {out.strip()}", quiet)
        probe.write_text(out)
    _log(f"setup done in {time.perf_counter() - t0:.1f} s (cache {root})", quiet)
    return dev


# ----------------------------------------------------------------------------------- processes


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int, token: str) -> bool:
    """Whether `pid` is still the process we started (its argv contains `token`)."""
    try:
        return token in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _kill_group(pid: int, token: str, grace_s: float = 5.0) -> None:
    if not _alive(pid, token):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if not _alive(pid, token):
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # also the forked session workers left behind
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def tracker_keys(tracker_port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict:
    """The tracker's queue info: {key: {"free": n, "pending": m}}."""
    from tvm.rpc import base  # host TVM; imported late so `setup` needs no TVM

    with socket.create_connection((host, tracker_port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        base.recvall(sock, 4)
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        _, summary = base.recvjson(sock)
    return summary["queue_info"]


@dataclass
class Handle:
    """A running tracker + emulated server; `stop()` ends both process groups."""

    tracker_port: int
    key: str
    tracker_pid: int
    server_pid: int
    mode: str  # "stock" (tvm.exec.rpc_server, via binfmt_misc) or "in-process"
    state_file: str
    log_dir: str
    host: str = "127.0.0.1"

    @property
    def tracker(self) -> str:
        """The tracker address as "host:port"."""
        return f"{self.host}:{self.tracker_port}"

    def alive(self) -> bool:
        return _alive(self.tracker_pid, "rpc_tracker") and _alive(self.server_pid, "qemu")

    def stop(self, keep_logs: bool = False) -> None:
        """End both process groups and forget them (logs too, unless `keep_logs`)."""
        _kill_group(self.server_pid, "qemu")
        _kill_group(self.tracker_pid, "rpc_tracker")
        Path(self.state_file).unlink(missing_ok=True)
        if not keep_logs:
            for role in ("tracker", "server"):
                (Path(self.log_dir) / f"{self.tracker_port}.{role}.log").unlink(missing_ok=True)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def start(
    tracker_port: int = 9190,
    key: str = "arm64",
    *,
    cache: str | os.PathLike | None = None,
    mode: str = "in-process",
    timeout: float = 300.0,
    quiet: bool = False,
) -> Handle:
    """Start a tracker on 127.0.0.1:tracker_port and an emulated server registered under `key`.

    Returns once the tracker lists the key with a free server. `mode`: "in-process" (default: see
    INPROCESS_SERVER; needs no binfmt_misc) or "stock" (`python -m tvm.exec.rpc_server`, needs
    binfmt_misc, which `setup` tries to register).
    Raises SetupError if the port is taken or a process dies or does not register in `timeout` s.
    """
    dev = setup(cache, binfmt=False, quiet=True)
    if mode not in ("stock", "in-process"):
        raise ValueError(f"mode must be in-process or stock, not {mode!r}")
    if mode == "stock" and not binfmt_registered() and register_binfmt(quiet):
        raise SetupError("the stock server needs binfmt_misc for qemu-aarch64: use in-process")
    if _port_open(tracker_port):
        raise SetupError(f"port {tracker_port} on 127.0.0.1 is taken (another tracker? `stop`)")
    run_dir = dev.cache / "run"
    run_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tracker_log, server_log = (
        run_dir / f"{tracker_port}.tracker.log",
        run_dir / f"{tracker_port}.server.log",
    )
    tracker_cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1"]
    tracker_cmd += ["--port", str(tracker_port), "--port-end", str(tracker_port + 1)]
    with open(tracker_log, "w") as log:
        tracker = subprocess.Popen(
            tracker_cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    server_port = free_port()
    tracker_addr = f"127.0.0.1:{tracker_port}"
    if mode == "stock":
        args = ["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port)]
        args += ["--port-end", str(server_port + 100), "--tracker", tracker_addr, "--key", key]
    else:
        args = ["-c", INPROCESS_SERVER, "127.0.0.1", str(server_port), str(server_port + 100)]
        args += [tracker_addr, key]
    with open(server_log, "w") as log:
        server = subprocess.Popen(
            dev.command(*args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dev.env(), cwd=run_dir, start_new_session=True,
        )  # fmt: skip
    state_file = run_dir / f"{tracker_port}.json"
    handle = Handle(tracker_port, key, tracker.pid, server.pid, mode, str(state_file), str(run_dir))
    state_file.write_text(json.dumps(asdict(handle), indent=1))
    _log(f"tracker pid {tracker.pid} on {tracker_addr}; server pid {server.pid} ({mode})", quiet)
    deadline = time.monotonic() + timeout
    while True:
        for proc, log in ((tracker, tracker_log), (server, server_log)):
            if proc.poll() is not None:
                handle.stop()
                raise SetupError(f"{proc.args[:3]} exited ({proc.returncode}):\n{_log_tail(log)}")
        with contextlib.suppress(OSError, ValueError, EOFError):
            if tracker_keys(tracker_port).get(key, {}).get("free", 0) > 0:
                break
        if time.monotonic() > deadline:
            handle.stop()
            raise SetupError(
                f"emulated server did not register under key {key!r} with tracker "
                f"{tracker_addr} within {timeout:.0f} s:\n{_log_tail(server_log)}"
            )
        time.sleep(1.0)
    _log(
        f"device registered as {key!r} at {tracker_addr} in {time.perf_counter() - t0:.1f} s", quiet
    )
    return handle


def running(cache: str | os.PathLike | None = None) -> list[Handle]:
    """Handles recorded in the state files of `cache` (dead ones included)."""
    run_dir = cache_dir(cache) / "run"
    return [Handle(**json.loads(p.read_text())) for p in sorted(run_dir.glob("*.json"))]


def stop(tracker_port: int | None = None, cache: str | os.PathLike | None = None) -> int:
    """Stop the recorded devices (all, or the one on `tracker_port`); returns how many."""
    handles = [h for h in running(cache) if tracker_port in (None, h.tracker_port)]
    for handle in handles:
        handle.stop()
    return len(handles)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache dir (default $TVM_SPARSE_ARM64_CACHE or ~/.cache)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_setup = sub.add_parser("setup", help="install and build everything (idempotent)")
    p_setup.add_argument("--no-binfmt", action="store_true", help="do not touch binfmt_misc")
    p_start = sub.add_parser("start", help="start tracker + emulated server, wait until registered")
    p_start.add_argument("--tracker-port", type=int, default=9190)
    p_start.add_argument("--key", default="arm64")
    p_start.add_argument("--mode", choices=["in-process", "stock"], default="in-process")
    p_start.add_argument("--timeout", type=float, default=300.0)
    p_stop = sub.add_parser("stop", help="stop recorded devices")
    p_stop.add_argument("--tracker-port", type=int)
    sub.add_parser("status", help="list recorded devices and the tracker's keys")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "setup":
            t0 = time.perf_counter()
            dev = setup(args.cache, binfmt=not args.no_binfmt)
            print(f"setup: {time.perf_counter() - t0:.1f} s, rootfs {dev.rootfs}")
            print(f"binfmt_misc: {'registered' if binfmt_registered() else 'not available'}")
        elif args.cmd == "start":
            h = start(args.tracker_port, args.key, cache=args.cache, mode=args.mode,
                      timeout=args.timeout)  # fmt: skip
            print(json.dumps(asdict(h), indent=1))
        elif args.cmd == "stop":
            print(f"stopped {stop(args.tracker_port, args.cache)} device(s)")
        else:
            handles = running(args.cache)
            for h in handles:
                state = "running" if h.alive() else "dead"
                keys = ""
                if state == "running":
                    with contextlib.suppress(Exception):
                        keys = f" queue={tracker_keys(h.tracker_port)}"
                print(f"{h.tracker} key={h.key} mode={h.mode} {state} "
                      f"pids={h.tracker_pid},{h.server_pid}{keys}")  # fmt: skip
            if not handles:
                print("no device recorded")
            print(f"binfmt_misc: {'registered' if binfmt_registered() else 'not available'}")
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
