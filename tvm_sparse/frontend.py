"""Model import: a PyTorch module (via ``torch.export``), a ``torch.export`` program or ``.pt2``
file, or an ONNX file to a Relax module.

Weights end up as Relax constants (so passes can read them) and BatchNorm is folded into the
preceding conv (a per-filter scale: zeros stay zeros, so sparsity survives). The kernels are
float32: a float16 / bfloat16 / float64 weight, input or cast is refused here, naming where it is
and how to convert the model (the ``_check_*_dtypes`` functions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from relay_passes.fold_batch_norm import FoldBatchNorm

from .errors import InputError, ModelLoadError, first_line
from .onnx_rnn import recurrent_converters
from .torch_rnn import recurrent_convert_map, recurrent_decompositions


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
    source: str  # "torch", "torch.export", "pt2:<path>", "onnx" or "onnx:<path>"
    # The source's (name, weight shape "OxCxKHxKW" / "KxN" or "") of its conv2d / matmul
    # layers, in graph order (for the report).
    layer_names: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence the deprecation / future warnings torch, ONNX and TVM print while exporting and
    importing models (the user's own code is not affected outside the block)."""
    import warnings

    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def from_torch(model: Any, example_inputs: tuple) -> ImportedModel:
    """Import an ``nn.Module`` by ``torch.export`` with its weights as constants."""
    import torch

    if example_inputs is None:
        raise InputError("a PyTorch model needs example_inputs (a tuple of tensors)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    label = type(model).__name__
    _check_module_dtypes(model, label)
    _check_example_dtypes(example_inputs, label, "pass float32 example inputs (x.float())")
    example = tuple(torch.as_tensor(_as_numpy(x)) for x in example_inputs)
    model = model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, example)
    except Exception as err:  # torch raises many types here; report them as one
        raise ModelLoadError(f"torch.export failed for {label}: {err}") from err
    mod = _import_exported(exported, label)
    inputs = [
        TensorSpec(f"input{i}", tuple(int(d) for d in x.shape), str(x.dtype).replace("torch.", ""))
        for i, x in enumerate(example)
    ]
    return ImportedModel(mod, inputs, "torch", _torch_layer_names(exported))


def from_exported_program(
    exported: Any, example_inputs: Any = None, source: str = "torch.export"
) -> ImportedModel:
    """Import a ``torch.export.ExportedProgram``; its input shapes are the program's (fixed at
    export); ``example_inputs``, if given, must match them."""
    label = source.removeprefix("pt2:") if ":" in source else "the ExportedProgram"
    inputs = _exported_inputs(exported, label)
    if example_inputs is not None:
        _match_examples(inputs, example_inputs, label)
    mod = _import_exported(exported, label)
    return ImportedModel(mod, inputs, source, _torch_layer_names(exported))


def from_pt2(path: str | os.PathLike, example_inputs: Any = None) -> ImportedModel:
    """Import a ``.pt2`` file written by ``torch.export.save``."""
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such .pt2 file", path=path)
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a torch.export .pt2 file (not a zip archive)", path=path)
    try:
        with _torch_export_log() as logged:
            exported = torch.export.load(path)
    except Exception as err:  # torch raises many types here; report them as one
        cause = logged[-1] if logged else err  # torch logs the real cause, then raises its own
        raise ModelLoadError(
            f"{path}: torch.export.load could not read it ({first_line(cause)})", path=path
        ) from err
    return from_exported_program(exported, example_inputs, f"pt2:{path}")


def _import_exported(exported: Any, label: str) -> tvm.IRModule:
    """The Relax module of an ``ExportedProgram`` (dtypes checked first), prepared."""
    from tvm.relax.frontend.torch import from_exported_program as relax_from_exported

    _check_exported_dtypes(exported, label)
    try:
        exported = exported.run_decompositions(recurrent_decompositions())
        mod = relax_from_exported(
            exported,
            unwrap_unit_return_tuple=True,
            run_ep_decomposition=False,
            custom_convert_map=recurrent_convert_map(exported),
        )
    except Exception as err:
        raise ModelLoadError(f"TVM could not import the exported {label}: {err}") from err
    return _prepare(mod)


