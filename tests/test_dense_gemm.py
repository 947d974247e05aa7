"""Dense 1x1 convs on the packed GEMM kernel (``schedules.dense_gemm``): numerics against
PyTorch on every x86 ISA this host runs, odd sizes, strides and the fused epilogue; the tiling
helpers; the pass's choice."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS, prefetch_lines

import tvm_sparse
from relay_passes.linear_plan import GEMM_MIN_ROWS
from schedules.dense_gemm import (
    DENSE_CONV1X1,
    PREFETCH_BYTES,
    ColumnTile,
    GemmConfig,
    column_tiles,
    conv1x1_gemm_config,
    conv1x1_gemm_primfunc,
    conv1x1_gemm_template,
    default_gemm_config,
    gemm_k_block,
    gemm_unroll,
    job_tiles,
    pack_columns,
    pack_rows,
)
from schedules.dense_linear import linear_gemm_primfunc, linear_gemm_template, padded
from schedules.epilogue import Epilogue
from schedules.tunable import knob_space, realize
from tvm_sparse.targets import resolve_target, vector_lanes, vector_registers
from tvm_sparse.tuning.flops import template_flops

EPILOGUES = [(False, False, "none"), (True, False, "relu"), (True, True, "relu6")]
TOL = 1e-4  # float32, another summation order: relative to the largest output


class PointwiseBlock(torch.nn.Module):
    """1x1 conv (+ bias) (+ residual) (+ ReLU / ReLU6), the chains the kernel fuses."""

    def __init__(
        self, cin: int, cout: int, stride: int, bias: bool, residual: bool, act: str
    ) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 1, stride, bias=bias)
        self.residual, self.act = residual, act

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.residual:
            y = y + r
        if self.act == "relu":
            y = torch.relu(y)
        elif self.act == "relu6":
            y = torch.nn.functional.relu6(y)
        return y


def _check(model: torch.nn.Module, inputs: tuple, target: str) -> tvm_sparse.CompiledModel:
    cm = tvm_sparse.compile(model.eval(), inputs, target=target)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in inputs)).numpy()
    got = cm(*inputs)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))
    return cm


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.integers(1, 40),
    cout=st.integers(1, 40),
    size=st.integers(3, 31),
    stride=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 2]),
    epilogue=st.sampled_from(EPILOGUES),
)
def test_pointwise_conv_matches_pytorch(target, cin, cout, size, stride, batch, epilogue):
    bias, residual, act = epilogue
    model = PointwiseBlock(cin, cout, stride, bias, residual, act)
    rng = np.random.default_rng(cin * 100 + cout)
    out = (size - 1) // stride + 1
    x = rng.standard_normal((batch, cin, size, size)).astype("float32")
    r = rng.standard_normal((batch, cout, out, out)).astype("float32")
    cm = _check(model, (x, r), target)
    conv = cm.layers[0]
    assert "packed GEMM" in conv.reason, conv.reason
    fused = ["bias"] * bias + ["residual"] * residual + [act] * (act != "none")
    assert conv.epilogue == "+".join(fused)  # one kernel: the whole chain fused


@pytest.mark.parametrize("target", ISA_TARGETS)
def test_resnet50_shaped_layers_match_pytorch(target):
    """ResNet-50's 1x1 shapes at smaller maps: K up to 2048, O up to 1024, a stride-2 shortcut,
    a 7x7 map (its last column rows-in-lanes); bias + residual + ReLU. On AVX2, K over 256 in
    passes (the reason says so), one pass on AVX-512."""
    passes = vector_registers(tvm.target.Target(resolve_target(target))) <= 16
    shapes = [(256, 64, 14, 1), (1024, 256, 14, 1), (512, 1024, 28, 2), (2048, 40, 7, 1)]
    for cin, cout, size, stride in shapes:
        model = PointwiseBlock(cin, cout, stride, True, True, "relu")
        rng = np.random.default_rng(cin)
        x = rng.standard_normal((1, cin, size, size)).astype("float32")
        out = (size - 1) // stride + 1
        r = rng.standard_normal((1, cout, out, out)).astype("float32")
        reason = _check(model, (x, r), target).layers[0].reason
        k_block = 256 if passes and cin > 256 else 0
        assert reason.endswith(f"K in passes of {k_block}" if k_block else "packed GEMM"), reason


def test_column_tiles_cover_the_map_once():
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    for columns in [1, 15, 16, 47, 48, 49, 95, 96, 196, 784, 3136]:
        full, last = column_tiles(columns, cfg)
        covered = full * cfg.width + (sum(last.widths) if last else 0)
        assert covered == columns
        if last is not None:
            assert last.start == full * cfg.width and last.cross == 0
            assert all(0 < w <= cfg.lanes for w in last.widths)
            # the accumulators of the last tile fit the registers the full tiles use
            assert last.rows * len(last.widths) <= cfg.rows * cfg.vectors
            assert cfg.rows % last.rows == 0


def test_a_last_column_joins_the_last_full_tile_rows_in_lanes():
    cfg = GemmConfig(rows=8, vectors=3, lanes=16, cross=1)
    assert default_gemm_config(16, 32) == cfg  # AVX-512; AVX2 spills (see default_gemm_config)
    assert default_gemm_config(8, 16).cross == 0 and default_gemm_config(4, 32).cross == 0
    # AVX2: 4 x 2 tiles with the column where the map is whole 2-vector tiles and one column
    assert default_gemm_config(8, 16, 49) == GemmConfig(rows=4, vectors=2, lanes=8, cross=1)
    assert default_gemm_config(8, 16, 196) == default_gemm_config(8, 16) == GemmConfig(4, 3, 8)
    assert default_gemm_config(16, 32, 49) == cfg
    # 7x7: 48 + 1 -> the last full tile at 8 rows, plus the column (before: 4 rows x 4 vectors)
    assert column_tiles(49, cfg, cfg.cross) == (0, ColumnTile(0, (16, 16, 16), 8, cross=1))
    assert column_tiles(49, cfg) == (0, ColumnTile(0, (16, 16, 16, 1), 4))
    assert column_tiles(97, cfg, 1) == (1, ColumnTile(48, (16, 16, 16), 8, cross=1))
    assert column_tiles(50, cfg, 1) == column_tiles(50, cfg)  # two columns: a partial vector
    assert column_tiles(1, cfg, 1) == column_tiles(1, cfg)  # no full tile to join
    script = conv1x1_gemm_primfunc(1, 64, 32, 49, cfg=cfg, cores=2).script()
    assert "weight[v + v_1, v_2, T.Ramp(0, 1, 8)]" in script  # its weights: one 8-lane load


@pytest.mark.parametrize(
    ("dims", "panels"),
    [((8, 8), []), ((4, 28), []), ((7, 7), [49]), ((14, 14), [48, 52]), ((5, 7), [35])],
)
def test_conv_gemm_reads_rows_of_whole_lines_in_place_and_copies_the_rest(dims, panels):
    """B is read in place where the map's rows are whole cache lines (64 and 112 pixels: every
    vector load aligned); elsewhere each column tile gets a contiguous panel of K rows (the
    full tiles' 48 columns, the last tile's), which its first row tile fills as it goes. A
    map of one tile (7x7: 48 + 1 columns rows-in-lanes) has no code for full tiles."""
    cfg = GemmConfig(rows=8, vectors=3, lanes=16, cross=1)
    script = conv1x1_gemm_primfunc(1, 24, 32, dims[0] * dims[1], cfg=cfg, out_dims=dims).script()
    allocs = re.findall(r"T.alloc_buffer\(\(24, (\d+)\)\)", script)
    assert sorted(map(int, allocs)) == panels


def test_conv_gemm_jobs_split_row_chunks_between_threads():
    """Each (image, column tile, row chunk) is one job, and where a map has few column tiles
    (256 x 1024 on 14x14: 4, the last heavier) each thread's contiguous half of the jobs holds
    every column tile of one half of the weight's rows."""
    jobs = [job_tiles(job, batch=2, col_jobs=8, chunk=16) for job in range(16)]
    assert sorted(jobs) == sorted((n, c, r) for n in (0, 1) for c in range(4) for r in (0, 16))
    first, second = jobs[:8], jobs[8:]
    assert {(n, c) for n, c, _ in first} == {(n, c) for n, c, _ in second}  # all tiles each
    assert {r for *_, r in first} == {0} and {r for *_, r in second} == {16}


