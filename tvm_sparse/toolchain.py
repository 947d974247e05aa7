"""Targets and linkers: how a compiled model becomes a shared library for x86, arm64 or Android.

Target names are resolved by `tvm_sparse.targets`; `fcompile_for(target)` picks a linker
for its triple and returns an `fcompile` for `executable.export_library(path, fcompile=...)`;
`export_library(executable, path, target)` does both. Linkers, first found wins:

- aarch64-linux-android: $TVM_NDK_CC, else the NDK clang under $ANDROID_NDK_HOME (or
  $ANDROID_NDK_ROOT), else `clang --target=aarch64-linux-android` + lld with `-nostdlib`.
- aarch64-linux-gnu: `aarch64-linux-gnu-gcc`, else `clang --target=aarch64-linux-gnu` + lld.
- x86_64 (host): the host C compiler ($CXX/$CC, g++, gcc, clang, cc).

`-nostdlib` is enough because TVM's kernels call nothing outside the TVM runtime, whose process
provides libc/libm at load time. Nothing found raises `ToolchainError` naming what to install;
a linker that fails raises it with the tool and the first error line of its output.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.support import cc as _cc

from tvm_sparse.errors import TvmSparseError
from tvm_sparse.targets import ANDROID_TRIPLE, ARM64_TRIPLE, resolve_target

__all__ = [
    "Linker",
    "ToolchainError",
    "export_library",
    "fcompile_for",
    "find_linker",
    "host_linker",
    "summarize_tool_output",
    "triple_of",
]

# Android API level for a bare clang's triple; NEON is baseline on aarch64 anyway.
ANDROID_API = 24
_API = re.compile(r"android(\d+)-clang$")


class ToolchainError(TvmSparseError, RuntimeError):
    """No linker for the requested target is installed (the message says what to install), or
    the linker failed (the message names the tool and its first error line)."""


# Lines of a compiler driver's output that say what went wrong, most telling first.
_ERROR_WORDS = ("error", "cannot", "undefined reference", "no such file", "not found")


def summarize_tool_output(text: str, limit: int = 240) -> str:
    """One line out of a compiler / linker failure (TVM's "Compilation error:" text): the first
    line that reads as an error, else the first line of the tool's own output."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [ln for ln in lines if ln and ln != "Compilation error:"]
    lines = [ln for ln in lines if not ln.startswith("Command line:")] or ["no output"]
    for word in _ERROR_WORDS:
        hit = next((ln for ln in lines if word in ln.lower()), None)
        if hit:
            return hit[:limit]
    return lines[0][:limit]


def triple_of(target: str | tvm.target.Target) -> str:
    """The LLVM triple of a target (host triple when the target sets none)."""
    triple = resolve_target(target).attrs.get("mtriple", "")
    return str(triple) if triple else _system_triple()


def _system_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def _which(name: str, path: str | None) -> str | None:
    return shutil.which(name, path=path)


@dataclass
class Linker:
    """A compiler driver that links TVM object files into a shared library."""

    cc: str
    options: list[str] = field(default_factory=list)
    triple: str = ""

    def __call__(self, output: str, objects: list[str], options: list[str] | None = None) -> None:
        tool = os.path.basename(self.cc)
        try:
            _cc.create_shared(output, objects, [*self.options, *(options or [])], cc=self.cc)
        except OSError as err:  # the driver itself cannot be started
            raise ToolchainError(f"{tool} cannot be run ({self.cc}): {err.strerror}") from err
        except RuntimeError as err:
            raise ToolchainError(
                f"{tool} failed to link {output}: {summarize_tool_output(str(err))}"
            ) from err

    def fcompile(self) -> Callable[..., None]:
        """The `fcompile` function `export_library` expects (with output_format, triple)."""

        def fcompile(output: str, objects: list[str], options: list[str] | None = None) -> None:
            self(output, objects, options)

        fcompile.output_format = "so"
        fcompile.get_target_triple = lambda: self.triple
        return fcompile


def _clang_lld(triple: str, path: str | None) -> Linker | None:
    clang, lld = _which("clang", path), _which("ld.lld", path)
    if clang and lld:
        return Linker(clang, [f"--target={triple}", "-fuse-ld=lld", "-nostdlib"], triple)
    return None


def _ndk_clang() -> str | None:
    if os.environ.get("TVM_NDK_CC"):
        return os.environ["TVM_NDK_CC"]
    for var in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT"):
        ndk = os.environ.get(var)
        if ndk:
            pattern = f"{ndk}/toolchains/llvm/prebuilt/*/bin/{ANDROID_TRIPLE}*-clang"
            hits = [(int(m.group(1)), p) for p in glob.glob(pattern) if (m := _API.search(p))]
            if hits:
                return max(hits)[1]  # the highest API level
    return None


def find_linker(target: str | tvm.target.Target, path: str | None = None) -> Linker:
    """The linker for `target`'s triple; `path` replaces $PATH in the search (for tests).

    Raises ToolchainError saying which packages to install (or to set TVM_NDK_CC).
    """
    triple = triple_of(target)
    if triple.startswith("aarch64") and "android" in triple:
        ndk_cc = _ndk_clang()
        if ndk_cc:
            return Linker(ndk_cc, ["-lm"], triple)
        found = _clang_lld(f"{ANDROID_TRIPLE}{ANDROID_API}", path)
        if found:
            found.triple = triple
            return found
        hint = "set TVM_NDK_CC to the NDK's aarch64-linux-android<API>-clang (or ANDROID_NDK_HOME)"
        raise ToolchainError(
            f"no linker for {triple}: {hint}, or install clang and lld "
            "(apt-get install -y clang lld)"
        )
    if triple.startswith("aarch64"):
        gcc = _which("aarch64-linux-gnu-gcc", path)
        if gcc and Path("/usr/aarch64-linux-gnu/lib").is_dir():
            return Linker(gcc, [], triple)
        found = _clang_lld(ARM64_TRIPLE, path)
        if found:
            return found
        raise ToolchainError(
            f"no linker for {triple}: apt-get install -y gcc-aarch64-linux-gnu "
            "libc6-dev-arm64-cross (or: apt-get install -y clang lld)"
        )
    if triple.startswith(("x86_64", "i686", "i386")):
        return host_linker(path, triple)
    raise ToolchainError(f"no known linker for triple {triple!r}")


def host_linker(path: str | None = None, triple: str = "") -> Linker:
    """This machine's C compiler ($CXX, $CC, g++, gcc, clang, cc: first found) as a `Linker`
    for code that runs here; `path` replaces $PATH in the search."""
    for name in [os.environ.get("CXX"), os.environ.get("CC"), "g++", "gcc", "clang", "cc"]:
        found = _which(name, path) if name else None
        if found:
            return Linker(found, [], triple or _system_triple())
    raise ToolchainError(
        f"no C compiler for {triple or _system_triple()}: apt-get install -y gcc (or clang)"
    )


def fcompile_for(target: str | tvm.target.Target, path: str | None = None) -> Callable[..., None]:
    """An `fcompile` for `export_library` that links for `target` (see `find_linker`)."""
    return find_linker(target, path).fcompile()


def _lib_target(executable: object) -> tvm.target.Target | None:
    """The LLVM target an executable's kernels were compiled for, if it can be read."""
    mod = getattr(executable, "mod", executable)
    for dso in mod._collect_dso_modules():  # TVM has no public accessor
        if dso.kind == "llvm":
            return tvm.target.Target(json.loads(dso.get_function("_get_target_string")()))
    return None


def export_library(
    executable: object,
    path: str | os.PathLike,
    target: str | tvm.target.Target | None = None,
    linker_path: str | None = None,
) -> Path:
    """Write `executable` (from `tvm.compile`) as a shared library for `target`.

    `target` defaults to the one its kernels were compiled for.
    """
    if target is None:
        target = _lib_target(executable)
        if target is None:
            raise ToolchainError("cannot tell the executable's target: pass target=")
    path = Path(path)
    executable.export_library(str(path), fcompile=fcompile_for(target, linker_path))
    return path
