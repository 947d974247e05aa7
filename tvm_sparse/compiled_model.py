"""A compiled model: run it, read its report, export it as a deployable library + metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.target import Target

from .errors import InputError, ModelLoadError
from .frontend import TensorSpec
from .report import LayerRecord, format_report
from .targets import resolve_target

METADATA_SUFFIX = ".json"


@dataclass
class CompiledModel:
    """A Relax VM executable plus what is needed to call it and explain it."""

    executable: Any  # tvm.runtime.Executable, or a loaded runtime Module
    inputs: list[TensorSpec]
    layers: list[LayerRecord]
    target: Target
    compile_seconds: float = 0.0
    _vm: Any = field(default=None, repr=False)

    @property
    def runs_here(self) -> bool:
        """Whether the code was built for this machine (else run it over ``tvm_sparse.rpc``)."""
        from .targets import is_arm

        return self.target is None or is_arm(self.target) == is_arm(resolve_target("x86"))

    @property
    def vm(self) -> relax.VirtualMachine:
        if not self.runs_here:
            raise InputError(
                f"this model was compiled for {self.target.attrs.get('mtriple')}: export it and "
                "run it on the device (tvm_sparse.rpc.run_remote / tvm-sparse run --rpc)"
            )
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return self._vm

    def _check(self, args: tuple) -> list:
        if len(args) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} inputs, got {len(args)}")
        tensors = []
        for spec, arg in zip(self.inputs, args, strict=True):
            arr = arg.detach().cpu().numpy() if hasattr(arg, "detach") else np.asarray(arg)
            if tuple(arr.shape) != spec.shape:
                raise InputError(
                    f"input {spec.name!r}: expected shape {spec.shape}, got {tuple(arr.shape)}"
                )
            tensors.append(tvm.runtime.tensor(np.ascontiguousarray(arr, dtype=spec.dtype)))
        return tensors

    def __call__(self, *args: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run on numpy arrays or torch tensors; returns numpy (a tuple for several outputs)."""
        out = self.vm["main"](*self._check(args))
        return _to_numpy(out)

    def benchmark(self, *args: Any, number: int = 10, repeat: int = 5) -> float:
        """Median latency in milliseconds (TVM's time evaluator, ``repeat`` x ``number`` runs)."""
        timer = self.vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return float(np.median(timer(*self._check(args)).results) * 1e3)

    def profile(self, *args: Any, runs: int = 10):
        """Per-kernel time of a forward pass on ``args`` (``tvm_sparse.profiling.Profile``;
        ``.table()`` to print it)."""
        from .profiling import profile_vm

        self.vm  # noqa: B018 (raises the clear error for a model built for another target)
        return profile_vm(self.executable, self._check(args), runs=runs)

    def report(self) -> str:
        """Per layer: op, shape, format chosen, density, FLOPs kept, why."""
        return format_report(self.layers)

    def export(self, path: str | os.PathLike, fcompile: Any = None) -> str:
        """Write ``path`` (shared library) and ``path.json`` (inputs, target, report)."""
        path = os.fspath(path)
        if fcompile is None and not self.runs_here:
            from .toolchain import fcompile_for

            fcompile = fcompile_for(self.target)  # a cross linker (NDK, aarch64 gcc, clang+lld)
        kwargs = {"fcompile": fcompile} if fcompile is not None else {}
        self.executable.export_library(path, **kwargs)
        meta = {
            "format": "tvm-sparse/1",
            "inputs": [s.to_json() for s in self.inputs],
            "target": str(self.target),
            "layers": [r.to_json() for r in self.layers],
        }
        with open(path + METADATA_SUFFIX, "w") as f:
            json.dump(meta, f, indent=1)
        return path


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a model written by ``CompiledModel.export``."""
    path = os.fspath(path)
    for p in (path, path + METADATA_SUFFIX):
        if not os.path.exists(p):
            raise ModelLoadError(f"{p}: missing (export writes the library and its .json)")
    try:
        with open(path + METADATA_SUFFIX) as f:
            meta = json.load(f)
        inputs = [TensorSpec.from_json(d) for d in meta["inputs"]]
        layers = [LayerRecord(**d) for d in meta["layers"]]
        target = Target(json.loads(meta["target"])) if meta["target"].startswith("{") else None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}{METADATA_SUFFIX}: corrupt metadata ({err})") from err
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot load the library ({err})") from err
    return CompiledModel(executable=lib, inputs=inputs, layers=layers, target=target)


def _to_numpy(out: Any) -> np.ndarray | tuple[np.ndarray, ...]:
    if hasattr(out, "numpy"):
        return out.numpy()
    return tuple(_to_numpy(o) for o in out)