@pytest.mark.parametrize(
    ("side", "out_channels", "jobs"), [(7, 2048, 12), (7, 160, 12), (14, 256, 8), (28, 64, 32)]
)
def test_conv_gemm_jobs_are_a_multiple_of_the_threads(side, out_channels, jobs):
    """The runtime gives each thread an equal range of jobs, whole only where they divide
    evenly. On AVX2's tiles a 7x7 map has 3 column tiles (4 x 2 tiles and a column): its rows
    split in 4 chunks, not 3. 14x14 and 28x28 have 8 and 32 column tiles (4 x 3): one chunk
    each. AVX-512's 65 on a 56x56 map stay one chunk (33 against 32.5 jobs: within 5 %)."""

    def parallel_jobs(lanes: int, registers: int, side: int, out_channels: int) -> int:
        cfg = default_gemm_config(lanes, registers, side * side)
        func = conv1x1_gemm_primfunc(1, 32, out_channels, side * side, cfg=cfg, cores=2,
                                     out_dims=(side, side))  # fmt: skip
        return int(re.search(r"T.parallel\((\d+)\)", func.script()).group(1))

    assert parallel_jobs(8, 16, side, out_channels) == jobs
    assert parallel_jobs(16, 32, 56, 64) == 65


def test_conv_gemm_prefetches_its_weight_ahead_of_the_tile():
    """Each k of a tile prefetches the packed weight ``PREFETCH_BYTES`` ahead, clamped to the
    weight (in a model the weight streams from DRAM; see the module docstring)."""
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    func = conv1x1_gemm_primfunc(1, 64, 32, 49, cfg=cfg, cores=2)
    lines = [line for line in prefetch_lines(func) if line.endswith(", 0, 3, 1)")]
    # one tile (49 pixels: 48 + 1), as a job's first row tile (filling the panel, see
    # b_source) and as the others
    assert len(lines) == 2
    ahead, last = PREFETCH_BYTES // 4, 4 * 64 * 8 - 1  # the packed weight is (4, 64, 8)
    assert all(f"+ {ahead}, {last})" in line for line in lines), lines


