"""ONNX ``GRU`` / ``LSTM`` / ``RNN`` import (TVM 0.27's Relax ONNX frontend has no converter).

Each layer direction becomes two Relax calls, never T unrolled copies of the cell:

1. the input projection of all time steps at once, ``matmul(X (T*B, I), W_ih^T) + b`` (gate
   blocks padded to the kernel's tile width), a plain matmul the GEMM passes can take;
2. one ``call_tir`` to ``schedules.rnn_sequence`` (the loop over time inside the kernel),
   whose outputs are sliced to H and assembled into ONNX's ``Y`` / ``Y_h`` / ``Y_c``; ``R``
   packed dense or block-sparse, as its zeros decide (``schedules.rnn_weights``).

Supported: ``direction`` forward / reverse / bidirectional, ``layout`` 0 and 1, GRU
``linear_before_reset`` 0 and 1, optional ``B``, ``initial_h`` / ``initial_c``, ``sequence_lens``
absent or all equal to T, constant weights, the default activations. Refused, naming the node
(``ModelLoadError``): other activations, ``clip``, ``input_forget``, non-zero LSTM peepholes
``P``, shorter sequences, weights computed at run time.

Measured on Intel Xeon (AVX-512, 2 cores), 2-layer GRU (input 39, hidden 1024, T 100, batch
1, from ``torch.onnx.export``): compiles in 1.0 s; 48 ms a run against ONNX Runtime's 53 ms
(2 threads each, median of interleaved rounds); hidden 256: 1.0 ms against 2.2 ms. On AMD
EPYC Zen 5 (2 threads), ``W_hh`` keeping 10 % of its 8x8 blocks (the BSR kernel): GRU 3.7 ms
against ONNX Runtime's 19.7 ms (5.3x), LSTM 4.7 against 24.5 ms (5.2x); compile 1.0 / 1.2 s.

TVM offers no hook for extra converters: ``recurrent_converters()`` adds them to the map
``onnx_frontend._get_convert_map`` returns, only while the block runs (reentrant, thread-safe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax

from relay_passes.utils import const_value, static_shape
from schedules.rnn_sequence import (
    RecurrentConfig,
    RecurrentGeometry,
    default_recurrent_config,
    hidden_padded,
    pad_gate_rows,
    recurrent_sequence_primfunc,
)
from schedules.rnn_weights import PackedRecurrent, pack_recurrent

from .errors import ModelLoadError

RECURRENT_OPS = {"GRU": "gru", "LSTM": "lstm", "RNN": "rnn"}
DEFAULT_ACTIVATIONS = {"GRU": ("sigmoid", "tanh"), "LSTM": ("sigmoid", "tanh", "tanh")}
DEFAULT_ACTIVATIONS["RNN"] = ("tanh",)
KERNEL_LANES = 16  # AVX-512; on AVX2 each vector compiles to two


@dataclass(frozen=True)
class RecurrentNode:
    """What a GRU / LSTM / RNN node asks for, its attributes checked."""

    op: str
    where: str  # "GRU node '/rnn/GRU'", for messages
    hidden: int
    directions: tuple[bool, ...]  # reverse? per direction, in ONNX's order
    layout: int
    linear_before_reset: bool

    @property
    def cell(self) -> str:
        return RECURRENT_OPS[self.op]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_node(op: str, attr: dict) -> RecurrentNode:
    """The node's settings, or a ``ModelLoadError`` naming it and what is not supported."""
    name = attr.get("tvm_custom", {}).get("name") or "(unnamed)"
    where = f"{op} node {name!r}"

    def refuse(what: str) -> ModelLoadError:
        return ModelLoadError(
            f"{where}: {what} is not supported (tvm-sparse compiles {op} "
            "with its default activations, no clip, full-length sequences)"
        )

    direction = _text(attr.get("direction", "forward"))
    directions = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
    if direction not in directions:
        raise refuse(f"direction {direction!r}")
    activations = tuple(_text(a).lower() for a in attr.get("activations", ()))
    if activations and activations != DEFAULT_ACTIVATIONS[op] * len(directions[direction]):
        raise refuse(f"activations {list(activations)}")
    if "clip" in attr:
        raise refuse(f"clip={attr['clip']}")
    if int(attr.get("input_forget", 0)):
        raise refuse("input_forget=1")
    layout = int(attr.get("layout", 0))
    if layout not in (0, 1):
        raise refuse(f"layout={layout}")
    hidden = int(attr.get("hidden_size", 0))
    lbr = bool(int(attr.get("linear_before_reset", 0)))
    return RecurrentNode(op, where, hidden, directions[direction], layout, lbr)


def _constant(expr: relax.Expr | None, what: str, node: RecurrentNode) -> np.ndarray | None:
    if expr is None:
        return None
    value = const_value(expr)
    if value is None:
        raise ModelLoadError(
            f"{node.where}: {what} is computed at run time; tvm-sparse needs it "
            "as a constant (an initializer)"
        )
    return value.astype(np.float32) if value.dtype.kind == "f" else value


