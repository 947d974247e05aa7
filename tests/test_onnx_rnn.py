"""ONNX GRU / LSTM / RNN: compiled models against ONNX Runtime on the same file; refusals.

Models come from ``torch.onnx.export`` (2 layers, bidirectional: GRU with linear_before_reset=1)
and from ``onnx.helper`` (reverse only, layout=1, linear_before_reset=0, no B, output subsets).
ONNX Runtime has no layout=1: there the reference is the layout-0 node on transposed tensors.
Tolerance: rtol 1e-4, atol 1e-5 (float32; the kernel's sigmoid / tanh are within 2e-7).
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnx
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import tvm_sparse
from schedules.vector_math import vector_sigmoid, vector_tanh
from tvm_sparse.frontend import import_model
from tvm_sparse.onnx_rnn import recurrent_converters
from tvm_sparse.targets import resolve_target

ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-4, 1e-5
GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _assert_matches(model: onnx.ModelProto, feeds: dict, expected: list[np.ndarray]) -> None:
    """Compile ``model`` with tvm-sparse, run it on ``feeds`` and compare every output."""
    cm = tvm_sparse.compile(model, tuple(feeds.values()))
    got = cm(*feeds.values())
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


class _Wrapper(nn.Module):
    """An nn.GRU / LSTM / RNN whose outputs are (Y, Y_h[, Y_c]) and states optional inputs."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if isinstance(self.rnn, nn.LSTM):
            y, (h, c) = self.rnn(x, (states[0], states[1]) if states else None)
            return y, h, c
        y, h = self.rnn(x, states[0] if states else None)
        return y, h