@pytest.mark.parametrize("residual", [False, True])
def test_conv_gemm_prefetches_the_next_row_tiles_output(residual):
    """Each finished vector prefetches the same vector of the next row tile's output, owned
    (for the store), and of its residual (read), the channel clamped to the last: in a model
    the maps come from L3 / DRAM (see the module docstring)."""
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    epilogue = Epilogue(bias=True, residual=residual, activation="relu")
    lines = prefetch_lines(conv1x1_gemm_primfunc(1, 64, 32, 49, epilogue, cfg=cfg, cores=2))
    # the 49 pixels' last tile: half rows (4), 4 vectors (48 + 1 pixels); channels o0 + 4 + r
    expected = {
        (f"{f'+ 4 + {r}' if r else '+ 4'}, 31) * 49{f' + {16 * v}' if v else ''}]", rw)
        for r in range(4)
        for v in range(4)
        for rw in ((0, 1) if residual else (1,))
    }
    found = {
        (m.group(1), int(m.group(2)))
        for line in lines
        if (m := re.search(r"(\+ 4(?: \+ \d)?, 31\) \* 49(?: \+ \d+)?\])\), (\d), 3, 1\)", line))
    }
    assert found == expected
    stores = [line for line in lines if line.endswith(", 1, 3, 1)")]
    assert len(stores) == 2 * 16  # the job's first row tile and the others


def test_packings_round_trip():
    w = np.arange(7 * 5, dtype="float32").reshape(7, 5)
    rows = pack_rows(w, 4)  # (2, 5, 4): tile t, k, row
    assert rows.shape == (2, 5, 4)
    assert rows[1, 3, 2] == w[6, 3] and rows[1, 3, 3] == 0  # zero-padded row 7
    cols = pack_columns(w, 4)  # (2, 7, 4): tile t, k, column
    assert cols.shape == (2, 7, 4)
    assert cols[1, 6, 0] == w[6, 4] and cols[1, 6, 1] == 0


