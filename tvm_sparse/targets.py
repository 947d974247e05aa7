"""Named targets: "x86" (this host's CPU), "x86-avx2" / "x86-avx512" (an ISA, any x86-64 host),
"arm64" (aarch64 Linux), "android"; or a TVM target string / dict / ``Target``."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import tvm
from tvm.target import Target

from .errors import InputError, last_line

TARGET_NAMES = ("x86", "x86-avx2", "x86-avx512", "arm64", "android")
# LLVM CPUs that stand for an ISA: Haswell is the first AVX2 + FMA core, Skylake-AVX512 the
# first with AVX-512 F/CD/BW/DQ/VL. The kernels read the ISA from the target, never the host.
ISA_CPUS = {"x86-avx2": "haswell", "x86-avx512": "skylake-avx512"}
ARM64_TRIPLE = "aarch64-linux-gnu"
ANDROID_TRIPLE = "aarch64-linux-android"


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "rocketlake"); "" if unknown."""
    from tvm.target import codegen

    cpu, triple = codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple()
    return cpu if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, triple) else ""


def resolve_target(target: Any) -> Target:
    """The TVM target for a short name, a TVM target string or dict, or a ``Target``.

    - "x86": LLVM for this host CPU (detected ``mcpu``, ``num-cores`` = os.cpu_count()).
    - "x86-avx2" / "x86-avx512": LLVM for that ISA (``mcpu`` haswell / skylake-avx512), this
      host's core count: an AVX-512 host compiles and runs the AVX2 build too.
    - "arm64": LLVM, aarch64-linux-gnu, +neon.
    - "android": LLVM, aarch64-linux-android, +neon.
    - "llvm ...": a TVM target string, e.g. "llvm -mcpu=znver1 -num-cores=4".
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, dict | str) and not (isinstance(target, str) and target in TARGET_NAMES):
        return _parse_target(target)
    if target in ("x86", *ISA_CPUS):
        cfg: dict = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
        cpu = ISA_CPUS.get(target) or host_cpu()
        if cpu:
            cfg["mcpu"] = cpu
        return Target(cfg)
    if target in ("arm64", "android"):
        triple = ARM64_TRIPLE if target == "arm64" else ANDROID_TRIPLE
        return Target({"kind": "llvm", "mtriple": triple, "mattr": ["+neon"]})
    raise InputError(
        f"target: expected one of {', '.join(TARGET_NAMES)}, a TVM target string ('llvm ...') "
        f"or a tvm.target.Target, got {target!r}"
    )


def _parse_target(target: str | dict) -> Target:
    """A user's target: a dict, JSON text, or "llvm -key=value ..." (TVM 0.27 parses only
    dicts; the flag form is read here). Only CPU (``llvm``) targets are compiled for."""
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                target = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"target: {target!r} is not valid JSON ({err})") from None
        elif text.split(" ", 1)[0] == "llvm":
            target = _flags_to_dict(text)
        else:
            raise InputError(
                f"target: unknown target {target!r}: use one of {', '.join(TARGET_NAMES)} or an "
                "LLVM target such as 'llvm -mcpu=haswell'"
            )
    if target.get("kind") != "llvm":
        raise InputError(f"target: {target.get('kind')!r} targets are not supported (CPU: 'llvm')")
    try:
        tgt = Target(target)
    except Exception as err:  # TVM's parser raises its own error types
        raise InputError(f"target: cannot make a target of {target!r}: {last_line(err)}") from None
    cpu = str(tgt.attrs.get("mcpu", ""))
    if cpu and not _known_cpu(cpu, tgt):
        raise InputError(f"target: LLVM does not know the CPU {cpu!r} (mcpu)")
    return tgt


def _known_cpu(cpu: str, tgt: Target) -> bool:
    from tvm.target import codegen

    triple = str(tgt.attrs.get("mtriple", "")) or str(codegen.llvm_get_system_triple())
    return bool(codegen.llvm_is_valid_cpu(cpu, triple))


def _flags_to_dict(text: str) -> dict:
    """ "llvm -mcpu=haswell -num-cores=4 -mattr=+avx2,+fma" -> a target dict."""
    cfg: dict[str, Any] = {"kind": "llvm"}
    for flag in text.split()[1:]:
        key, sep, value = flag.lstrip("-").partition("=")
        if not flag.startswith("-") or not sep or not key:
            raise InputError(f"target: cannot read {flag!r} in {text!r} (expected -key=value)")
        if key == "mattr":
            cfg[key] = value.split(",")
        elif key == "num-cores":
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"target: num-cores must be a positive integer, got {value!r}")
            cfg[key] = int(value)
        else:
            cfg[key] = value
    return cfg


def num_cores(target: Target) -> int:
    """The cores the target's kernels are parallelized and balanced over."""
    return int(target.attrs.get("num-cores", 0) or os.cpu_count() or 1)


def is_arm(target: Target) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith("aarch64")


def has_avx512(target: Target) -> bool:
    return not is_arm(target) and _has(target, "avx512f")


def isa_name(target: Target) -> str:
    """The vector ISA the kernels use for ``target``: "AVX-512", "AVX2" or "NEON"."""
    return "NEON" if is_arm(target) else "AVX-512" if has_avx512(target) else "AVX2"


def cost_family(target: Target) -> str:
    """The name of the cost table shipped for ``target``'s ISA: "avx512", "avx2" or "neon"."""
    return isa_name(target).lower().replace("-", "")


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the widest vector: 16 (AVX-512), 8 (AVX2), 4 (NEON)."""
    if is_arm(target):
        return 4
    return 16 if has_avx512(target) else 8


def vector_registers(target: Target) -> int:
    """Architectural vector registers: 32 on AArch64 and with AVX-512, else 16."""
    return 32 if is_arm(target) or has_avx512(target) else 16


def runs_here(target: Target | None) -> bool:
    """Whether code built for ``target`` runs on this machine: same architecture, and no vector
    ISA (AVX-512, AVX2, FMA) the host lacks (an AVX-512 build on an AVX2 host would die of an
    illegal instruction)."""
    if target is None:
        return True
    if is_arm(target) != _host_is_arm():
        return False
    return is_arm(target) or all(_host_has(f) or not _has(target, f) for f in _X86_ISAS)


_X86_ISAS = ("avx512f", "avx2", "fma")


@functools.cache
def _host_is_arm() -> bool:
    import platform

    return platform.machine().lower() in ("aarch64", "arm64")


@functools.cache
def _host_has(feature: str) -> bool:
    return _has(resolve_target("x86"), feature)


def _has(target: Target, feature: str) -> bool:
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features([feature], target))
    except Exception:  # a CPU name LLVM does not know
        return False
