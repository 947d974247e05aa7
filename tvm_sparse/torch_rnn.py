"""``torch.export``'s ``aten.gru`` / ``aten.lstm`` / ``aten.rnn_tanh`` as the recurrence kernel.

PyTorch's default decompositions (which TVM 0.27's importer runs) unroll these ops into one
cell per time step (compile time grows with the sequence). ``recurrent_decompositions`` keeps
them whole, and given to the importer's ``custom_convert_map`` these converters build each
layer direction as ``onnx_rnn`` does: one input-projection matmul and one ``call_tir`` to
``schedules.rnn_sequence`` (``W_hh`` dense or block-sparse as its zeros decide), stacked layers
feeding each other, bidirectional outputs concatenated, ``batch_first`` both ways. PyTorch's
gate order (GRU r, z, n; LSTM i, f, g, o) is permuted to ONNX's (z, r, h; i, o, f, c), which
the kernel follows; PyTorch's GRU is ONNX's ``linear_before_reset=1``. The weights are read
from the exported program (the importer binds parameters only after converting every op).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from relay_passes.utils import static_shape
from schedules.rnn_sequence import RecurrentGeometry

from .errors import ModelLoadError
from .onnx_rnn import emit_direction

# PyTorch's gate blocks in ONNX's order: GRU (r, z, n) -> (z, r, h), LSTM (i, f, g, o) ->
# (i, o, f, c).
GATE_ORDER = {"gru": (1, 0, 2), "lstm": (0, 3, 1, 2), "rnn": (0,)}
OPS = {"gru.input": "gru", "lstm.input": "lstm", "rnn_tanh.input": "rnn"}


def _onnx_gates(value: np.ndarray, cell: str) -> np.ndarray:
    """A weight (gates*H, K) or bias (gates*H,) with its gate blocks in ONNX's order."""
    order = GATE_ORDER[cell]
    blocks = value.reshape(len(order), -1, *value.shape[1:])
    return np.ascontiguousarray(blocks[list(order)].reshape(value.shape))


def _state(bb: relax.BlockBuilder, state: relax.Expr, index: int, batch: int, hidden: int):
    """Layer-direction ``index``'s (B, H) slice of h0 / c0 (L*D, B, H)."""
    part = relax.op.strided_slice(state, axes=[0], begin=[index], end=[index + 1])
    return bb.emit(relax.op.reshape(part, (batch, hidden)))


def _stack(bb: relax.BlockBuilder, states: list[relax.Expr]) -> relax.Expr:
    """(B, H) states -> (L*D, B, H)."""
    return bb.emit(relax.op.concat([relax.op.expand_dims(s, [0]) for s in states], axis=0))


def parameter_values(exported: Any) -> dict[str, np.ndarray]:
    """The exported program's parameters, buffers and constants by placeholder name (the
    importer binds them only after converting every op)."""
    tensors = {**exported.state_dict, **exported.constants}
    return {
        spec.arg.name: tensors[spec.target].detach().cpu().numpy()
        for spec in exported.graph_signature.input_specs
        if spec.target in tensors and hasattr(tensors[spec.target], "detach")
    }


def convert(cell: str, values: dict[str, np.ndarray], node: Any, importer: Any) -> relax.Expr:
    """The converter: the op's outputs (Y, h_n[, c_n]) as a Relax tuple; ``values`` are the
    program's parameters by placeholder name."""
    bb = importer.block_builder
    args = importer.retrieve_args(node)
    x, hx = args[0], args[1]
    has_biases, layers, _dropout, train, bidirectional, batch_first = args[3:9]
    where = f"{cell.upper()} {node.name!r}"
    if train:
        raise ModelLoadError(f"{where}: exported in training mode; export the model in eval()")
    weights = [values.get(getattr(p, "name", None)) for p in node.args[2]]
    if any(w is None for w in weights):
        raise ModelLoadError(f"{where}: its weights are computed at run time; tvm-sparse needs "
                             "them as constants (parameters)")  # fmt: skip
    shape = static_shape(x)
    if shape is None or len(shape) != 3:
        raise ModelLoadError(f"{where}: input has no static 3-D shape ({x.ty})")
    if batch_first:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        shape = (shape[1], shape[0], shape[2])
    steps, batch, _ = shape
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    hidden = weights[1].shape[1]
    h0, c0 = (hx[0], hx[1]) if cell == "lstm" else (hx, None)
    h_n, c_n = [], []
    for layer in range(int(layers)):
        features = int(static_shape(x)[2])
        x2d = bb.emit(relax.op.reshape(x, (steps * batch, features)))
        outs = []
        for d in range(directions):
            index = layer * directions + d
            w_ih, w_hh, *biases = weights[index * per : (index + 1) * per]
            bias = np.concatenate(biases) if biases else np.zeros(2 * w_ih.shape[0], np.float32)
            bias = np.concatenate([_onnx_gates(b, cell) for b in np.split(bias, 2)])
            geom = RecurrentGeometry(cell, steps, batch, hidden, reverse=d == 1)
            initial = [_state(bb, h0, index, batch, hidden)]
            if c0 is not None:
                initial.append(_state(bb, c0, index, batch, hidden))
            outs.append(emit_direction(
                bb, geom, x2d, _onnx_gates(w_ih.astype(np.float32), cell),
                _onnx_gates(w_hh.astype(np.float32), cell), bias.astype(np.float32), initial,
            ))  # fmt: skip
            h_n.append(outs[-1][1])
            c_n += outs[-1][2:]
        x = outs[0][0] if directions == 1 else bb.emit(
            relax.op.concat([o[0] for o in outs], axis=2))  # fmt: skip
    y = bb.emit(relax.op.permute_dims(x, [1, 0, 2])) if batch_first else x
    return bb.emit(relax.Tuple([y, _stack(bb, h_n)] + ([_stack(bb, c_n)] if c_n else [])))


def recurrent_decompositions() -> Any:
    """PyTorch's default decompositions (those TVM's importer runs) but the recurrent ops,
    which would decompose into one cell per time step."""
    import torch

    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.gru.input, torch.ops.aten.lstm.input, torch.ops.aten.rnn_tanh.input):
        table.pop(op, None)
    return table


def recurrent_convert_map(exported: Any) -> dict:
    """For ``from_exported_program(exported, custom_convert_map=...)``."""
    values = parameter_values(exported)
    return {op: (lambda node, importer, cell=cell: convert(cell, values, node, importer))
            for op, cell in OPS.items()}  # fmt: skip
