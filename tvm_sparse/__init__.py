"""tvm-sparse: compile pattern- and block-sparse (pruned) CNNs with Apache TVM.

``compile`` / ``analyze`` / ``load`` / ``CompiledModel`` are imported lazily so that the graph
passes (``relay_passes``) can use ``tvm_sparse.formats`` without a circular import.
"""

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
        import importlib

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