def _torch_onnx(
    cls: type, steps: int, batch: int, features: int, hidden: int, initial: bool, **kwargs
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``torch.onnx.export`` (TorchScript exporter) of ``cls`` and random inputs for it."""
    torch.manual_seed(0)
    rnn = cls(features, hidden, **kwargs)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn(steps, batch, features)
    states = [torch.randn(layers, batch, hidden) for _ in range(2 if cls is nn.LSTM else 1)]
    args = (x, *states) if initial else (x,)
    names = ["x", "h0", "c0"][: len(args)]
    buffer = io.BytesIO()
    with tvm_sparse.frontend.quiet_third_party(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_Wrapper(rnn).eval(), args, buffer, dynamo=False, input_names=names)
    return onnx.load_from_string(buffer.getvalue()), {
        n: a.numpy() for n, a in zip(names, args, strict=True)
    }


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM, nn.RNN])
def test_torch_exported_two_layer_bidirectional(cls):
    model, feeds = _torch_onnx(
        cls, 5, 3, 7, 13, initial=True, num_layers=2, bidirectional=True
    )  # fmt: skip
    _assert_matches(model, feeds, _run_ort(model, feeds))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_torch_exported_batch_one_no_initial_state(cls):
    model, feeds = _torch_onnx(cls, 6, 1, 5, 20, initial=False, num_layers=2)
    _assert_matches(model, feeds, _run_ort(model, feeds))


def _node_model(
    op: str,
    *,
    steps: int,
    batch: int,
    features: int,
    hidden: int,
    direction: str = "forward",
    layout: int = 0,
    bias: bool = True,
    initial: bool = False,
    outputs: tuple[bool, ...] = (True, True, True),
    seed: int = 0,
    inputs_extra: dict[int, np.ndarray] | None = None,
    **attrs,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One GRU / LSTM / RNN node named ``enc/<op>`` with initializer weights; the initial
    states (if any) and X are graph inputs. ``outputs``: which of Y, Y_h, Y_c the node names;
    ``inputs_extra``: more initializers by input index (4 sequence_lens, 7 P)."""
    rng = np.random.default_rng(seed)
    dirs, gates = 2 if direction == "bidirectional" else 1, GATES[op]
    scale = 1.0 / np.sqrt(hidden)
    weights = {
        1: rng.uniform(-scale, scale, (dirs, gates * hidden, features)),
        2: rng.uniform(-scale, scale, (dirs, gates * hidden, hidden)),
    }
    if bias:
        weights[3] = rng.uniform(-scale, scale, (dirs, 2 * gates * hidden))
    weights.update(inputs_extra or {})
    x_shape = (batch, steps, features) if layout else (steps, batch, features)
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    feeds = {"X": rng.standard_normal(x_shape).astype("float32")}
    if initial:
        feeds["initial_h"] = rng.standard_normal(state_shape).astype("float32")
        if op == "LSTM":
            feeds["initial_c"] = rng.standard_normal(state_shape).astype("float32")
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    node_inputs = [n if (i in weights or n in feeds) else "" for i, n in enumerate(names)]
    while node_inputs[-1] == "":
        node_inputs.pop()
    y_shape = (batch, steps, dirs, hidden) if layout else (steps, dirs, batch, hidden)
    out_specs = [("Y", y_shape), ("Y_h", state_shape), ("Y_c", state_shape)]
    out_specs = [s for s, keep in zip(out_specs, outputs, strict=False) if keep]
    if op != "LSTM":
        out_specs = [s for s in out_specs if s[0] != "Y_c"]
    node_outputs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node_outputs = [n if n in dict(out_specs) else "" for n in node_outputs]
    while node_outputs[-1] == "":
        node_outputs.pop()
    node = helper.make_node(
        op, node_inputs, node_outputs, name=f"enc/{op}", hidden_size=hidden,
        direction=direction, layout=layout, **attrs,
    )  # fmt: skip
    inits = [
        numpy_helper.from_array(v.astype("int32" if i == 4 else "float32"), names[i])
        for i, v in weights.items()
    ]
    graph = helper.make_graph(
        [node],
        "rnn",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in out_specs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, feeds


def _reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime's outputs; a layout=1 node runs as layout 0 on transposed tensors."""
    node = model.graph.node[0]
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    if not layout:
        return _run_ort(model, feeds)
    model0 = onnx.ModelProto()
    model0.CopyFrom(model)
    for attr in model0.graph.node[0].attribute:
        if attr.name == "layout":
            attr.i = 0
    del model0.graph.output[:]  # shapes differ in layout 0; ORT infers them
    for name in node.output:
        if name:
            model0.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    for vi in model0.graph.input:
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    feeds0 = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in feeds.items()}
    outs = _run_ort(model0, feeds0)
    named = [n for n in node.output if n]
    back = {"Y": (2, 0, 1, 3), "Y_h": (1, 0, 2), "Y_c": (1, 0, 2)}
    return [np.transpose(o, back[n]) for n, o in zip(named, outs, strict=True)]


HAND_BUILT = [
    dict(op="GRU", direction="reverse", layout=1, linear_before_reset=0, bias=False, initial=True),
    dict(op="GRU", direction="bidirectional", linear_before_reset=0, outputs=(False, True)),
    dict(op="GRU", direction="forward", linear_before_reset=1, activations=["Sigmoid", "Tanh"]),
    dict(op="LSTM", direction="reverse", layout=1, initial=True, outputs=(False, False, True)),
    dict(op="LSTM", direction="bidirectional", bias=False, outputs=(True, False, True)),
    dict(op="RNN", direction="reverse", initial=True),
    dict(op="RNN", direction="bidirectional", layout=1, bias=False),
]


@pytest.mark.parametrize("case", HAND_BUILT, ids=lambda c: "-".join(map(str, c.values())))
def test_hand_built_node(case):
    model, feeds = _node_model(steps=5, batch=3, features=7, hidden=13, **case)
    _assert_matches(model, feeds, _reference(model, feeds))


def test_full_sequence_lens_and_zero_peepholes_accepted():
    extra = {4: np.full(2, 4), 7: np.zeros((1, 3 * 9))}
    model, feeds = _node_model(
        "LSTM", steps=4, batch=2, features=3, hidden=9, inputs_extra=extra, initial=True
    )
    _assert_matches(model, feeds, _reference(model, feeds))


@settings(max_examples=6, deadline=None)
@given(
    op=st.sampled_from(["GRU", "LSTM", "RNN"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    layout=st.integers(0, 1),
    lbr=st.integers(0, 1),
    bias=st.booleans(),
    initial=st.booleans(),
    steps=st.integers(1, 6),
    batch=st.integers(1, 5),
    features=st.integers(1, 12),
    hidden=st.integers(1, 40),
)
def test_random_shapes(op, direction, layout, lbr, bias, initial, steps, batch, features, hidden):
    attrs = {"linear_before_reset": lbr} if op == "GRU" else {}
    model, feeds = _node_model(
        op, steps=steps, batch=batch, features=features, hidden=hidden, direction=direction,
        layout=layout, bias=bias, initial=initial, **attrs,
    )  # fmt: skip
    _assert_matches(model, feeds, _reference(model, feeds))


@pytest.mark.parametrize(
    "op, kwargs, message",
    [
        ("GRU", {"activations": ["Relu", "Tanh"]}, r"activations \['relu', 'tanh'\]"),
        ("LSTM", {"clip": 3.0}, r"clip=3\.0"),
        ("LSTM", {"input_forget": 1}, r"input_forget=1"),
        ("LSTM", {"inputs_extra": {7: np.ones((1, 12))}}, r"peepholes"),
        ("GRU", {"inputs_extra": {4: np.array([4, 2])}}, r"sequence_lens \[4, 2\]"),
        ("RNN", {"inputs_extra": {4: np.array([3, 3])}}, r"sequence_lens \[3, 3\].* than 4"),
    ],
)
def test_refusals_name_the_node(op, kwargs, message):
    model, feeds = _node_model(op, steps=4, batch=2, features=3, hidden=4, **kwargs)
    with pytest.raises(tvm_sparse.ModelLoadError, match=rf"{op} node 'enc/{op}': .*{message}"):
        tvm_sparse.compile(model, tuple(feeds.values()))


def test_runtime_weights_refused():
    model, feeds = _node_model("RNN", steps=3, batch=1, features=2, hidden=4)
    w = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, w.dims))
    del model.graph.initializer[0]
    w_value = np.zeros(tuple(w.dims), np.float32)
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"RNN node 'enc/RNN': W is computed"):
        tvm_sparse.compile(model, (*feeds.values(), w_value))


