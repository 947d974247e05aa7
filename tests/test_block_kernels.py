"""BSR / BCR FC and 1x1 conv kernels vs numpy / PyTorch (float32, rtol/atol 1e-4 of output scale).

Random block shapes, densities from empty (every block row empty) to fully dense, batch > 1,
strided 1x1 convs, pixel counts that are not a whole vector, every epilogue.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_utils import prefetch_lines

from schedules import bsr_matmul
from schedules.bsr_matmul import (
    PREFETCH_MIN_OUTPUT_BYTES,
    BSRConvConfig,
    BSRMatmulConfig,
    Conv1x1Geometry,
    bsr_conv1x1_primfunc,
    bsr_matmul_primfunc,
)
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats import BSRWeight
from tvm_sparse.formats.block import BLOCK_SHAPES, BCRWeight
from tvm_sparse.prune import project_bcr
from tvm_sparse.targets import resolve_target
from tvm_sparse.testing import random_bsr

BLOCKS = st.sampled_from(BLOCK_SHAPES + ((2, 3), (3, 1)))
# (BCR?, block): BCR blocks are the row / column pruned ones.
FORMATS = st.one_of(
    st.tuples(st.just(False), BLOCKS),
    st.tuples(st.just(True), st.sampled_from([(8, 8), (4, 4), (3, 5)])),
)
KEEP = st.sampled_from([0.0, 0.15, 0.5, 1.0])
ACT = st.sampled_from(["none", "relu", "relu6"])


def _weight(rows, cols, block, keep, bcr, shares, rng):
    """A BSR- (or BCR-: half the rows x half the columns of each kept block) sparse (rows, cols)
    matrix and its packing; ``kept`` is the kernel's BCR argument (None for BSR)."""
    mat = random_bsr(rows, cols, block, keep, rng)
    if bcr:
        mat = project_bcr(torch.from_numpy(mat), block, 0.5, 0.5).numpy()
        packed = BCRWeight.from_dense(mat, block, num_shares=shares)
        return mat, packed, packed.kept
    return mat, BSRWeight.from_dense(mat, block, num_shares=shares), None


def _run(func, args, out_shape) -> np.ndarray:
    lib = tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
        target=resolve_target("x86"),
    ).jit()
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def _epilogue(ref, bias, residual, act):
    ref = ref + (bias if bias is not None else 0) + (residual if residual is not None else 0)
    ref = np.maximum(ref, 0) if act != "none" else ref
    return np.minimum(ref, 6) if act == "relu6" else ref


