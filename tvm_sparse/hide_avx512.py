"""Run a process as if its x86 CPU had no AVX-512, to compare an AVX2 build on an AVX-512 host.

ONNX Runtime (MLAS) and numpy pick their kernels from CPUID and have no switch that caps the
ISA. `native/hide_avx512.c`, preloaded (``LD_PRELOAD``), turns on Linux's CPUID faulting and
answers every CPUID with the AVX-512 and AVX-VNNI feature bits cleared, so those runtimes take
their AVX2 paths. Only what CPUID reports changes; the AVX-512 instructions still execute.

    env = hide_avx512.environment(os.environ)     # builds the library once, cached
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ...
    hide_avx512.answered()                        # CPUID instructions answered so far, or None

Needs x86-64 Linux with CPUID faulting (``arch_prctl(ARCH_SET_CPUID)``: Intel since Ivy
Bridge, AMD Zen 4+ and KVM guests) and a C compiler; `unavailable()` says which is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .toolchain import ToolchainError, host_linker

__all__ = ["SOURCE", "answered", "environment", "host_has_avx512", "library", "unavailable"]

SOURCE = Path(__file__).with_name("native") / "hide_avx512.c"
_SYS_ARCH_PRCTL, _ARCH_SET_CPUID = 158, 0x1012


def host_has_avx512() -> bool:
    """Whether the kernel reports AVX-512F for this machine (``/proc/cpuinfo``, which the
    library does not change)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(ln.startswith("flags") and " avx512f" in ln for ln in f)
    except OSError:
        return False


def unavailable() -> str | None:
    """Why AVX-512 cannot be hidden here (None when it can): not x86-64 Linux, or no CPUID
    faulting. Setting CPUID to "enabled" is what every thread already has, so the probe
    changes nothing."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        here = f"{platform.system()} {platform.machine()}"
        return f"CPUID faulting is x86-64 Linux only (this is {here})"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_SET_CPUID, 1) != 0:
        return f"this kernel or CPU has no CPUID faulting ({os.strerror(ctypes.get_errno())})"
    return None


def library(cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled library, built with the host C compiler on first use. Cached under
    ``cache_dir`` (default $TVM_SPARSE_CACHE or ~/.cache/tvm-sparse) by the source's hash;
    written to a temporary name and renamed, so concurrent builds never see half a file."""
    source = SOURCE.read_bytes()
    default = os.environ.get("TVM_SPARSE_CACHE") or Path.home() / ".cache/tvm-sparse"
    cache = Path(cache_dir or default)
    out = cache / f"hide_avx512-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        host_linker()(tmp, [str(SOURCE)], ["-x", "c", "-O2", "-Wall"])
        os.replace(tmp, out)
    except ToolchainError:
        os.unlink(tmp)
        raise
    return out


def environment(env: Mapping[str, str], cache_dir: str | os.PathLike | None = None) -> dict:
    """``env`` with the library first on ``LD_PRELOAD`` (any other build of it dropped).
    Raises `ToolchainError` when there is no C compiler and RuntimeError (with `unavailable`'s
    reason) when CPUID cannot fault."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"cannot hide AVX-512: {reason}")
    lib = str(library(cache_dir))
    preload = [p for p in env.get("LD_PRELOAD", "").split() if not _is_library(p)]
    return {**env, "LD_PRELOAD": " ".join([lib, *preload])}


def _is_library(path: str) -> bool:
    return Path(path).name.startswith("hide_avx512-")


def answered() -> int | None:
    """CPUID instructions this process had answered with AVX-512 hidden; None when the library
    is not loaded, 0 when it is loaded but CPUID could not fault."""
    try:
        count = ctypes.CDLL(None).tvm_sparse_cpuid_traps
    except AttributeError:
        return None
    count.restype = ctypes.c_long
    return int(count())