def test_converters_only_inside_the_block():
    from tvm.relax.frontend.onnx import onnx_frontend

    assert "GRU" not in onnx_frontend._get_convert_map()
    with recurrent_converters(), recurrent_converters():
        assert {"GRU", "LSTM", "RNN"} <= set(onnx_frontend._get_convert_map())
    assert "GRU" not in onnx_frontend._get_convert_map()


def test_gru_256_hidden_100_steps_is_one_kernel_call_per_layer_direction():
    model, feeds = _torch_onnx(
        nn.GRU, 100, 1, 39, 256, initial=False, num_layers=2, bidirectional=True
    )  # fmt: skip
    imported = import_model(model, tuple(feeds.values()))
    calls = [
        b.value.args[0].name_hint
        for block in imported.mod["main"].body.blocks
        for b in block.bindings
        if getattr(b.value, "op", None) == tvm.ir.Op.get("relax.call_tir")
    ]
    assert sum(name.startswith("rnn_sequence_gru") for name in calls) == 4
    assert len(calls) < 20  # not 100 steps of cells
    start = time.perf_counter()
    cm = tvm_sparse.compile(model, tuple(feeds.values()))
    assert time.perf_counter() - start < 30
    got = cm(*feeds.values())
    for g, e in zip(got, _run_ort(model, feeds), strict=True):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)
    kernels = {k.name: k.calls for k in cm.profile(*feeds.values(), runs=1).kernels}
    assert sum(c for n, c in kernels.items() if "rnn_sequence" in n) == 4
    # The report: a row per layer direction, its recurrent FLOPs (3 gates of 256 x 256).
    rows = [r for r in cm.layers if r.op == "gru"]
    assert [r.shape for r in rows] == [
        "gru 256 hidden, 100 steps x batch 1",
        "gru 256 hidden, 100 steps x batch 1, reverse",
    ] * 2
    assert all(r.flops_kept == 2 * 100 * 3 * 256 * 256 for r in rows)
    assert "gru" in cm.report()