class LinearBlock(torch.nn.Module):
    """nn.Linear on (batch, tokens, features) (+ residual) (+ ReLU): a Transformer's FC."""

    def __init__(self, cin: int, cout: int, residual: bool, relu: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(cin, cout)
        self.residual, self.relu = residual, relu

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.residual:
            y = y + r
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 37),
    cin=st.integers(1, 70),
    cout=st.integers(2, 70),  # (a 1-wide linear imports its bias add differently)
    residual=st.booleans(),
    relu=st.booleans(),
)
def test_linear_over_tokens_matches_pytorch(target, batch, tokens, cin, cout, residual, relu):
    model = LinearBlock(cin, cout, residual, relu)
    rng = np.random.default_rng(tokens * 100 + cin)
    x = rng.standard_normal((batch, tokens, cin)).astype("float32")
    r = rng.standard_normal((batch, tokens, cout)).astype("float32")
    cm = _check(model, (x, r), target)
    fc = cm.layers[0]
    assert fc.format == "dense" and fc.flops_dense == 2 * batch * tokens * cin * cout
    if batch * tokens >= GEMM_MIN_ROWS:
        assert "GEMM" in fc.reason, fc.reason


def test_encoder_sized_linear_fuses_its_chain():
    model = LinearBlock(70, 50, residual=True, relu=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 37, 70)).astype("float32")
    r = rng.standard_normal((2, 37, 50)).astype("float32")
    fc = _check(model, (x, r), "x86").layers[0]
    assert "GEMM" in fc.reason and fc.epilogue == "bias+residual+relu"


def test_gemm_template_default_is_the_hand_kernel_and_its_space_is_pinned() -> None:
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    func = conv1x1_gemm_template(1, 24, 40, (5, 7), Epilogue(True), cfg, 2, "g")
    expected = conv1x1_gemm_primfunc(1, 24, 40, 35, Epilogue(True), cfg, 2, "g", (5, 7))
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"rows": [8, 1, 2, 4], "vectors": [3, 1, 2, 4]}
    # AVX2: weights packed by 4 rows
    avx2 = conv1x1_gemm_template(1, 24, 40, (5, 7), Epilogue(), GemmConfig(4, 3, 8), 2, "g")
    assert knob_space(avx2) == {"rows": [4, 1, 2], "vectors": [3, 1, 2, 4]}
    # K in passes, k unrolled: parameters of the template, kept by every point of its space
    passes = GemmConfig(4, 3, 8, k_block=8, unroll=4)
    func = conv1x1_gemm_template(1, 24, 40, (5, 7), Epilogue(), passes, 2, "g")
    expected = conv1x1_gemm_primfunc(1, 24, 40, 35, Epilogue(), passes, 2, "g", (5, 7))
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    params = json.loads(str(func.attrs["tvm_sparse.params"]))
    at_knobs = DENSE_CONV1X1.build(params, {"rows": 2, "vectors": 1})
    smaller = conv1x1_gemm_primfunc(1, 24, 40, 35, Epilogue(), replace(passes, vectors=1), 2,
                                    "g", (5, 7), tile_rows=2)  # fmt: skip
    tvm.ir.assert_structural_equal(at_knobs, smaller)
    # a k x k conv's windows: its stride, input map, kernel and padding kept by every point
    window = {"stride": 2, "in_dims": (10, 14), "kernel": (3, 3), "padding": (1, 1)}
    passes = GemmConfig(4, 3, 8, k_block=18, unroll=2)  # two of the 8 channels a pass
    func = conv1x1_gemm_template(1, 8, 40, (5, 7), Epilogue(), passes, 2, "g", 2, (10, 14),
                                 kernel=(3, 3), padding=(1, 1))  # fmt: skip
    params = json.loads(str(func.attrs["tvm_sparse.params"]))
    assert template_flops(func, []) == 2 * 35 * 40 * 8 * 9  # the taps counted
    at_knobs = DENSE_CONV1X1.build(params, {"rows": 2, "vectors": 1})
    smaller = conv1x1_gemm_primfunc(1, 8, 40, 35, Epilogue(), replace(passes, vectors=1), 2,
                                    "g", (5, 7), tile_rows=2, **window)  # fmt: skip
    tvm.ir.assert_structural_equal(at_knobs, smaller)


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize("tile_rows, vectors", [(1, 1), (2, 4), (4, 2), (8, 3)])
@pytest.mark.parametrize("dims", [(1, 37), (7, 7), (4, 20)])
def test_every_tile_of_the_space_matches_numpy(target, tile_rows, vectors, dims) -> None:
    """Odd sizes (19 filters, 13 channels, 37 pixels: partial row tiles and vectors; 49 pixels:
    a last column rows-in-lanes, forced on AVX2 too; 80 pixels, rows of whole cache lines: B
    read in place), bias + residual + ReLU, at tiles the tuner may pick (rows dividing the
    packed rows)."""
    tgt = tvm.target.Target(resolve_target(target))
    lanes = vector_lanes(tgt)
    packed = default_gemm_config(lanes, vector_registers(tgt)).rows
    if packed % tile_rows:
        pytest.skip(f"{tile_rows} rows do not divide the packed {packed}")
    rng = np.random.default_rng(tile_rows * 10 + vectors)
    o, c, p = 19, 13, dims[0] * dims[1]
    w, x = rng.standard_normal((o, c), "float32"), rng.standard_normal((2, c, p), "float32")
    b, r = rng.standard_normal(o, "float32"), rng.standard_normal((2, o, p), "float32")
    cfg = GemmConfig(packed, vectors, lanes, cross=1)
    func = conv1x1_gemm_primfunc(2, c, o, p, Epilogue(True, True, "relu"), cfg, 2, "g", dims,
                                 tile_rows=tile_rows)  # fmt: skip
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    args = [x.reshape(2, c, *dims), pack_rows(w, packed), b, r.reshape(2, o, *dims)]
    out = tvm.runtime.tensor(np.zeros((2, o, *dims), "float32"))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    ref = np.maximum(np.einsum("oc,ncp->nop", w, x) + b[:, None] + r, 0).reshape(2, o, *dims)
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