def convert_recurrent(
    op: str, bb: relax.BlockBuilder, inputs: list, attr: dict, _params: Any
) -> relax.Tuple:
    """The converter TVM's importer calls: (Y, Y_h[, Y_c]) of the node as Relax values."""
    node = parse_node(op, attr)
    x = inputs[0]
    shape = static_shape(x)
    if shape is None or len(shape) != 3:
        raise ModelLoadError(f"{node.where}: input X has no static 3-D shape ({x.ty})")
    if node.layout == 1:
        x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        shape = (shape[1], shape[0], shape[2])
    steps, batch, features = shape
    w = _constant(inputs[1], "W", node)
    r = _constant(inputs[2], "R", node)
    hidden = node.hidden or r.shape[-1]
    node = dataclasses.replace(node, hidden=hidden)
    gates = w.shape[1] // hidden
    bias = _constant(inputs[3], "B", node)
    if bias is None:
        bias = np.zeros((len(node.directions), 2 * gates * hidden), np.float32)
    _check_sequence_lens(_constant(inputs[4], "sequence_lens", node), steps, node)
    if op == "LSTM":
        _check_peepholes(_constant(inputs[7], "P", node), node)
    x2d = bb.emit(relax.op.reshape(x, (steps * batch, features)))
    outs: list[list[relax.Expr]] = []
    for d, reverse in enumerate(node.directions):
        geom = RecurrentGeometry(node.cell, steps, batch, hidden, reverse, node.linear_before_reset)
        initial = [_initial(bb, inputs[5], d, node, batch)]
        if op == "LSTM":
            initial.append(_initial(bb, inputs[6], d, node, batch))
        outs.append(emit_direction(bb, geom, x2d, w[d], r[d], bias[d], initial))
    return _assemble(bb, outs, node)


def _check_sequence_lens(lens: np.ndarray | None, steps: int | None, node: RecurrentNode) -> None:
    """``sequence_lens`` must be T everywhere (``steps`` None: before shapes are known, only
    that all are equal)."""
    if lens is None or not lens.size:
        return
    full = steps if steps is not None else int(lens.max())
    if np.any(lens != full):
        raise ModelLoadError(
            f"{node.where}: sequence_lens {lens.tolist()} has sequences shorter than {full} "
            "steps; only full-length sequences (all equal to the input's) are supported"
        )


def _check_peepholes(peepholes: np.ndarray | None, node: RecurrentNode) -> None:
    if peepholes is not None and np.any(peepholes):
        raise ModelLoadError(f"{node.where}: peepholes (input P) are not supported")


def check_recurrent_nodes(model: Any) -> None:
    """Refuse what a node's attributes and initializers already show, before TVM's importer
    runs (on a converter's error it prints the node's inputs, then re-raises)."""
    from onnx import helper

    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        attr = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attr["tvm_custom"] = {"name": node.name}
        parsed = parse_node(node.op_type, attr)
        _check_sequence_lens(_initializer(node, 4, initializers), None, parsed)
        if node.op_type == "LSTM":
            _check_peepholes(_initializer(node, 7, initializers), parsed)


def _initializer(node: Any, index: int, initializers: dict) -> np.ndarray | None:
    """The value of the node's input ``index`` when it is an initializer, else None."""
    from onnx import numpy_helper

    name = node.input[index] if len(node.input) > index else ""
    return numpy_helper.to_array(initializers[name]) if name in initializers else None


def _initial(
    bb: relax.BlockBuilder, state: relax.Expr | None, d: int, node: RecurrentNode, batch: int
) -> relax.Expr:
    """Direction ``d``'s (B, H) slice of ``initial_h`` / ``initial_c`` (zeros when absent)."""
    if state is None:
        return relax.const(np.zeros((batch, node.hidden), np.float32))
    axis = 1 if node.layout == 1 else 0
    part = relax.op.strided_slice(state, axes=[axis], begin=[d], end=[d + 1])
    return bb.emit(relax.op.reshape(part, (batch, node.hidden)))