def _exported_inputs(exported: Any, label: str) -> list[TensorSpec]:
    """The user inputs of an ``ExportedProgram`` (named ``input0``, ... as for a module)."""
    user = set(exported.graph_signature.user_inputs)
    specs = []
    for node in exported.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user or not hasattr(val, "shape"):
            continue
        if not all(isinstance(d, int) for d in val.shape):
            raise InputError(
                f"{label}: input {node.name!r} has a dynamic shape {tuple(val.shape)}; "
                "export the model with static shapes"
            )
        dtype = str(val.dtype).replace("torch.", "")
        specs.append(TensorSpec(f"input{len(specs)}", tuple(val.shape), dtype))
    return specs


def _match_examples(specs: list[TensorSpec], example_inputs: Any, label: str) -> None:
    """``example_inputs`` must have the program's input count and shapes."""
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if len(example_inputs) != len(specs):
        raise InputError(f"{label}: the model has {len(specs)} inputs, got {len(example_inputs)}")
    _check_example_dtypes(example_inputs, label, "pass float32 example inputs")
    for spec, x in zip(specs, example_inputs, strict=True):
        shape = tuple(int(d) for d in getattr(x, "shape", np.shape(x)))
        if shape != spec.shape:
            raise InputError(
                f"{label}: {spec.name} has shape {spec.shape} in the exported program, got "
                f"{shape} (its shapes are fixed at export: export again for other shapes)"
            )


class _ErrorsLogged(logging.Handler):
    """Keeps the exceptions of the log records it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _torch_export_log() -> Iterator[list[BaseException]]:
    """``torch.export.load`` logs a traceback (the cause) before raising a generic error: keep
    it off stderr, and yield the exceptions it logged."""
    logger = logging.getLogger("torch.export")
    handler = _ErrorsLogged()
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.errors
    finally:
        logger.handlers, logger.propagate = saved


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
    label = source.removeprefix("onnx:") if ":" in source else "the ONNX model"
    _check_onnx_dtypes(model, label)
    graph_inputs = _onnx_inputs(model)
    if example_inputs is not None:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        _check_example_dtypes(example_inputs, label, "pass float32 example inputs")
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
        with recurrent_converters(model):  # GRU / LSTM / RNN, which TVM's importer lacks
            mod = relax_from_onnx(
                model,
                shape_dict={s.name: list(s.shape) for s in graph_inputs},
                dtype_dict={s.name: s.dtype for s in graph_inputs},
                keep_params_in_input=False,
            )
    except ModelLoadError as err:  # a refused recurrent node (named in the message)
        raise ModelLoadError(f"{source}: {err}", path=source.partition(":")[2] or None) from None
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


# How to make a model float32, for the dtype errors (the kernels are float32 only).
TORCH_FLOAT32 = "call model.float() (and pass float32 example inputs)"
EXPORT_FLOAT32 = "export it again from model.float() with float32 example inputs"
ONNX_FLOAT32 = "export the model in float32 (from PyTorch: torch.onnx.export of model.float())"
_ONNX_FLOATS = {"FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "float64"}


def _other_float(dtype: Any) -> str | None:
    """The name of a floating dtype other than float32 (float16, bfloat16, float64, float8...),
    None for float32 and non-float dtypes."""
    name = str(dtype).removeprefix("torch.")
    return name if name.startswith(("float", "bfloat")) and name != "float32" else None


def _refusal(label: str, where: str, dtype: str, fix: str) -> str:
    return f"{label}: {where} is {dtype}; tvm-sparse compiles float32 models: {fix}"


def _check_module_dtypes(model: Any, label: str) -> None:
    """A module's parameters and buffers must be float32 (or not floats)."""
    for kind in ("parameter", "buffer"):
        for name, tensor in getattr(model, f"named_{kind}s", list)():
            dtype = _other_float(tensor.dtype)
            if dtype:
                raise ModelLoadError(_refusal(label, f"{kind} {name!r}", dtype, TORCH_FLOAT32))


