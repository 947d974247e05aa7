"""Random small CNNs for fuzzing ``tvm_sparse.compile`` against PyTorch.

A model is described by a ``ModelSpec`` (plain frozen dataclasses: JSON round trip, one-line
``describe``), built by ``build_model`` with seeded weights (dense, pattern-pruned, unstructured,
all-zero, whole filters pruned, BSR / BCR blocks) and checked by ``check_spec``: compile (the
``nn.Module`` or its ONNX export), run, compare with the PyTorch output. ``model_specs()`` is
the hypothesis strategy the test (``tests/test_fuzz_models.py``) and the long run
(``benchmarks/fuzz_models.py``) share.

Tolerance: ``max |tvm - torch| <= TOLERANCE * max(1, max |torch|) * sqrt(depth)``, depth being
the conv / linear layers on the longest path (float32 sums in another order; BatchNorm folded).
"""

from .build import build_model, make_weight, spec_input
from .check import TOLERANCE, FuzzResult, called_kernels, check_spec, tolerance
from .spec import (
    Conv,
    Layer,
    Linear,
    ModelSpec,
    Pool,
    Residual,
    Sparsity,
    feature_shape,
    layer_output,
)
from .strategy import model_specs

__all__ = [
    "TOLERANCE",
    "Conv",
    "FuzzResult",
    "Layer",
    "Linear",
    "ModelSpec",
    "Pool",
    "Residual",
    "Sparsity",
    "build_model",
    "called_kernels",
    "check_spec",
    "feature_shape",
    "layer_output",
    "make_weight",
    "model_specs",
    "spec_input",
    "tolerance",
]
