"""Named targets: "x86" (this host's CPU), "arm64" (aarch64 Linux), "android"; or a Target."""

from __future__ import annotations

import os
from typing import Any

import tvm
from tvm.target import Target

from .errors import InputError


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver4", "sapphirerapids")."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def resolve_target(target: Any) -> Target:
    """A ``tvm.target.Target`` for a name ("x86", "arm64", "android"), dict or Target."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target(target)
    cores = os.cpu_count() or 1
    named = {
        "x86": {"kind": "llvm", "mcpu": host_cpu(), "num-cores": cores},
        "arm64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        "android": {"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
    }
    if target not in named:
        raise InputError(f"unknown target {target!r}: use one of {sorted(named)} or a Target")
    return Target(named[target])


def vector_lanes(target: Target) -> int:
    """fp32 lanes of the vector width the kernels use: 8 (AVX2 ymm) on x86, 4 (NEON) on ARM."""
    triple = str(target.attrs.get("mtriple", ""))
    return 4 if triple.startswith("aarch64") else 8
