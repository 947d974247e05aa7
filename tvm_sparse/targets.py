"""Named targets: "x86" (this host's CPU), "arm64" (aarch64 Linux), "android"; or a Target."""

from __future__ import annotations

import functools
import os
from typing import Any

import tvm
from tvm.target import Target

from .errors import InputError

TARGET_NAMES = ("x86", "arm64", "android")
ARM64_TRIPLE = "aarch64-linux-gnu"
ANDROID_TRIPLE = "aarch64-linux-android"


@functools.cache
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "rocketlake"); "" if unknown."""
    from tvm.target import codegen

    cpu, triple = codegen.llvm_get_system_cpu(), codegen.llvm_get_system_triple()
    return cpu if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, triple) else ""


def resolve_target(target: Any) -> Target:
    """The TVM target for a short name, a target dict, or a ``Target`` (passed through).

    - "x86": LLVM for this host CPU (detected ``mcpu``, ``num-cores`` = os.cpu_count()).
    - "arm64": LLVM, aarch64-linux-gnu, +neon.
    - "android": LLVM, aarch64-linux-android, +neon.
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target(target)
    if target == "x86":
        cfg: dict = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
        if host_cpu():
            cfg["mcpu"] = host_cpu()
        return Target(cfg)
    if target in ("arm64", "android"):
        triple = ARM64_TRIPLE if target == "arm64" else ANDROID_TRIPLE
        return Target({"kind": "llvm", "mtriple": triple, "mattr": ["+neon"]})
    raise InputError(f"unknown target {target!r}: use one of {TARGET_NAMES} or a tvm.target.Target")


def num_cores(target: Target) -> int:
    """The cores the target's kernels are parallelized and balanced over."""
    return int(target.attrs.get("num-cores", 0) or os.cpu_count() or 1)


def is_arm(target: Target) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith("aarch64")


def has_avx512(target: Target) -> bool:
    if is_arm(target):
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(["avx512f"], target))
    except Exception:  # a CPU name LLVM does not know: assume AVX2
        return False


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the widest vector: 16 (AVX-512), 8 (AVX2), 4 (NEON)."""
    if is_arm(target):
        return 4
    return 16 if has_avx512(target) else 8


def vector_registers(target: Target) -> int:
    """Architectural vector registers: 32 on AArch64 and with AVX-512, else 16."""
    return 32 if is_arm(target) or has_avx512(target) else 16
