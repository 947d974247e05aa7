"""PairStagedLayouts: Before / Expected modules, and numerics of staged producer / consumer
kernels (every layout the kernels can meet: in place, staged again, scattered, lane tails)."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import tvm_sparse
from relay_passes.pattern_conv2d import RewriteConv2D
from relay_passes.staged_layout import PairStagedLayouts
from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    default_config,
    pattern_conv2d_primfunc,
    staged_layout,
    template_input_layout,
    tile_defaults,
    with_staged_layouts,
)
from tvm_sparse.formats import PatternWeight
from tvm_sparse.pipeline import prepare
from tvm_sparse.targets import resolve_target
from tvm_sparse.testing import random_pattern_weight

SHAPE = (1, 16, 28, 28)  # 28 wide: lane-segmented rows of 2 vectors at 16 lanes


def _chain(weights, relu_between=True, share=False, residual=False):
    """conv -> (relu) -> conv ... on x; ``share``: the first conv's output also feeds an add;
    ``residual``: the first conv adds x."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weights[0]), padding=1))
            if residual:
                y = bb.emit(relax.op.add(y, x))
            first = y
            for w in weights[1:]:
                if relu_between:
                    y = bb.emit(relax.op.nn.relu(y))
                y = bb.emit(relax.op.nn.conv2d(y, relax.const(w), padding=1))
            if share:
                y = bb.emit(relax.op.add(y, first))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return RewriteConv2D(num_threads=2, registers=32, lanes=16)(bb.get())


def _pair(mod):
    return PairStagedLayouts(min_segments=1)(mod)


def _calls(mod):
    return [
        b.value
        for b in mod["main"].body.blocks[0].bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"
    ]


def _weights(n, fg=4):
    return [random_pattern_weight(16, 16, seed=s, filter_group=fg) for s in range(n)]