def _check(got, ref):
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 40),
    n=st.integers(1, 50),
    fmt=FORMATS,
    keep=KEEP,
    bias=st.booleans(),
    residual=st.booleans(),
    act=ACT,
    rows=st.integers(1, 4),
    shares=st.integers(1, 3),
    seed=st.integers(0, 999),
)
def test_bsr_matmul_matches_numpy(m, k, n, fmt, keep, bias, residual, act, rows, shares, seed):
    rng = np.random.default_rng(seed)
    bcr, block = fmt
    w, packed, kept = _weight(n, k, block, keep, bcr, shares, rng)  # (N, K): the linear weight
    x = rng.standard_normal((m, k)).astype("float32")
    b = rng.standard_normal(n).astype("float32")
    res = rng.standard_normal((m, n)).astype("float32")
    cfg = BSRMatmulConfig(rows=min(rows, m), shares=shares)
    epi = Epilogue(bias, residual, act)
    func = bsr_matmul_primfunc(m, k, n, block, packed.num_blocks, epi, cfg, kept=kept)
    args = [x, *packed.kernel_args()]
    args += [np.pad(b, (0, packed.num_rows * block[0] - n))] if bias else []
    args += [res] if residual else []
    ref = _epilogue(x @ w.T, b if bias else None, res if residual else None, act)
    _check(_run(func, args, (m, n)), ref)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    c=st.integers(1, 20),
    o=st.integers(1, 40),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    stride=st.integers(1, 3),
    fmt=FORMATS,
    keep=KEEP,
    bias=st.booleans(),
    residual=st.booleans(),
    act=ACT,
    vector=st.sampled_from([4, 8, 16]),
    vectors=st.integers(1, 3),
    shares=st.integers(1, 3),
    parallel=st.booleans(),
    seed=st.integers(0, 999),
)
def test_bsr_conv1x1_matches_torch(
    batch,
    c,
    o,
    h,
    w,
    stride,
    fmt,
    keep,
    bias,
    residual,
    act,
    vector,
    vectors,
    shares,
    parallel,
    seed,
):
    rng = np.random.default_rng(seed)
    bcr, block = fmt
    weight, packed, kept = _weight(o, c, block, keep, bcr, shares, rng)
    x = rng.standard_normal((batch, c, h, w)).astype("float32")
    geom = Conv1x1Geometry(batch, c, h, w, o, (stride, stride))
    ho, wo = geom.out_height, geom.out_width
    b = rng.standard_normal(o).astype("float32")
    res = rng.standard_normal((batch, o, ho, wo)).astype("float32")
    cfg = BSRConvConfig(vector=vector, vectors=vectors, shares=shares, parallel=parallel)
    epi = Epilogue(bias, residual, act)
    func = bsr_conv1x1_primfunc(geom, block, packed.num_blocks, epi, cfg, kept=kept)
    args = [x, *packed.kernel_args()]
    args += [np.pad(b, (0, packed.num_rows * block[0] - o))] if bias else []
    args += [res] if residual else []
    got = _run(func, args, (batch, o, ho, wo))
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(weight.reshape(o, c, 1, 1)), stride=stride
    ).numpy()
    ref = _epilogue(conv, b.reshape(1, o, 1, 1) if bias else None, res if residual else None, act)
    _check(got, ref)


@pytest.mark.parametrize("residual", [False, True])
def test_bsr_conv1x1_prefetches_the_next_block_rows_output_on_large_maps(monkeypatch, residual):
    """Over ``PREFETCH_MIN_OUTPUT_BYTES`` of output, each tile prefetches the next packed block
    row's output (owned) and residual at its vectors, the channel clamped to the last; the
    results are unchanged. Under it, no prefetch."""
    rng = np.random.default_rng(0)
    o, c, size, block = 20, 12, 9, (4, 1)
    weight, packed, _ = _weight(o, c, block, 0.5, False, 1, rng)
    geom = Conv1x1Geometry(1, c, size, size, o)
    cfg = BSRConvConfig(vector=8, vectors=2)
    epi = Epilogue(True, residual, "relu")
    small = bsr_conv1x1_primfunc(geom, block, packed.num_blocks, epi, cfg)
    assert o * size * size * 4 <= PREFETCH_MIN_OUTPUT_BYTES and not prefetch_lines(small)

    monkeypatch.setattr(bsr_matmul, "PREFETCH_MIN_OUTPUT_BYTES", 0)
    func = bsr_conv1x1_primfunc(geom, block, packed.num_blocks, epi, cfg)
    lines = prefetch_lines(func)
    owned = [line for line in lines if line.endswith(", 1, 3, 1)")]
    read = [line for line in lines if line.endswith(", 0, 3, 1)")]
    # 81 pixels: 5 tiles of 16 then one tail tile of 1 vector; 4 rows x each tile's vectors
    assert len(owned) == 4 * (2 + 1) and len(read) == (len(owned) if residual else 0)
    assert all(f", {o - 1})" in line for line in lines)  # clamped to the last channel

    x = rng.standard_normal((1, c, size, size)).astype("float32")
    b = rng.standard_normal(o).astype("float32")
    res = rng.standard_normal((1, o, size, size)).astype("float32")
    args = [x, *packed.kernel_args(), np.pad(b, (0, packed.num_rows * block[0] - o))]
    args += [res] if residual else []
    got = _run(func, args, (1, o, size, size))
    conv = np.einsum("oc,nchw->nohw", weight, x)
    _check(got, _epilogue(conv, b.reshape(1, o, 1, 1), res if residual else None, "relu"))
