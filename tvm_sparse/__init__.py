"""tvm-sparse: compile pattern- and block-sparse (pruned) CNNs with Apache TVM.

``compile`` / ``analyze`` / ``tune`` / ``load`` / ``CompiledModel`` are attributes resolved on
first use (PEP 562), for two reasons. ``relay_passes`` and ``schedules`` sit beside this package
and import ``tvm_sparse.formats``, which runs this file first: importing the compiler here would
import those passes again while they are half initialized. And the compiler imports TVM (seconds),
which ``import tvm_sparse`` and ``tvm-sparse --help`` do not need.
"""

import importlib
import os
from typing import Any

# TVM's thread pool counts 1 core on some VMs; use every core unless the user chose.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .errors import ExportError, InputError, ModelLoadError, TvmSparseError  # noqa: E402

_LAZY = {
    "compile": "compiler",
    "analyze": "compiler",
    "tune": "tuning",
    "load": "compiled_model",
    "CompiledModel": "compiled_model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tvm_sparse' has no attribute {name!r}")


__all__ = [
    "CompiledModel",
    "ExportError",
    "InputError",
    "ModelLoadError",
    "TvmSparseError",
    "analyze",
    "compile",
    "load",
    "tune",
]
