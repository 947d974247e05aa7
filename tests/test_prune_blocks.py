"""BSR and BCR block projections for FC / 1x1 weights (properties via hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_sparse.prune import block_sparsity, num_kept, project_bcr, project_bsr

VALUES = st.one_of(st.just(0.0), st.floats(-10, 10, width=32, allow_subnormal=False))
KEEP = st.floats(0.01, 1.0)
BLOCK = st.tuples(st.integers(1, 4), st.integers(1, 4))


@st.composite
def matrices(draw: st.DrawFn) -> torch.Tensor:
    """(O, I) linear weights or (O, I, 1, 1) 1x1 conv weights, sizes not multiples of blocks."""
    o, i = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    shape = (o, i) if draw(st.booleans()) else (o, i, 1, 1)
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=VALUES)))


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """(R, C, r, c) float64 zero-padded blocks of w viewed as (O, -1)."""
    m = w.numpy().reshape(w.shape[0], -1).astype(np.float64)
    r, c = block
    p = np.zeros((m.shape[0] + (-m.shape[0] % r), m.shape[1] + (-m.shape[1] % c)))
    p[: m.shape[0], : m.shape[1]] = m
    return p.reshape(p.shape[0] // r, r, p.shape[1] // c, c).transpose(0, 2, 1, 3)


@settings(max_examples=80, deadline=None)
@given(matrices(), BLOCK, KEEP)
def test_bsr_projection(w: torch.Tensor, block: tuple[int, int], keep: float) -> None:
    proj = project_bsr(w, block, keep)
    assert proj.shape == w.shape
    blocks, orig = _blocks(proj, block), _blocks(w, block)
    n = num_kept(blocks.shape[0] * blocks.shape[1], keep)
    nonzero = (blocks != 0).any(axis=(2, 3))
    # In the set: at most n blocks, each kept whole with its values.
    assert nonzero.sum() <= n
    assert np.array_equal(blocks[nonzero], orig[nonzero])
    assert torch.equal(project_bsr(proj, block, keep), proj)
    # Largest energy: the n largest block energies.
    energy = np.sort((orig**2).sum(axis=(2, 3)).ravel())[::-1][:n].sum()
    assert (blocks**2).sum() == pytest.approx(energy, rel=1e-12)


@settings(max_examples=80, deadline=None)
@given(matrices(), BLOCK, KEEP, KEEP)
def test_bcr_projection(w: torch.Tensor, block: tuple[int, int], rk: float, ck: float) -> None:
    proj = project_bcr(w, block, rk, ck)
    assert proj.shape == w.shape
    r, c = block
    blocks, orig = _blocks(proj, block), _blocks(w, block)
    nonzero = blocks != 0
    # In the set: every block's support lies in <= n_r rows x <= n_c columns.
    rows, cols = nonzero.any(axis=3), nonzero.any(axis=2)
    assert (rows.sum(-1) <= num_kept(r, rk)).all() and (cols.sum(-1) <= num_kept(c, ck)).all()
    assert np.array_equal(blocks[nonzero], orig[nonzero])
    assert torch.equal(project_bcr(proj, block, rk, ck), proj)


@settings(max_examples=40, deadline=None)
@given(matrices(), BLOCK, KEEP)
def test_bcr_column_only_keeps_the_best_columns(w: torch.Tensor, block, ck: float) -> None:
    """With every row kept the greedy is exact: each block keeps its n_c largest columns."""
    proj = _blocks(project_bcr(w, block, 1.0, ck), block)
    orig = _blocks(w, block)
    n_c = num_kept(block[1], ck)
    best = np.sort((orig**2).sum(axis=2), axis=-1)[..., ::-1][..., :n_c].sum()
    assert (proj**2).sum() == pytest.approx(best, rel=1e-12)


def test_bcr_columns_then_rows_by_hand() -> None:
    """2x2 blocks keeping 1 row x 1 column: the best column by norm, then its best row."""
    w = torch.tensor([[1.0, 2.0, 0.5, 0.1], [3.0, 6.0, 0.2, 0.4]])
    proj = project_bcr(w, (2, 2), 0.5, 0.5)
    assert proj.tolist() == [[0.0, 0.0, 0.5, 0.0], [0.0, 6.0, 0.0, 0.0]]
    # Here that is also the brute-force optimum over all (row, column) choices of each block.
    for j in (0, 2):
        blk = w[:, j : j + 2].numpy()
        best = max(blk[a, b] ** 2 for a, b in itertools.product(range(2), range(2)))
        assert float(proj[:, j : j + 2].square().sum()) == best


def test_block_sparsity_detects_the_projections() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    bsr = block_sparsity(project_bsr(w, (4, 4), 0.25).numpy(), (4, 4))
    assert bsr.block_density == 0.25 and bsr.density == 0.25
    bcr = block_sparsity(project_bcr(w, (8, 8), 0.5, 0.5).numpy(), (8, 8))
    assert bcr.density == bcr.rowcol_density == 0.25
    assert bcr.block_density == 1.0
