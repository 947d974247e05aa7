"""Connectivity pruning and the joint pattern + connectivity projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_sparse.prune import (
    PatternConstraint,
    candidate_patterns,
    num_kept,
    project_connectivity,
    project_patterns,
)

VALUES = st.one_of(st.just(0.0), st.floats(-10, 10, width=32, allow_subnormal=False))
KEEP = st.floats(0.01, 1.0)


@st.composite
def conv_weights(draw: st.DrawFn) -> torch.Tensor:
    o, c, k = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.sampled_from([1, 3, 5]))
    return torch.from_numpy(draw(arrays(np.float32, (o, c, k, k), elements=VALUES)))


def _kernel_norms(w: torch.Tensor) -> np.ndarray:
    return (w.numpy().astype(np.float64) ** 2).sum(axis=(2, 3)).ravel()


def test_num_kept() -> None:
    assert num_kept(512, 0.27) == 138
    assert num_kept(10, 0.01) == 1 and num_kept(10, 1.0) == 10


@settings(max_examples=80, deadline=None)
@given(conv_weights(), KEEP)
def test_connectivity_projection(w: torch.Tensor, keep: float) -> None:
    proj = project_connectivity(w, keep)
    n = num_kept(w.shape[0] * w.shape[1], keep)
    kept = (proj != 0).reshape(w.shape[0], w.shape[1], -1).any(-1).ravel().numpy()
    # In the set: at most n nonzero kernels, each kept whole.
    assert kept.sum() <= n
    whole = proj.reshape(-1, w.shape[2] * w.shape[3])[torch.from_numpy(kept)]
    assert torch.equal(whole, w.reshape(-1, w.shape[2] * w.shape[3])[torch.from_numpy(kept)])
    # Idempotent.
    assert torch.equal(project_connectivity(proj, keep), proj)
    # Largest-energy choice: kept energy is the sum of the n largest kernel energies.
    norms = _kernel_norms(w)
    assert _kernel_norms(proj).sum() == pytest.approx(np.sort(norms)[::-1][:n].sum(), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(conv_weights().filter(lambda w: w.shape[2] == 3), KEEP, st.integers(1, 12))
def test_joint_pattern_connectivity_projection(w: torch.Tensor, keep: float, k: int) -> None:
    lib = candidate_patterns()[::5][:k]
    constraint = PatternConstraint(tuple(lib), keep)
    proj = constraint.project(w)
    n = num_kept(w.shape[0] * w.shape[1], keep)
    pat = project_patterns(w, lib)
    # In the set: pattern-shaped kernels, at most n of them.
    assert torch.equal(project_patterns(proj, lib), proj)
    assert ((proj != 0).reshape(-1, 9).any(-1)).sum() <= n
    # Idempotent, and optimal: the n best pattern-projected kernels.
    assert torch.equal(constraint.project(proj), proj)
    best = np.sort(_kernel_norms(pat))[::-1][:n].sum()
    assert _kernel_norms(proj).sum() == pytest.approx(best, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(conv_weights().filter(lambda w: w.shape[2] == 3), KEEP, st.sampled_from([2, 3, 4]))
def test_filter_group_projection(w: torch.Tensor, keep: float, group: int) -> None:
    """Per group of filters and channel: one pattern, kept or dropped together; the projection
    is optimal among such weights (brute force over the patterns of each group-kernel)."""
    lib = candidate_patterns()[::7]
    constraint = PatternConstraint(tuple(lib), keep, filter_group=group)
    proj = constraint.project(w)
    o, c = w.shape[:2]
    mask = (proj != 0).reshape(o, c, 9).numpy()
    full = constraint.mask(w).reshape(o, c, 9).numpy()
    masks = np.array([[t in p for t in range(9)] for p in lib])
    groups = [range(g, min(g + group, o)) for g in range(0, o, group)]
    for members in groups:
        # Every member of a group has the same support: one library pattern or nothing.
        assert (full[list(members)] == full[members[0]]).all()
        for ch in range(c):
            taps = full[members[0], ch]
            assert not taps.any() or any((taps == m).all() for m in masks)
    assert (mask <= full).all()
    n = num_kept(len(groups) * c, keep)
    kept = full.reshape(o, c, 9).any(-1)
    assert sum(kept[g[0]].sum() for g in groups) <= n
    # Optimal: each group-kernel's best pattern energy, the n best of those.
    sq = w.numpy().astype(np.float64).reshape(o, c, 9) ** 2
    best = [max((sq[list(g), ch] * m).sum() for m in masks) for g in groups for ch in range(c)]
    assert _kernel_norms(proj).sum() == pytest.approx(np.sort(best)[::-1][:n].sum(), rel=1e-9)
    assert torch.equal(constraint.project(proj), proj)