def emit_direction(
    bb: relax.BlockBuilder,
    geom: RecurrentGeometry,
    x2d: relax.Expr,
    w: np.ndarray,
    r: np.ndarray,
    bias: np.ndarray,
    initial: list[relax.Expr],
) -> list[relax.Expr]:
    """The projection matmul and the recurrence kernel of one direction: [Y, Y_h(, Y_c)], Y
    (T, B, H), the states (B, H)."""
    cfg = default_recurrent_config(geom, KERNEL_LANES)
    hidden, h_pad = geom.hidden, hidden_padded(geom, cfg)
    size = geom.gates * hidden
    w_bias, r_bias = bias[:size], bias[size:]
    x_bias = w_bias + r_bias  # R's biases add outside the reset gate, but for GRU's n
    if geom.cell == "gru" and geom.linear_before_reset:
        x_bias[2 * hidden :] = w_bias[2 * hidden :]
    w_t = np.ascontiguousarray(pad_gate_rows(w, geom, cfg).T)
    projected = relax.op.matmul(x2d, relax.const(w_t))
    xp = bb.emit(relax.op.add(projected, relax.const(pad_gate_rows(x_bias, geom, cfg))))
    packed = pack_recurrent(r, geom, cfg)
    args = [xp, *(relax.const(p) for p in packed.arrays)]
    if geom.cell == "gru" and geom.linear_before_reset:
        args.append(relax.const(np.pad(r_bias[2 * hidden :], (0, h_pad - hidden))))
    args += initial
    states = 2 if geom.cell == "lstm" else 1
    out_types = [relax.TensorType((geom.steps, geom.batch, h_pad), "float32")]
    out_types += [relax.TensorType((geom.batch, h_pad), "float32")] * states
    kernel = _kernel(bb, geom, cfg, packed)
    call = bb.emit(relax.call_tir(kernel, args, out_types))
    outs = [bb.emit(relax.TupleGetItem(call, i)) for i in range(1 + states)]
    if h_pad != hidden:
        outs = [
            bb.emit(relax.op.strided_slice(o, axes=[o.ty.ndim - 1], begin=[0], end=[hidden]))
            for o in outs
        ]
    return outs


def kernel_name(geom: RecurrentGeometry, packed: PackedRecurrent | None = None) -> str:
    """``rnn_sequence_<cell>...``: one PrimFunc per distinct geometry and weight layout
    (a block-sparse weight's block shape and block counts are in the name; layers share
    the kernel where all agree)."""
    lbr = "_lbr0" if geom.cell == "gru" and not geom.linear_before_reset else ""
    rev = "_reverse" if geom.reverse else ""
    fmt = ""
    if packed is not None and packed.layout is not None:
        units, cols = packed.layout.block
        fmt = f"_bsr{units}x{cols}_" + "_".join(f"n{n}" for n in packed.layout.blocks)
    return f"rnn_sequence_{geom.cell}_t{geom.steps}_b{geom.batch}_h{geom.hidden}{rev}{lbr}{fmt}"


def _kernel(
    bb: relax.BlockBuilder, geom: RecurrentGeometry, cfg: RecurrentConfig, packed: PackedRecurrent
) -> tvm.ir.GlobalVar:
    name = kernel_name(geom, packed)
    mod = bb.get()
    if name in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod.get_global_var(name)
    return bb.add_func(recurrent_sequence_primfunc(geom, cfg, name, packed.layout), name)


def _assemble(
    bb: relax.BlockBuilder, outs: list[list[relax.Expr]], node: RecurrentNode
) -> relax.Tuple:
    """ONNX's outputs from the directions': Y (T, D, B, H) and states (D, B, H), or with
    layout 1 Y (B, T, D, H) and states (B, D, H)."""
    steps, batch, hidden = (int(d) for d in outs[0][0].ty.shape.values)
    if len(outs) == 1:  # a reshape, which the VM does without a copy
        y = bb.emit(relax.op.reshape(outs[0][0], (steps, 1, batch, hidden)))
        states = [bb.emit(relax.op.reshape(s, (1, batch, hidden))) for s in outs[0][1:]]
    else:
        y = bb.emit(relax.op.concat([relax.op.expand_dims(o[0], [1]) for o in outs], axis=1))
        states = [
            bb.emit(relax.op.concat([relax.op.expand_dims(o[i], [0]) for o in outs], axis=0))
            for i in range(1, len(outs[0]))
        ]
    if node.layout == 1:
        y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
        states = [bb.emit(relax.op.permute_dims(s, [1, 0, 2])) for s in states]
    return relax.Tuple([y, *states])


@dataclass(frozen=True)
class _Converter:
    """What TVM's importer looks up in its convert map: ``get_converter(opset)`` -> function."""

    op: str

    def get_converter(self, _opset: int) -> Callable:
        return functools.partial(convert_recurrent, self.op)


CONVERTERS = {op: _Converter(op) for op in RECURRENT_OPS}


class _ConvertMapPatch:
    """Adds ``CONVERTERS`` to TVM's ONNX convert map while at least one import runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._original: Callable | None = None

    def enter(self) -> None:
        from tvm.relax.frontend.onnx import onnx_frontend

        with self._lock:
            if self._users == 0:
                original = onnx_frontend._get_convert_map
                self._original = original
                onnx_frontend._get_convert_map = lambda: {**original(), **CONVERTERS}
            self._users += 1

    def exit(self) -> None:
        from tvm.relax.frontend.onnx import onnx_frontend

        with self._lock:
            self._users -= 1
            if self._users == 0:
                onnx_frontend._get_convert_map = self._original
                self._original = None


_PATCH = _ConvertMapPatch()


@contextlib.contextmanager
def recurrent_converters(model: Any = None) -> Iterator[None]:
    """TVM's ONNX importer knows GRU / LSTM / RNN inside this block; ``model``'s recurrent
    nodes are checked first (``check_recurrent_nodes``)."""
    if model is not None:
        check_recurrent_nodes(model)
    _PATCH.enter()
    try:
        yield
    finally:
        _PATCH.exit()