def test_linear_template_default_is_the_hand_kernel_and_its_space_is_pinned() -> None:
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    func = linear_gemm_template((2, 37), 24, 40, Epilogue(True), cfg, 2, "l")
    expected = linear_gemm_primfunc((2, 37), 24, 40, Epilogue(True), cfg, 2, "l")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"rows": [8, 1, 2, 3, 4, 5, 6, 7]}
    few = linear_gemm_template((3,), 24, 40, Epilogue(), GemmConfig(4, 3, 8), 2, "l")
    assert knob_space(few) == {"rows": [3, 1, 2]}  # 3 tokens: the default tile is all of them


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize("tile_rows", [1, 3, 8])
def test_every_linear_tile_of_the_space_matches_numpy(target, tile_rows) -> None:
    """37 tokens of 13 features x 19 outputs (a partial last row tile and column tile), bias +
    residual + ReLU, at the token rows the tuner may pick."""
    tgt = tvm.target.Target(resolve_target(target))
    cfg = default_gemm_config(vector_lanes(tgt), vector_registers(tgt))
    rng = np.random.default_rng(tile_rows)
    x, w = rng.standard_normal((37, 13), "float32"), rng.standard_normal((13, 19), "float32")
    b, r = rng.standard_normal(19, "float32"), rng.standard_normal((37, 19), "float32")
    func = linear_gemm_primfunc((37,), 13, 19, Epilogue(True, True, "relu"), cfg, 2, "l",
                                tile_rows=tile_rows)  # fmt: skip
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    b_padded = np.pad(b, (0, padded(19, cfg) - 19))
    args = [x, pack_columns(w, cfg.width), b_padded, r]
    out = tvm.runtime.tensor(np.zeros((37, 19), "float32"))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    ref = np.maximum(x @ w + b + r, 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize(("stride", "in_dims"), [(2, (13, 13)), (2, (15, 10)), (3, (22, 20))])
@pytest.mark.parametrize("tile_rows", [1, 4])
def test_strided_panels_gathered_from_the_input_match_numpy(target, stride, in_dims, tile_rows):
    """A strided 1x1 conv read from its input map (no slice first): odd and even input sizes,
    a 7x7 output (its last column rows-in-lanes), stride 3, bias + residual + ReLU."""
    tgt = tvm.target.Target(resolve_target(target))
    cfg = default_gemm_config(vector_lanes(tgt), vector_registers(tgt), 49)
    dims = tuple((d - 1) // stride + 1 for d in in_dims)
    _check_gemm(tgt, cfg, 13, dims, in_dims, stride, stride * 100 + in_dims[1], tile_rows)


def _check_gemm(tgt, cfg, c, dims, in_dims, stride, seed, tile_rows=None):
    """The 1x1 conv GEMM at ``cfg`` (19 filters, ``c`` channels, batch 2, bias + residual +
    ReLU) against numpy; its PrimFunc."""
    o = 19
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, c, *in_dims), "float32")
    w, b = rng.standard_normal((o, c), "float32"), rng.standard_normal(o, "float32")
    r = rng.standard_normal((2, o, *dims), "float32")
    func = conv1x1_gemm_primfunc(2, c, o, dims[0] * dims[1], Epilogue(True, True, "relu"), cfg,
                                 2, "g", dims, tile_rows=tile_rows, stride=stride,
                                 in_dims=in_dims if stride > 1 else None)  # fmt: skip
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.zeros((2, o, *dims), "float32"))
    args = [x, pack_rows(w, cfg.rows), b, r]
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    sliced = x[:, :, ::stride, ::stride]
    ref = np.maximum(np.einsum("oc,nchw->nohw", w, sliced) + b[:, None, None] + r, 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))
    return func


