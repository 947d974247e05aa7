"""Pattern candidates, library extraction and pattern projection (properties via hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tvm_sparse.formats import conv_sparsity, pattern_library
from tvm_sparse.prune import candidate_patterns, extract_pattern_library, project_patterns

CANDS = candidate_patterns()
VALUES = st.one_of(st.just(0.0), st.floats(-10, 10, width=32, allow_subnormal=False))


@st.composite
def conv_weights(draw: st.DrawFn) -> torch.Tensor:
    o, c = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return torch.from_numpy(draw(arrays(np.float32, (o, c, 3, 3), elements=VALUES)))


@st.composite
def libraries(draw: st.DrawFn) -> list[tuple[int, ...]]:
    k = draw(st.sampled_from([1, 4, 6, 8, 12]))
    return draw(st.permutations(CANDS))[:k]


def _energies(kernel: np.ndarray, library: list[tuple[int, ...]]) -> list[float]:
    sq = kernel.astype(np.float64).reshape(9) ** 2
    return [float(sq[list(p)].sum()) for p in library]


def test_candidates_are_the_56_four_tap_patterns_with_the_centre() -> None:
    assert len(CANDS) == 56 == len(set(CANDS))
    assert all(len(p) == 4 and 4 in p and list(p) == sorted(p) for p in CANDS)
    assert all(0 <= t < 9 for p in CANDS for t in p)
    assert len(candidate_patterns(3)) == 28


@settings(max_examples=60, deadline=None)
@given(conv_weights(), libraries())
def test_projection_lies_in_the_set_and_is_idempotent(w: torch.Tensor, library) -> None:
    proj = project_patterns(w, library)
    flat = (proj != 0).reshape(-1, 9).numpy()
    allowed = [set(p) for p in library]
    for taps in flat:
        support = set(np.flatnonzero(taps).tolist())
        assert any(support <= p for p in allowed)
    # Kept taps keep their values exactly.
    assert torch.equal(proj[proj != 0], w[proj != 0])
    assert torch.equal(project_patterns(proj, library), proj)


@settings(max_examples=60, deadline=None)
@given(conv_weights(), libraries())
def test_projection_keeps_the_largest_energy_pattern(w: torch.Tensor, library) -> None:
    proj = project_patterns(w, library).numpy().reshape(-1, 9)
    for kernel, kept in zip(w.numpy().reshape(-1, 9), proj, strict=True):
        best = max(_energies(kernel, library))
        got = float((kept.astype(np.float64) ** 2).sum())
        assert got == pytest.approx(best, rel=1e-12, abs=0)


@pytest.mark.parametrize("k", [4, 6, 8, 12])
def test_library_extraction_recovers_the_most_used_patterns(k: int) -> None:
    """Kernels drawn on 14 candidates with distinct frequencies: the top k come back in order."""
    rng = np.random.default_rng(k)
    chosen = [CANDS[i] for i in rng.permutation(56)[:14]]
    counts = list(range(30, 16, -1))  # chosen[0] most used
    kernels = []
    for pat, n in zip(chosen, counts, strict=True):
        for _ in range(n):
            kern = np.zeros(9, np.float32)
            kern[list(pat)] = rng.uniform(0.5, 1.0, 4) * rng.choice([-1, 1], 4)
            kernels.append(kern)
    kernels = np.array(kernels)[rng.permutation(len(kernels))]
    weight = torch.from_numpy(kernels.reshape(-1, 1, 3, 3))
    # Split across two "layers": the library is the model-wide vote.
    lib = extract_pattern_library([weight[:100], weight[100:]], num_patterns=k)
    assert lib == chosen[:k]


def test_library_from_dense_weights_is_centre_plus_top3() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    lib = extract_pattern_library([w], num_patterns=8)
    assert len(lib) == 8 == len(set(lib)) and set(lib) <= set(CANDS)
    proj = project_patterns(w, lib)
    # The compiler's detection sees exactly (a subset of) the library, 4 taps each.
    stats = conv_sparsity(proj.numpy())
    assert set(pattern_library(proj.numpy())) <= set(lib)
    assert stats.max_taps == 4 and stats.density == pytest.approx(4 / 9)


def test_extraction_rejects_bad_sizes_and_shapes() -> None:
    with pytest.raises(ValueError, match="num_patterns"):
        extract_pattern_library([torch.randn(2, 2, 3, 3)], num_patterns=57)
    with pytest.raises(ValueError, match="3x3"):
        project_patterns(torch.randn(2, 2, 5, 5), CANDS[:8])
