"""Compile a ``ModelSpec``'s model with ``tvm_sparse.compile`` and compare with PyTorch."""

from __future__ import annotations

import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .build import build_model, spec_input
from .spec import ModelSpec, tagged

TOLERANCE = 1e-4


@dataclass
class FuzzResult:
    """One spec through ``tvm_sparse.compile``: the mismatch or the error, what the layers
    became (``formats``: the report's op:format per layer) and which kernels ran (``kernels``:
    the called functions, sizes dropped: "pattern_conv2d_staged", "max_pool2d_s2", ...)."""

    spec: ModelSpec
    error: str | None = None
    max_diff: float = float("nan")
    tolerance: float = float("nan")
    formats: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.max_diff <= self.tolerance

    def summary(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        verdict = "ok" if self.ok else "MISMATCH"
        return f"{verdict}: max|diff| {self.max_diff:.3g} (tolerance {self.tolerance:.3g})"

    def to_json(self) -> dict:
        return {
            "spec": tagged(self.spec),
            "describe": self.spec.describe(),
            "ok": self.ok,
            "error": self.error,
            "max_diff": self.max_diff,
            "tolerance": self.tolerance,
            "formats": self.formats,
            "kernels": self.kernels,
            "seconds": round(self.seconds, 2),
        }


def tolerance(spec: ModelSpec, reference: np.ndarray) -> float:
    """The allowed max |diff| (module docstring)."""
    scale = max(1.0, float(np.abs(reference).max(initial=0.0)))
    return TOLERANCE * scale * math.sqrt(max(1, spec.depth()))


def called_kernels(vm_text: str) -> list[str]:
    """The kernels a Relax VM program calls (``VMExecutable.as_text()``), sizes and numbering
    dropped, builtins left out."""
    names = re.findall(r"^\s*call\s+(\S+)", vm_text, flags=re.M)
    kinds = set()
    for name in (n for n in names if not n.startswith("vm.")):
        kind = re.sub(r"_\d+x\d+(?:x\d+)*", "", name)
        kinds.add(re.sub(r"(?<![x_]s|.x)\d+$", "", kind))  # (TVM numbers repeated names)
    return sorted(kinds)


def _onnx_model(model: Any, x: np.ndarray) -> Any:
    import onnx

    from ..benchmarking import onnx_bytes

    return onnx.load_from_string(onnx_bytes(model, (x,)))


def check_spec(spec: ModelSpec, target: Any = "x86") -> FuzzResult:
    """Compile ``spec``'s model, run it on ``spec_input`` and compare with PyTorch."""
    import torch

    import tvm_sparse

    t0 = time.perf_counter()
    result = FuzzResult(spec)
    model, x = build_model(spec), spec_input(spec)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    try:
        if spec.frontend == "onnx":
            model = _onnx_model(model, x)
        compiled = tvm_sparse.compile(model, (x,), target=target, sparse=spec.sparse)
        got = compiled(x)
    except Exception as err:  # every failure is a finding: keep its type and where it came from
        where = traceback.extract_tb(err.__traceback__)[-1]
        message = " ".join(str(err).split())[:600]
        result.error = f"{type(err).__name__}: {message} (at {where.filename}:{where.lineno})"
        result.seconds = time.perf_counter() - t0
        return result
    result.formats = [
        f"{r.op}:{r.format}" + "/lanes" * ("vector lanes" in r.reason) for r in compiled.layers
    ]
    result.kernels = called_kernels(compiled.executable.as_text())
    result.tolerance = tolerance(spec, ref)
    if got.shape != ref.shape:
        result.error = f"output shape {got.shape}, PyTorch {ref.shape}"
    else:
        result.max_diff = float(np.abs(got - ref).max(initial=0.0))
    result.seconds = time.perf_counter() - t0
    return result