@pytest.mark.parametrize("target", ISA_TARGETS)
@pytest.mark.parametrize(
    ("dims", "stride", "k_block", "unroll"),
    [
        ((7, 7), 1, 8, 4), ((4, 20), 1, 12, 4), ((1, 37), 1, 6, 2), ((7, 7), 2, 8, 1),
        ((7, 7), 1, 0, 4), ((4, 20), 2, 0, 2),
    ],
)  # fmt: skip
def test_passes_over_k_match_numpy(target, dims, stride, k_block, unroll):
    """K in passes (``GemmConfig.k_block``), the partial sums kept in the output between them:
    a 7x7 map (its last column rows-in-lanes, resumed as a vector of the rows), rows of whole
    lines (read through the panel, not in place), a partial tile, a strided conv; 19 filters
    (a partial row tile), bias + residual + ReLU, which must come once, after the last pass.
    With k unrolled (``GemmConfig.unroll``), in passes and in one."""
    tgt = tvm.target.Target(resolve_target(target))
    lanes, registers = vector_lanes(tgt), vector_registers(tgt)
    base = default_gemm_config(lanes, registers, dims[0] * dims[1])
    cfg = GemmConfig(base.rows, base.vectors, lanes, cross=1, k_block=k_block, unroll=unroll)
    in_dims = tuple((d - 1) * stride + 1 for d in dims)
    func = _check_gemm(tgt, cfg, 24, dims, in_dims, stride, k_block + unroll)
    script = func.script()
    assert "T.Select(" in script or not k_block  # passes after the first resume their sums
    # a tile's loop takes ``unroll`` k per iteration: 24 / unroll iterations over one pass's k
    assert f"in range({(k_block or 24) // unroll}):" in script


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    channels=st.integers(1, 12),
    filters=st.sampled_from([5, 19]),
    dims=st.tuples(st.integers(3, 17), st.integers(3, 23)),
    kernel=st.sampled_from([(3, 3), (5, 5), (1, 3), (3, 1)]),
    stride=st.integers(1, 3),
    padding=st.tuples(*[st.integers(0, 2)] * 4),
    passes=st.sampled_from([1, 2, 3]),
    tile_rows=st.sampled_from([1, 2, None]),
)
def test_windows_gathered_from_the_input_match_pytorch(
    target, channels, filters, dims, kernel, stride, padding, passes, tile_rows
):
    """A k x k conv as the GEMM over its gathered windows (``kernel``, ``padding``): odd maps,
    asymmetric padding (the bottom / right from the output's size), strides 1-3, K in passes of
    whole channels, partial row tiles and vectors, batch 2, bias + residual + ReLU."""
    tgt = tvm.target.Target(resolve_target(target))
    lanes, registers = vector_lanes(tgt), vector_registers(tgt)
    (kh, kw), (top, left, bottom, right) = kernel, padding
    out_h = (dims[0] + top + bottom - kh) // stride + 1
    out_w = (dims[1] + left + right - kw) // stride + 1
    if out_h < 1 or out_w < 1 or channels % passes:
        return
    rng = np.random.default_rng(channels * 1000 + dims[0] * 31 + dims[1])
    x = rng.standard_normal((2, channels, *dims), "float32")
    w = rng.standard_normal((filters, channels, kh, kw), "float32")
    b = rng.standard_normal(filters, "float32")
    r = rng.standard_normal((2, filters, out_h, out_w), "float32")
    base = default_gemm_config(lanes, registers, out_h * out_w)
    cfg = replace(base, k_block=0 if passes == 1 else channels // passes * kh * kw)
    func = conv1x1_gemm_primfunc(2, channels, filters, out_h * out_w,
                                 Epilogue(True, True, "relu"), cfg, 2, "g", (out_h, out_w),
                                 tile_rows=tile_rows if tile_rows and base.rows % tile_rows == 0
                                 else None, stride=stride, in_dims=dims, kernel=kernel,
                                 padding=(top, left))  # fmt: skip
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    out = tvm.runtime.tensor(np.full((2, filters, out_h, out_w), np.nan, "float32"))
    args = [x, pack_rows(w.reshape(filters, -1), cfg.rows), b, r]
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    conv = torch.nn.functional.conv2d(padded, torch.from_numpy(w), torch.from_numpy(b), stride)
    ref = torch.relu(conv[:, :, :out_h, :out_w] + torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(out.numpy(), ref, rtol=TOL, atol=TOL * float(np.abs(ref).max()))


def test_the_window_gather_leaves_the_tiles_accumulators_in_registers():
    """A 28x28 output's last tile gathers 40 columns (4 x 3 tiles of 8 lanes, 16 left over):
    with 64 channels, 9 x 40 offset tables would pass 1 KiB and go to the workspace heap,
    where TVM reuses their memory for the accumulator rows. Built for AVX2, no FMA of the
    kernel may read its accumulator from memory (ResNet-50's 128x128 stride 2 on 56x56 ran
    2.4x slower so)."""
    cfg = conv1x1_gemm_config(8, 16, 784, 64 * 9, 9)
    func = conv1x1_gemm_primfunc(1, 64, 8, 784, Epilogue(True, False, "relu"), cfg, 2, "g",
                                 (28, 28), stride=2, in_dims=(56, 56), kernel=(3, 3),
                                 padding=(1, 1))  # fmt: skip
    tgt = tvm.target.Target(resolve_target("x86-avx2"))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tgt)
    mod = lib.mod.imports[0] if lib.mod.imports else lib.mod
    asm = mod.inspect_source("s")
    fmas = re.findall(r"vfmadd\d+ps\s+([^\n]+)", asm)
    assert fmas and not [f for f in fmas if "(" in f]


@pytest.mark.parametrize("target", ISA_TARGETS)
def test_strided_3x3_convs_of_many_filters_run_on_the_window_gemm_on_avx2(target):
    """ResNet's stride-2 3x3 convs (at a smaller map): on 16-register targets the packed GEMM
    over their windows from 256 filters on (K in passes of 576 where it is more), the filters-in-
    lanes kernel on AVX-512; numerics against PyTorch either way."""
    avx2 = vector_registers(tvm.target.Target(resolve_target(target))) <= 16
    for cin, cout, size in [(128, 256, 11), (16, 256, 9), (64, 128, 12)]:
        model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, 2, 1), torch.nn.ReLU())
        x = np.random.default_rng(cin).standard_normal((1, cin, size, size)).astype("float32")
        reason = _check(model, (x,), target).layers[0].reason
        windows = avx2 and cout >= 256
        assert ("packed GEMM over the gathered windows" in reason) is windows, reason
        assert reason.endswith(", K in passes of 576") is (windows and cin * 9 > 576), reason