def test_producer_writes_the_consumers_layout():
    """Before: two pattern convs through NCHW. Expected: the first writes the second's staged
    layout (its call's shape that layout's), the second reads it; same kernels otherwise."""
    before = _chain(_weights(2))
    producer, consumer = _calls(before)
    layout = template_input_layout(before[consumer.args[0]])
    assert layout is not None and layout.segment == 2

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
    a, b = producer.args[0], consumer.args[0]
    out_gv = bb.add_func(with_staged_layouts(before[a], None, layout), a.name_hint + "_staged")
    in_gv = bb.add_func(with_staged_layouts(before[b], layout, None), b.name_hint + "_staged")
    with bb.function("main", [x]):
        with bb.dataflow():
            args = [x, *producer.args[1].fields[1:]]
            mid = bb.emit(relax.call_tir(out_gv, args, relax.TensorType(layout.shape(1, 16))))
            args = [mid, *consumer.args[1].fields[1:]]
            y = bb.emit(relax.call_tir(in_gv, args, relax.TensorType(SHAPE, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    after = _pair(before)
    tvm.ir.assert_structural_equal(after, bb.get())
    assert [tuple(int(d) for d in c.ty.shape.values) for c in _calls(after)] == [
        layout.shape(1, 16),
        SHAPE,
    ]


@pytest.mark.parametrize(
    "case", ["shared output", "residual producer"], ids=lambda case: case.replace(" ", "-")
)
def test_pairs_that_cannot_share_a_layout_are_left_alone(case):
    """An output with another user, or a producer that adds a residual (read in NCHW by its
    kernel), keeps NCHW."""
    before = _chain(
        _weights(2), share=case == "shared output", residual=case == "residual producer"
    )
    tvm.ir.assert_structural_equal(_pair(before), before)


def test_by_default_only_consumers_of_wide_rows_are_paired():
    """Rows of 2 vectors (28 wide) stay NCHW by default (``MIN_SEGMENTS``)."""
    before = _chain(_weights(2))
    tvm.ir.assert_structural_equal(PairStagedLayouts()(before), before)


def test_chained_model_matches_pytorch_with_every_middle_layer_staged_both_ways():
    """conv -> relu -> conv -> relu -> conv compiled end to end (groups of 4 filters): the middle
    conv reads and writes staged layouts; outputs match PyTorch."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, bias=False),
    ).eval()
    with torch.no_grad():
        for conv, w in zip(model[::2], _weights(3), strict=True):
            conv.weight.copy_(torch.from_numpy(w))
    x = torch.randn(1, 16, 8, 64)  # 64 wide: rows of 4 vectors of 16 (or 8 of 8) lanes
    mod, _, _ = prepare(model, (x,), resolve_target("x86"), sparse=True)
    staged = sorted(gv.name_hint for gv in mod.functions if "_staged" in gv.name_hint)
    assert len(staged) == 3, staged
    compiled = tvm_sparse.compile(model, (x,), target="x86")
    np.testing.assert_allclose(compiled(x), model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def _run(func, args):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    kernel = tvm.compile(mod, target=resolve_target("x86")).jit()["main"]
    kernel(*args)


def _index(packed):
    arrays = packed.kernel_ptr, packed.kernel_channel, packed.kernel_values, packed.filter_order
    return [tvm.runtime.tensor(a) for a in arrays]


P = PatternConvConfig
SEG = P(rows=7, vector=16, segmented=True)


@pytest.mark.parametrize(
    "width, stride, layout_cfg, producer, consumer",
    [
        (28, 1, SEG, None, None),  # both segmented (the pass's pair)
        (56, 2, P(rows=2, vector=16, filters=4, segmented=True), None, None),  # stride-2 producer
        (28, 1, SEG, P(rows=2, vector=16), P(rows=2, vector=16)),  # phase rows: shuffled / gathered
        (28, 1, SEG, P(rows=3, vector=8, cols=8), P(rows=3, vector=8, shifted=True)),  # scattered
        (28, 1, SEG, P(rows=4, vector=16, channel_block=8), P(rows=3, vector=8, channel_block=8)),
        (14, 1, P(rows=7, vector=16, filters=2, segmented=True), None, None),  # one vector
        (64, 1, P(rows=2, vector=16, segmented=True), None, None),  # a lane tail
        (7, 1, P(rows=7, vector=8, segmented=True), None, P(rows=2, vector=16, filters=4, fold=2)),
        (7, 1, P(rows=7, vector=8, segmented=True), P(rows=2, vector=16, filters=4, fold=2), None),
        (28, 1, SEG, None, P(rows=4, vector=16, segmented=True, channel_block=8)),  # copied rows
    ],
)
def test_staged_kernels_match_pytorch(width, stride, layout_cfg, producer, consumer):
    """relu(conv_a(x) + b) -> conv_b with conv_a writing conv_b's staged layout and conv_b
    reading it (in place, or staged again from it by other configs); padding lanes and rows of
    the staged tensor start as NaN, so any position the producer leaves unwritten shows up."""
    height = width
    ga = ConvGeometry(1, 16, height, width, 16, (3, 3), (stride, stride), (1, 1, 1, 1))
    gb = ConvGeometry(1, 16, ga.out_height, ga.out_width, 16, (3, 3), (1, 1), (1, 1, 1, 1))
    wa, wb = _weights(2)
    pa, pb = (PatternWeight.from_dense(w, num_shares=2) for w in (wa, wb))
    layout = staged_layout(gb, layout_cfg)
    assert layout is not None
    cfg_a = producer or default_config(ga, filter_group=4, **tile_defaults(ga, 32, 16))
    fa = pattern_conv2d_primfunc(
        ga, pa.patterns, pa.num_kernels, pa.kernel_values.shape[1], Epilogue(True, False, "relu"),
        cfg_a, filter_group=4, staged_output=layout,
    )  # fmt: skip
    fb = pattern_conv2d_primfunc(
        gb, pb.patterns, pb.num_kernels, pb.kernel_values.shape[1], Epilogue(),
        consumer or layout_cfg, filter_group=4, staged_input=layout,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, height, width)).astype("float32")
    bias = rng.standard_normal(16).astype("float32")
    mid = tvm.runtime.tensor(np.full(layout.shape(1, 16), np.nan, "float32"))
    out = tvm.runtime.tensor(np.zeros((1, 16, gb.out_height, gb.out_width), "float32"))
    _run(fa, [tvm.runtime.tensor(x), *_index(pa), tvm.runtime.tensor(bias[pa.filter_order]), mid])
    _run(fb, [mid, *_index(pb), out])
    t = torch.from_numpy
    hidden = torch.relu(torch.conv2d(t(x), t(wa), t(bias), stride=stride, padding=1))
    expected = torch.conv2d(hidden, t(wb), padding=1).numpy()
    assert not np.isnan(mid.numpy()).any()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_a_consumer_config_of_another_segmented_layout_is_refused():
    """Segmented rows of another vector width cannot read the layout in place: a clear error."""
    gb = ConvGeometry(1, 16, 28, 28, 16, (3, 3), (1, 1), (1, 1, 1, 1))
    pb = PatternWeight.from_dense(_weights(1)[0], num_shares=2)
    with pytest.raises(ValueError, match="cannot read the staged input"):
        pattern_conv2d_primfunc(
            gb, pb.patterns, pb.num_kernels, pb.kernel_values.shape[1], Epilogue(),
            P(rows=7, vector=8, segmented=True), filter_group=4,
            staged_input=staged_layout(gb, SEG),
        )  # fmt: skip
