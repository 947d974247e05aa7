"""Block-sparse recurrent weights: packing, the format choice, the kernel against NumPy, whole
models against ONNX Runtime / PyTorch, the report rows; block pruning of Linear / GRU / LSTM /
attention matrices; the digits GRU pruned on real data; the ``builtin:`` sequence models.

Tolerance (float32, the kernel's sigmoid / tanh within 2e-7): rtol 1e-4, atol 1e-5 against
ONNX Runtime and float64 NumPy; 1e-3 against PyTorch for the 1024-unit GRU (sums of 1024
products in another order).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from test_onnx_rnn import _node_model, _numpy_direction, _reference, _run_ort, _Wrapper
from torch import nn

import tvm_sparse
from schedules.rnn_geometry import (
    RECURRENT_ATTR,
    RecurrentConfig,
    RecurrentGeometry,
    hidden_padded,
)
from schedules.rnn_sequence import recurrent_sequence_primfunc
from schedules.rnn_weights import (
    choose_recurrent_block,
    pack_block_recurrent,
    pack_recurrent,
)
from tvm_sparse.frontend import import_model
from tvm_sparse.prune import MaskEnforcer, block_prune_, prunable_matrices
from tvm_sparse.targets import resolve_target

RTOL, ATOL = 1e-4, 1e-5


def _block_sparse(rng, rows: int, cols: int, keep: float, block=(8, 8)) -> np.ndarray:
    """A random (rows, cols) float32 matrix keeping ``keep`` of its ``block`` blocks."""
    r, c = block
    mask = rng.random((-(-rows // r), -(-cols // c))) < keep
    dense = rng.standard_normal((rows, cols)) / np.sqrt(cols)
    return (dense * np.kron(mask, np.ones(block))[:rows, :cols]).astype("float32")


def _unpack(packed, geom, cfg) -> np.ndarray:
    """The (gates, h_pad, cols) weight back from the block arrays of every phase."""
    units, cols = packed.layout.block
    h_pad, width = hidden_padded(geom, cfg), cfg.width
    out = np.zeros((geom.gates, h_pad, -(-geom.hidden // cols) * cols), "float32")
    phases = [[0, 1], [2]] if geom.two_phase else [list(range(geom.gates))]
    for p, gates in enumerate(phases):
        ptr, col, values = packed.arrays[3 * p : 3 * p + 3]
        slices = width // units
        for row in range(len(ptr) - 1):
            tile, rest = divmod(row, len(gates) * slices)
            g, v = divmod(rest, slices)
            u0 = tile * width + v * units
            for b in range(ptr[row], ptr[row + 1]):
                out[gates[g], u0 : u0 + units, col[b] : col[b] + cols] = values[b].T
    return out


@settings(max_examples=25, deadline=None)
@given(
    cell=st.sampled_from(["gru", "lstm", "rnn"]),
    lbr=st.booleans(),
    hidden=st.integers(1, 70),
    keep=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    block=st.sampled_from([(8, 8), (16, 8), (8, 1), (16, 1)]),
    vectors=st.integers(1, 4),
    seed=st.integers(0, 9),
)
def test_block_packing_round_trips(cell, lbr, hidden, keep, block, vectors, seed):
    geom = RecurrentGeometry(cell, 2, 1, hidden, linear_before_reset=lbr)
    cfg = RecurrentConfig(16, vectors)
    rng = np.random.default_rng(seed)
    weight = _block_sparse(rng, geom.gates * hidden, hidden, keep)
    packed = pack_block_recurrent(weight, geom, cfg, block)
    back = _unpack(packed, geom, cfg)[:, :hidden, :hidden].reshape(weight.shape)
    np.testing.assert_array_equal(back, weight)
    units, cols = block
    assert packed.density == sum(packed.layout.blocks) * units * cols / weight.size
    for values, count in zip(packed.arrays[2::3], packed.layout.blocks, strict=True):
        if count:  # no stored block is all zero
            assert len(values) == count and values.any(axis=(1, 2)).all()
        else:  # an empty phase keeps one zero block, never read
            assert values.shape == (1, cols, units) and not values.any()


def test_format_choice_comes_from_the_weight():
    rng = np.random.default_rng(0)
    geom = RecurrentGeometry("gru", 100, 1, 1024)
    cfg = RecurrentConfig(16, 4)
    sparse = _block_sparse(rng, 3 * 1024, 1024, 0.1)
    assert choose_recurrent_block(sparse, geom, cfg) == (8, 8)
    columns = _block_sparse(rng, 3 * 1024, 1024, 0.1, block=(16, 1))
    assert choose_recurrent_block(columns, geom, cfg) in ((16, 1), (8, 1))
    dense = rng.standard_normal((3 * 1024, 1024)).astype("float32")
    assert choose_recurrent_block(dense, geom, cfg) is None
    assert pack_recurrent(dense, geom, cfg).format == "dense"
    half = _block_sparse(rng, 3 * 1024, 1024, 0.9)  # most blocks kept: dense is faster
    assert choose_recurrent_block(half, geom, cfg) is None
    small = RecurrentGeometry("gru", 100, 1, 256)
    assert choose_recurrent_block(_block_sparse(rng, 768, 256, 0.8), small, cfg) is None
    empty = pack_recurrent(np.zeros((3 * 1024, 1024), "float32"), geom, cfg)
    assert empty.layout is not None and empty.layout.blocks == (0,) and empty.density == 0.0
    with pytest.raises(
        ValueError, match=r"gru layer with 1024 hidden units must be \(3072, 1024\)"
    ):
        pack_recurrent(dense[:100], geom, cfg)


@settings(max_examples=8, deadline=None)
@given(
    cell_lbr=st.sampled_from([("gru", True), ("gru", False), ("lstm", True)]),
    batch=st.integers(1, 5),
    hidden=st.integers(1, 45),
    keep=st.sampled_from([0.0, 0.2, 0.6]),
    block=st.sampled_from([(8, 8), (16, 8), (8, 1), (16, 1)]),
    reverse=st.booleans(),
)
def test_block_kernel_against_numpy(cell_lbr, batch, hidden, keep, block, reverse):
    """The kernel alone on every block shape, an all-zero block row likely at these
    densities, an all-zero weight at keep 0, tails of batch rows and of units."""
    cell, lbr = cell_lbr
    steps = 3
    geom = RecurrentGeometry(cell, steps, batch, hidden, reverse, lbr)
    cfg = RecurrentConfig(16, 2, min(batch, 4))
    h_pad, gates = hidden_padded(geom, cfg), geom.gates
    rng = np.random.default_rng(hidden * 7 + batch)
    xp = rng.standard_normal((steps, batch, gates * hidden)).astype("float32")
    r = _block_sparse(rng, gates * hidden, hidden, keep)
    r[: min(8, hidden)] = 0.0  # the first block row of the first gate is empty
    rbias_n = rng.standard_normal(hidden).astype("float32")
    h0, c0 = rng.standard_normal((2, batch, hidden)).astype("float32")
    packed = pack_block_recurrent(r, geom, cfg, block)
    xp_pad = np.pad(xp.reshape(steps * batch, gates, hidden), ((0, 0), (0, 0), (0, h_pad - hidden)))
    args = [xp_pad.reshape(steps * batch, -1), *packed.arrays]
    args += [np.pad(rbias_n, (0, h_pad - hidden))] if cell == "gru" and lbr else []
    args += [h0, c0] if cell == "lstm" else [h0]
    outs = [np.zeros((steps, batch, h_pad)), np.zeros((batch, h_pad))]
    outs += [np.zeros((batch, h_pad))] if cell == "lstm" else []
    outs = [o.astype("float32") for o in outs]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args + outs]
    func = recurrent_sequence_primfunc(geom, cfg, layout=packed.layout)
    func = func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("x86")).jit()
    lib["main"](*tensors)
    want = _numpy_direction(cell, lbr, xp, r, rbias_n, h0, c0, hidden, reverse)
    for got, expected in zip(tensors[len(args) :], want, strict=False):
        np.testing.assert_allclose(got.numpy()[..., :hidden], expected, rtol=RTOL, atol=ATOL)


def _prune_r(model: onnx.ModelProto, keep: float, seed: int = 0) -> onnx.ModelProto:
    """``model`` with its recurrent weight R keeping ``keep`` of 8x8 blocks per direction."""
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name == "R":
            r = numpy_helper.to_array(init)
            pruned = np.stack([d * (_block_sparse(rng, *d.shape, keep) != 0) for d in r])
            init.CopyFrom(numpy_helper.from_array(pruned.astype("float32"), "R"))
    return model


def _compile_and_match(model, feeds, expected):
    cm = tvm_sparse.compile(model, tuple(feeds.values()))
    got = cm(*feeds.values())
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)
    return cm


@settings(max_examples=5, deadline=None)
@given(
    op=st.sampled_from(["GRU", "LSTM", "RNN"]),
    direction=st.sampled_from(["forward", "reverse", "bidirectional"]),
    lbr=st.integers(0, 1),
    layout=st.integers(0, 1),
    batch=st.integers(1, 3),
    hidden=st.sampled_from([37, 64, 80]),
)
def test_block_sparse_nodes_against_onnxruntime(op, direction, lbr, layout, batch, hidden):
    attrs = {"linear_before_reset": lbr} if op == "GRU" else {}
    model, feeds = _node_model(
        op, steps=4, batch=batch, features=5, hidden=hidden, direction=direction,
        layout=layout, initial=True, **attrs,
    )  # fmt: skip
    model = _prune_r(model, 0.15)
    cm = _compile_and_match(model, feeds, _reference(model, feeds))
    rows = [r for r in cm.layers if r.op == op.lower()]
    assert len(rows) == (2 if direction == "bidirectional" else 1)
    assert all(r.format.startswith("bsr") for r in rows)


def _export(rnn: nn.Module, steps: int, batch: int) -> tuple[onnx.ModelProto, dict]:
    """ONNX export (TorchScript exporter) of ``rnn`` with random x and initial states."""
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    x = torch.randn(steps, batch, rnn.input_size)
    states = [torch.randn(layers, batch, rnn.hidden_size)] * (2 if rnn.mode == "LSTM" else 1)
    names = ["x", "h0", "c0"][: 1 + len(states)]
    buffer = io.BytesIO()
    with tvm_sparse.frontend.quiet_third_party(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_Wrapper(rnn).eval(), (x, *states), buffer, dynamo=False,
                          input_names=names)  # fmt: skip
    feeds = {n: t.numpy() for n, t in zip(names, (x, *states), strict=True)}
    return onnx.load_from_string(buffer.getvalue()), feeds


def _kernel_formats(model: onnx.ModelProto, feeds: dict) -> list[str]:
    """The ``format`` each recurrence PrimFunc of the imported model carries."""
    mod = import_model(model, tuple(feeds.values())).mod
    attrs = [f.attrs.get(RECURRENT_ATTR) for f in mod.functions.values() if f.attrs is not None]
    return [str(a["format"]) for a in attrs if a is not None]


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_pruned_torch_export_takes_the_block_path(cls):
    """2 layers, bidirectional, batch 2, W_hh keeping 10 % of 8x8 blocks (block_prune_ on the
    module): block kernels, report rows stating format and density; ONNX Runtime agrees."""
    torch.manual_seed(0)
    rnn = cls(9, 256, num_layers=2, bidirectional=True)
    block_prune_(rnn, 0.1, (8, 8), select=lambda n: "weight_hh" in n)
    model, feeds = _export(rnn, 6, 2)
    cm = _compile_and_match(model, feeds, _run_ort(model, feeds))
    rows = [r for r in cm.layers if r.op == cls.__name__.lower()]
    assert len(rows) == 4 and all(r.format == "bsr 8x8" for r in rows)
    assert all(0.05 < r.density < 0.15 for r in rows)
    assert all(r.flops_kept == round(r.flops_dense * r.density) for r in rows)
    assert "W_hh in 8x8 blocks" in rows[0].reason and "bsr 8x8" in cm.report()
    assert set(_kernel_formats(model, feeds)) == {"bsr"}


def test_dense_recurrent_weight_stays_dense():
    torch.manual_seed(0)
    model, feeds = _export(nn.GRU(7, 64), 5, 1)
    cm = _compile_and_match(model, feeds, _run_ort(model, feeds))
    rows = [r for r in cm.layers if r.op == "gru"]
    assert [r.format for r in rows] == ["dense"] and rows[0].density == 1.0
    assert _kernel_formats(model, feeds) == ["dense"]


def test_all_zero_recurrent_weight():
    model, feeds = _node_model("GRU", steps=4, batch=2, features=3, hidden=24, initial=True)
    model = _prune_r(model, 0.0)
    cm = _compile_and_match(model, feeds, _reference(model, feeds))
    row = next(r for r in cm.layers if r.op == "gru")
    assert row.format.startswith("bsr") and row.density == 0.0 and row.flops_kept == 0


class _Mixed(nn.Module):
    """A Linear, a 2-layer bidirectional LSTM and an attention layer (packed in_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.rnn = nn.LSTM(32, 24, num_layers=2, bidirectional=True)
        self.attn = nn.MultiheadAttention(48, 4)


def _is_block_structured(weight: torch.Tensor, mask: torch.Tensor, block) -> bool:
    """Every ``block`` block of the mask is all kept or all dropped; the weight is zero off it."""
    r, c = block
    m = torch.nn.functional.pad(mask.float(), (0, -mask.shape[1] % c, 0, -mask.shape[0] % r))
    blocks = m.reshape(m.shape[0] // r, r, m.shape[1] // c, c).sum(dim=(1, 3))
    full = torch.ones_like(m).reshape(blocks.shape[0], r, blocks.shape[1], c).sum(dim=(1, 3))
    return bool(((blocks == 0) | (blocks == full)).all() and (weight[~mask] == 0).all())


def test_block_prune_every_matrix_kind():
    torch.manual_seed(0)
    net = _Mixed()
    masks = block_prune_(net, 0.25, (8, 8))
    rnn = [
        f"rnn.weight_{k}_l{i}{s}" for i in (0, 1) for s in ("", "_reverse") for k in ["ih", "hh"]
    ]
    expected = {"inp.weight", *rnn, "attn.in_proj_weight", "attn.out_proj.weight"}
    assert set(masks) == expected == set(prunable_matrices(net))
    params = dict(net.named_parameters())
    for name, mask in masks.items():
        weight = params[name]
        assert mask.shape == weight.shape and _is_block_structured(weight, mask, (8, 8)), name
        blocks = -(-weight.shape[0] // 8) * -(-weight.shape[1] // 8)
        kept_blocks = int(mask[::8, ::8].sum())  # a kept block keeps its top-left weight
        assert kept_blocks == max(1, round(0.25 * blocks)), name


def test_block_prune_bcr_and_selection():
    torch.manual_seed(0)
    net = _Mixed()
    masks = block_prune_(net, 0.25, (8, 8), "bcr", select=lambda n: ".weight_hh_" in n)
    assert set(masks) == {f"rnn.weight_hh_l{i}{s}" for i in (0, 1) for s in ("", "_reverse")}
    for mask in masks.values():  # every block keeps 2 of its 8 columns, all 8 rows
        per_block = mask.reshape(mask.shape[0] // 8, 8, -1, 8).sum(dim=(1, 3))
        assert (per_block == 16).all()
    assert (net.inp.weight != 0).all()  # not selected: untouched


def test_block_prune_refusals():
    with pytest.raises(ValueError, match="fmt must be one of"):
        block_prune_(nn.Linear(4, 4), 0.5, (2, 2), "csr")
    with pytest.raises(ValueError, match=r"block must be \(rows, columns\)"):
        block_prune_(nn.Linear(4, 4), 0.5, (0, 2))
    with pytest.raises(ValueError, match="Conv2d has no Linear, RNN or attention weight"):
        block_prune_(nn.Conv2d(3, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"keep rate must be in \(0, 1\]"):
        block_prune_(nn.Linear(4, 4), 0.0)


def test_masks_by_parameter_name_hold_through_fine_tuning():
    torch.manual_seed(0)
    net = _Mixed()
    masks = block_prune_(net, 0.3, (8, 8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    enforcer = MaskEnforcer(net, masks).attach(opt)
    x = torch.randn(5, 2, 12)
    for _ in range(3):
        y, _ = net.rnn(net.inp(x))
        loss = net.attn(y, y, y)[0].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    enforcer.detach()
    params = dict(net.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks.items())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_digits_gru_block_pruned_keeps_accuracy_and_compiles():
    """scikit-learn digits as 8 steps of 8 pixels: dense 98.4 %, both GRU matrices keeping 30 %
    of their 8x8 blocks and fine-tuned: 96.9 % (seen here); the compiled model (block kernel)
    predicts as PyTorch does."""
    from tvm_sparse.benchmarking import onnx_bytes
    from tvm_sparse.prune.digits import load_digits_data
    from tvm_sparse.prune.digits_rnn import run_digits_rnn

    data = load_digits_data()
    result = run_digits_rnn(keep=0.3, data=data)
    assert result.dense_acc >= 97.0
    assert result.pruned_acc >= 95.0 and result.oneshot_acc < result.pruned_acc
    assert 0.28 <= result.density <= 0.32
    x = data.x_test.numpy()
    with torch.no_grad():
        logits = result.model(data.x_test).numpy()
    model = onnx.load_from_string(onnx_bytes(result.model.eval(), (x,)))
    cm = tvm_sparse.compile(model, (x,))
    np.testing.assert_allclose(cm(x), logits, rtol=1e-4, atol=1e-4)
    assert (cm(x).argmax(1) == logits.argmax(1)).all()
    row = next(r for r in cm.layers if r.op == "gru")
    assert row.format == "bsr 8x8" and row.density == pytest.approx(0.3, abs=0.05)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_builtin_gru_bcr_against_onnxruntime_and_pytorch():
    """``builtin:gru-bcr`` as the CLI loads it: 2 layers of block kernels (10 % of 8x8 blocks),
    compiled in under 30 s, matching ONNX Runtime and PyTorch."""
    import argparse
    import time

    from tvm_sparse.cli import _load
    from tvm_sparse.sequence_models import recurrent_model

    model, inputs = _load(argparse.Namespace(model="builtin:gru-bcr", input_shape=None))
    assert inputs[0].shape == (100, 1, 39)
    start = time.perf_counter()
    cm = tvm_sparse.compile(model, inputs)
    assert time.perf_counter() - start < 30
    rows = [r for r in cm.layers if r.op == "gru"]
    assert [r.format for r in rows] == ["bsr 8x8"] * 2
    assert all(r.density == pytest.approx(0.1, abs=0.01) for r in rows)
    got = cm(*inputs)
    expected = _run_ort(model, {model.graph.input[0].name: inputs[0]})
    np.testing.assert_allclose(got, expected[0], rtol=RTOL, atol=ATOL)
    net, x = recurrent_model("GRU")
    with torch.no_grad():
        np.testing.assert_allclose(got, net(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-4)


def test_encoder_block_pruned_matches_pytorch():
    """``encoder_model`` (the builder of ``builtin:bert-bsr``), one layer and 16 tokens:
    every matrix keeps 10 % of 16x1 blocks; the compiled model matches PyTorch."""
    from tvm_sparse.sequence_models import BUILTINS, encoder_model

    assert {"builtin:gru-bcr", "builtin:bert-bsr"} <= set(BUILTINS)
    net, x = encoder_model(layers=1, tokens=16)
    w = net.layers[0].self_attn.in_proj_weight.detach()
    assert (w.reshape(-1, 16, w.shape[1]).abs().sum(1) > 0).float().mean() == pytest.approx(
        0.1, abs=0.01
    )
    cm = tvm_sparse.compile(net, (x,))
    with torch.no_grad():
        np.testing.assert_allclose(cm(x), net(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-3)