def test_k_passes_divide_k_on_16_register_targets_only():
    assert [gemm_k_block(k, 16) for k in (256, 384, 512, 960, 2048)] == [0, 192, 256, 240, 256]
    assert gemm_k_block(2048, 32) == 0
    # a k x k conv's passes take whole channels of its taps (3x3: 9 rows a channel)
    windows = [gemm_k_block(c * 9, 16, 576, 9) for c in (64, 128, 256, 512, 100)]
    assert windows == [0, 576, 576, 576, 450]
    assert gemm_k_block(7 * 25, 16, 100, 25) == 25  # 175 rows: 7 passes of one channel
    with pytest.raises(ValueError, match="not whole channels of the"):
        conv1x1_gemm_primfunc(1, 4, 8, 16, out_dims=(4, 4), in_dims=(8, 8), stride=2,
                              kernel=(3, 3), cfg=GemmConfig(4, 2, 8, k_block=12))  # fmt: skip
    with pytest.raises(ValueError, match="does not divide the 24 input channels"):
        conv1x1_gemm_primfunc(1, 24, 8, 49, cfg=GemmConfig(4, 2, 8, k_block=10))


def test_k_is_unrolled_on_16_register_targets_only():
    assert [gemm_unroll(k, 16) for k in (256, 240, 6, 13)] == [4, 4, 2, 1]
    assert gemm_unroll(256, 32) == 1
    # the plan's configuration: the tile, the passes, the unroll dividing a pass
    assert conv1x1_gemm_config(8, 16, 49, 960) == GemmConfig(4, 2, 8, 1, k_block=240, unroll=4)
    assert conv1x1_gemm_config(8, 16, 784, 62) == GemmConfig(4, 3, 8, unroll=2)
    assert conv1x1_gemm_config(16, 32, 49, 2048) == GemmConfig(8, 3, 16, 1)
    with pytest.raises(ValueError, match="unroll=4 does not divide the 6 k of a pass"):
        conv1x1_gemm_primfunc(1, 24, 8, 49, cfg=GemmConfig(4, 2, 8, k_block=6, unroll=4))


