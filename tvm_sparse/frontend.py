"""Model import: a PyTorch module (via ``torch.export``) or an ONNX file to a Relax module.

Weights end up as Relax constants (so passes can read them) and BatchNorm is folded into the
preceding conv (a per-filter scale: zeros stay zeros, so sparsity survives).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from relay_passes.fold_batch_norm import FoldBatchNorm

from .errors import InputError, ModelLoadError


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a model input."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def random_inputs(specs: list[TensorSpec], seed: int = 0) -> list[np.ndarray]:
    """Seeded random arrays for a model's inputs (normal floats; zeros for other dtypes, which
    are always in bounds as indices)."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal(s.shape).astype(s.dtype)
        if np.dtype(s.dtype).kind == "f"
        else np.zeros(s.shape, s.dtype)
        for s in specs
    ]


@dataclass
class ImportedModel:
    """A Relax module with constant weights, and what its inputs are."""

    mod: tvm.IRModule
    inputs: list[TensorSpec]
    source: str  # "torch" or "onnx:<path>"
    # The source's (name, weight shape "OxCxKHxKW" / "KxN" or "") of its conv2d / matmul
    # layers, in graph order (for the report).
    layer_names: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def from_torch(model: Any, example_inputs: tuple) -> ImportedModel:
    """Import an ``nn.Module`` by ``torch.export`` with its weights as constants."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if example_inputs is None:
        raise InputError("a PyTorch model needs example_inputs (a tuple of tensors)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example = tuple(torch.as_tensor(_as_numpy(x)) for x in example_inputs)
    model = model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, example)
    except Exception as err:  # torch raises many types here; report them as one
        raise ModelLoadError(f"torch.export failed for {type(model).__name__}: {err}") from err
    try:
        mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    except Exception as err:
        raise ModelLoadError(
            f"TVM could not import the exported {type(model).__name__}: {err}"
        ) from err
    inputs = [
        TensorSpec(f"input{i}", tuple(int(d) for d in x.shape), str(x.dtype).replace("torch.", ""))
        for i, x in enumerate(example)
    ]
    return ImportedModel(_prepare(mod), inputs, "torch", _torch_layer_names(exported))


def from_onnx(model: Any, example_inputs: tuple | None = None) -> ImportedModel:
    """Import an ONNX file path or ``onnx.ModelProto``; shapes come from the file if not given."""
    import onnx

    source = "onnx"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        source = f"onnx:{path}"
        if not os.path.exists(path):
            raise ModelLoadError(f"{path}: no such ONNX file")
        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as err:
            raise ModelLoadError(f"{path}: not a valid ONNX model ({err})") from err
    graph_inputs = _onnx_inputs(model)
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        if len(example_inputs) != len(graph_inputs):
            raise InputError(
                f"{source}: the model has {len(graph_inputs)} inputs, got {len(example_inputs)}"
            )
        graph_inputs = [
            TensorSpec(spec.name, tuple(_as_numpy(x).shape), spec.dtype)
            for spec, x in zip(graph_inputs, example_inputs, strict=True)
        ]
    for spec in graph_inputs:
        if any(d <= 0 for d in spec.shape):
            raise InputError(
                f"{source}: input {spec.name!r} has a dynamic shape {spec.shape}; "
                "pass example_inputs"
            )
    from tvm.relax.frontend.onnx import from_onnx as relax_from_onnx

    try:
        mod = relax_from_onnx(
            model,
            shape_dict={s.name: list(s.shape) for s in graph_inputs},
            dtype_dict={s.name: s.dtype for s in graph_inputs},
            keep_params_in_input=False,
        )
    except Exception as err:
        raise ModelLoadError(f"{source}: TVM could not import the ONNX graph ({err})") from err
    return ImportedModel(_prepare(mod), graph_inputs, source, _onnx_layer_names(model))


def _torch_layer_names(exported: Any) -> dict[str, list[tuple[str, str]]]:
    """Module paths ("layer1.0.conv1") and weight shapes of the conv / linear calls."""
    names: dict[str, list[tuple[str, str]]] = {"conv2d": [], "matmul": []}
    for node in exported.graph.nodes:
        target = str(node.target)
        op = "conv2d" if "conv2d" in target else "matmul" if "linear" in target else None
        stack = list(node.meta.get("nn_module_stack", {}).values())
        if node.op != "call_function" or not op or not stack:
            continue
        val = getattr(node.args[1], "meta", {}).get("val") if len(node.args) > 1 else None
        shape = [int(d) for d in val.shape] if val is not None else []
        if op == "matmul":
            shape = shape[::-1]  # linear stores (N, K); the report shows K x N
        names[op].append((str(stack[-1][0]), "x".join(map(str, shape))))
    return names


def _onnx_layer_names(model: Any) -> dict[str, list[tuple[str, str]]]:
    """Node names and (for Conv) weight shapes of the Conv / Gemm / MatMul nodes."""
    dims = {init.name: "x".join(map(str, init.dims)) for init in model.graph.initializer}
    names: dict[str, list[tuple[str, str]]] = {"conv2d": [], "matmul": []}
    for i, node in enumerate(model.graph.node):
        op = {"Conv": "conv2d", "Gemm": "matmul", "MatMul": "matmul"}.get(node.op_type)
        if op:
            shape = dims.get(node.input[1], "") if op == "conv2d" else ""
            names[op].append((node.name or f"{node.op_type}_{i}", shape))
    return names


def _onnx_inputs(model: Any) -> list[TensorSpec]:
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        specs.append(TensorSpec(inp.name, dims, dtype))
    return specs


def _prepare(mod: tvm.IRModule) -> tvm.IRModule:
    """Make weights plain constants and fold BatchNorm into convs."""
    seq = tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),  # the importers wrap weights in permute/reshape
            FoldBatchNorm,  # also conv + bias -> batch_norm (TVM's pass misses it)
            relax.transform.FoldConstant(),
            relax.transform.DecomposeOpsForInference(),  # any batch_norm left (no conv before it)
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    return seq(mod)


def import_model(model: Any, example_inputs: Any = None) -> ImportedModel:
    """Import a ``torch.nn.Module``, an ONNX path or an ``onnx.ModelProto``."""
    if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto":
        return from_onnx(model, example_inputs)
    if hasattr(model, "forward") and hasattr(model, "eval"):
        return from_torch(model, example_inputs)
    raise InputError(
        f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, an ONNX file path "
        "or an onnx.ModelProto"
    )