def _check_example_dtypes(example_inputs: Any, label: str, fix: str) -> None:
    """Floating example inputs must be float32 (checked before numpy, which has no bfloat16)."""
    for i, x in enumerate(example_inputs):
        dtype = _other_float(getattr(x, "dtype", None) or np.asarray(x).dtype)
        if dtype:
            raise InputError(_refusal(label, f"example input {i}", dtype, fix))


def _check_exported_dtypes(exported: Any, label: str) -> None:
    """Every weight, input and intermediate tensor of an ``ExportedProgram`` must be float32
    (or not floats): the first one that is not is named."""
    sig = exported.graph_signature
    weights = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    weights.update(sig.inputs_to_lifted_tensor_constants)
    for node in exported.graph.nodes:
        dtype = _other_float(getattr(node.meta.get("val"), "dtype", None))
        if dtype is None:
            continue
        if node.name in weights:
            where, fix = f"weight {weights[node.name]!r}", EXPORT_FLOAT32
        elif node.op == "placeholder":
            where, fix = f"input {node.name!r}", EXPORT_FLOAT32
        else:
            where, fix = f"the result of {node.name!r} ({node.target})", "cast to float32 instead"
        raise ModelLoadError(_refusal(label, where, dtype, fix))


def _onnx_float(elem_type: int) -> str | None:
    """The name of an ONNX floating element type other than FLOAT, else None."""
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return None
    if name in _ONNX_FLOATS:
        return _ONNX_FLOATS[name]
    return name.lower() if name.startswith("FLOAT") and name != "FLOAT" else None


def _check_onnx_dtypes(model: Any, label: str) -> None:
    """An ONNX graph's initializers, inputs, outputs, constants and casts must be float32 (or
    not floats): the first one that is not is named."""
    import onnx

    graph = model.graph
    found = [(f"initializer {t.name!r}", t.data_type) for t in graph.initializer]
    found += [(f"input {v.name!r}", v.type.tensor_type.elem_type) for v in graph.input]
    for i, node in enumerate(graph.node):
        where = f"node {node.name or f'{node.op_type}_{i}'!r} ({node.op_type})"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append((f"{where} value", attr.t.data_type))
            elif node.op_type == "Cast" and attr.name == "to":
                found.append((f"{where} output", attr.i))
    found += [(f"output {v.name!r}", v.type.tensor_type.elem_type) for v in graph.output]
    for where, elem_type in found:
        dtype = _onnx_float(elem_type)
        if dtype:
            path = label if label != "the ONNX model" else None
            raise ModelLoadError(_refusal(label, where, dtype, ONNX_FLOAT32), path=path)


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
    """Import a ``torch.nn.Module``, a ``torch.export.ExportedProgram``, a ``.pt2`` file
    (``torch.export.save``), an ONNX path or an ``onnx.ModelProto`` (torch's and TVM's
    deprecation chatter silenced)."""
    with quiet_third_party():
        return _import_any(model, example_inputs)


def _import_any(model: Any, example_inputs: Any) -> ImportedModel:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".pt2":
            return from_pt2(path, example_inputs)
        if suffix in (".pt", ".pth"):
            raise ModelLoadError(
                f"{path}: a {suffix} file (torch.save) holds weights, not a graph: load the "
                "module in Python and pass it, or save it with torch.export.save as .pt2",
                path=path,
            )
        return from_onnx(path, example_inputs)
    if type(model).__name__ == "ModelProto":
        return from_onnx(model, example_inputs)
    if type(model).__name__ == "ExportedProgram":
        return from_exported_program(model, example_inputs)
    if hasattr(model, "forward") and hasattr(model, "eval"):
        return from_torch(model, example_inputs)
    raise InputError(
        f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, a "
        "torch.export.ExportedProgram, a .pt2 or ONNX file path, or an onnx.ModelProto"
    )