def test_the_last_tiles_half_rows_must_divide_the_packed_rows():
    """A map past whole tiles ends in a tile of half the rows (``column_tiles``): with 5 packed
    rows it would compute 2 x 2 of each 5 channels."""
    with pytest.raises(ValueError, match="takes 2 rows at a time, which do not divide"):
        conv1x1_gemm_primfunc(1, 8, 10, 196, cfg=GemmConfig(5, 2, 8))
    conv1x1_gemm_primfunc(1, 8, 10, 192, cfg=GemmConfig(5, 2, 8))  # whole tiles: all 5 rows


def test_a_strided_gemm_needs_its_input_dims():
    with pytest.raises(ValueError, match="needs its out_dims and in_dims"):
        conv1x1_gemm_primfunc(1, 8, 8, 49, out_dims=(7, 7), kernel=(3, 3))
    with pytest.raises(ValueError, match="needs its out_dims and in_dims"):
        conv1x1_gemm_primfunc(1, 8, 8, 49, out_dims=(7, 7), stride=2)


def _tuned_and_applied(model, inputs: tuple, trials: int, work_dir, task: str, reason: str):
    """Tune ``model`` on ``trials``: its one template task is named ``task...`` and measured at
    least twice; compiled with the records, its layer says ``reason`` and it matches PyTorch."""
    result = tvm_sparse.tune(model, inputs, trials=trials, work_dir=str(work_dir),
                             progress=False, verify=0, model_check=False)  # fmt: skip
    (tuned,) = [t for t in result.tasks if t.template]
    assert tuned.name.startswith(task) and tuned.trials >= 2
    cm = tvm_sparse.compile(model, inputs, tuning=str(work_dir))
    assert reason in cm.layers[0].reason
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in inputs)).numpy()
    assert np.max(np.abs(cm(*inputs) - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))


def test_dense_1x1_gemm_is_tuned_and_applied(tmp_path) -> None:
    """A dense 1x1 conv's GEMM is a MetaSchedule task (rows / vectors knobs), tuned on a tiny
    budget and applied by compile; the compiled model matches PyTorch."""
    model = PointwiseBlock(32, 48, 1, True, False, "relu").eval()
    x = np.random.default_rng(5).standard_normal((1, 32, 12, 12)).astype("float32")
    r = np.zeros((1, 48, 12, 12), "float32")
    _tuned_and_applied(model, (x, r), 8, tmp_path, "dense_conv1x1", "packed GEMM")


def test_linear_gemm_is_tuned_and_applied(tmp_path) -> None:
    """A linear layer over tokens is a MetaSchedule task (the rows knob), tuned on a tiny
    budget and applied by compile; the compiled model matches PyTorch."""
    model = LinearBlock(32, 40, residual=False, relu=True).eval()
    x = np.random.default_rng(6).standard_normal((1, 20, 32)).astype("float32")
    r = np.zeros((1, 20, 40), "float32")
    _tuned_and_applied(model, (x, r), 6, tmp_path, "dense_linear", "GEMM")