def _activation_kernel(activation) -> tvm.runtime.Module:
    """A kernel applying the kernel's vector sigmoid / tanh to 4096 floats."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib, T.prim_func():
        T.func_name("main")
        x = T.arg("x", T.buffer((4096,), "float32"))
        y = T.arg("y", T.buffer((4096,), "float32"))
        with T.serial(0, 256) as i:
            at = tvm.tirx.Ramp(i * 16, 1, 16)
            T.buffer_store(y, activation(x[at]), [at])
    func = ib.get().with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86")).jit()


@pytest.mark.parametrize(
    "activation, exact",
    [(vector_sigmoid, lambda x: 1 / (1 + np.exp(-x))), (vector_tanh, np.tanh)],
)
def test_vector_activations_accuracy_and_nan(activation, exact):
    x = np.linspace(-20, 20, 4096).astype("float32")
    x[[7, 300]] = np.nan, np.inf
    x[301] = -np.inf
    y = tvm.runtime.tensor(np.zeros(4096, "float32"))
    _activation_kernel(activation)["main"](tvm.runtime.tensor(x), y)
    got, want = y.numpy(), exact(x.astype("float64"))
    assert np.isnan(got[7])
    finite = np.isfinite(x)
    assert np.abs(got[finite] - want[finite]).max() < 2e-7
    np.testing.assert_allclose(got[[300, 301]], want[[300, 301]], atol=1e-7)


def _numpy_direction(cell, lbr, xp, r, rbias_n, h0, c0, hidden, reverse):
    """The recurrence of one direction in float64 from the kernel's inputs (unpadded)."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h, c, ys = h0.astype("float64"), c0, np.zeros((len(xp), *h0.shape))
    for t in reversed(range(len(xp))) if reverse else range(len(xp)):
        x, hr = xp[t], h @ r.T
        part = [slice(g * hidden, (g + 1) * hidden) for g in range(4)]
        if cell == "lstm":
            i, o, f = (sig(x[:, p] + hr[:, p]) for p in part[:3])
            c = f * c + i * np.tanh(x[:, part[3]] + hr[:, part[3]])
            h = o * np.tanh(c)
        else:
            z, rr = sig(x[:, part[0]] + hr[:, part[0]]), sig(x[:, part[1]] + hr[:, part[1]])
            hn = (rr * h) @ r[part[2]].T if not lbr else rr * (hr[:, part[2]] + rbias_n)
            n = np.tanh(x[:, part[2]] + hn)
            h = (1 - z) * n + z * h
        ys[t] = h
    return ys, h, c


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("cell, lbr", [("gru", False), ("gru", True), ("lstm", True)])
def test_kernel_against_numpy(cell, lbr, one_launch):
    """The kernel alone: batch 5 (a register tile of 4 rows and a tail of 1), 3 unit tiles,
    reversed, with and without the single thread-pool launch."""
    from schedules.rnn_sequence import (
        RecurrentConfig,
        RecurrentGeometry,
        hidden_padded,
        pack_recurrent_weight,
        recurrent_sequence_primfunc,
    )

    steps, batch, hidden = 4, 5, 40
    geom = RecurrentGeometry(cell, steps, batch, hidden, reverse=True, linear_before_reset=lbr)
    cfg = RecurrentConfig(lanes=16, vectors=1, rows=4, one_launch=one_launch)
    h_pad, gates = hidden_padded(geom, cfg), geom.gates
    rng = np.random.default_rng(1)
    xp = rng.standard_normal((steps, batch, gates * hidden)).astype("float32")
    r = (rng.standard_normal((gates * hidden, hidden)) / np.sqrt(hidden)).astype("float32")
    rbias_n = rng.standard_normal(hidden).astype("float32")
    h0, c0 = rng.standard_normal((2, batch, hidden)).astype("float32")
    xp_padded = np.pad(xp.reshape(steps * batch, gates, hidden), ((0, 0), (0, 0), (0, 8)))
    args = [xp_padded.reshape(steps * batch, -1), *pack_recurrent_weight(r, geom, cfg)]
    args += [np.pad(rbias_n, (0, 8))] if cell == "gru" and lbr else []
    args += [h0, c0] if cell == "lstm" else [h0]
    outs = [np.zeros((steps, batch, h_pad)), np.zeros((batch, h_pad))]
    outs += [np.zeros((batch, h_pad))] if cell == "lstm" else []
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a, "float32")) for a in args + outs]
    func = recurrent_sequence_primfunc(geom, cfg).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86")).jit()
    lib["main"](*tensors)
    want = _numpy_direction(cell, lbr, xp, r, rbias_n, h0, c0, hidden, reverse=True)
    for got, expected in zip(tensors[len(args) :], want, strict=False):
        np.testing.assert_allclose(got.numpy()[..., :hidden], expected, rtol=RTOL, atol=ATOL)
