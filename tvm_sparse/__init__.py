"""tvm-sparse: compile pattern- and block-sparse (pruned) CNNs with Apache TVM."""

import os

# TVM's thread pool counts 1 core on some VMs; use every core unless the user chose.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .compiled_model import CompiledModel, load  # noqa: E402
from .compiler import compile  # noqa: E402
from .errors import InputError, ModelLoadError, TvmSparseError  # noqa: E402

__all__ = ["CompiledModel", "InputError", "ModelLoadError", "TvmSparseError", "compile", "load"]
