"""3x3 kernel patterns (PatDNN): candidates, library extraction, pattern projection.

A pattern is a sorted tuple of flat tap indices ``dy * 3 + dx`` (centre = 4), the same convention as
:mod:`tvm_sparse.formats.pattern`. Weights are OIHW torch tensors with KH = KW = 3; each (o, c)
slice is one kernel.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import combinations

import torch

Pattern = tuple[int, ...]

KERNEL_TAPS = 9
CENTRE = 4
_CHUNK = 8192  # kernels per energy batch: bounds memory to ~8192 * P * 9 float64


def candidate_patterns(num_taps: int = 4) -> list[Pattern]:
    """All ``num_taps``-tap 3x3 patterns containing the centre, lexicographic (56 for 4 taps)."""
    others = [t for t in range(KERNEL_TAPS) if t != CENTRE]
    return sorted(tuple(sorted((CENTRE, *c))) for c in combinations(others, num_taps - 1))


def pattern_masks(patterns: Sequence[Pattern], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(P, 9) 0/1 tensor: row p marks the taps of ``patterns[p]``."""
    masks = torch.zeros(len(patterns), KERNEL_TAPS, dtype=dtype)
    for p, pat in enumerate(patterns):
        masks[p, list(pat)] = 1
    return masks


def _kernels(weight: torch.Tensor) -> torch.Tensor:
    """View an OIHW 3x3 weight as (O*C, 9) kernels."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected an OIHW weight with 3x3 kernels, got {tuple(weight.shape)}")
    return weight.detach().reshape(-1, KERNEL_TAPS)


def group_sum(values: torch.Tensor, group: int) -> torch.Tensor:
    """Sum ``values`` over consecutive groups of ``group`` along dim 0 (the last group may be
    short): (O, ...) -> (ceil(O / group), ...)."""
    if group <= 1:
        return values
    pad = -values.shape[0] % group
    padded = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    return padded.reshape(-1, group, *values.shape[1:]).sum(1)


def expand_groups(values: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`group_sum`'s shape: each group's row repeated for its ``rows`` members."""
    return values.repeat_interleave(max(1, group), dim=0)[:rows]


def best_pattern_index(
    weight: torch.Tensor, patterns: Sequence[Pattern], filter_group: int = 1
) -> torch.Tensor:
    """(O, C) index into ``patterns`` of the pattern keeping the most energy of each kernel.

    ``filter_group`` > 1: one pattern per group of that many consecutive filters and channel,
    the one keeping the most energy of the group's kernels together. Ties go to the earliest
    pattern in ``patterns``.
    """
    out_ch, in_ch = weight.shape[:2]
    sq = _kernels(weight).to(torch.float64).square().reshape(out_ch, in_ch, KERNEL_TAPS)
    sq = group_sum(sq, filter_group).reshape(-1, KERNEL_TAPS)
    masks = pattern_masks(patterns, torch.float64).to(sq.device)
    best = torch.empty(sq.shape[0], dtype=torch.int64, device=sq.device)
    # Elementwise products summed over the 9 taps (not a matmul): a kernel lying inside two
    # patterns gets bit-identical energies for both, so ties are exact and go to the first.
    for start in range(0, sq.shape[0], _CHUNK):
        part = sq[start : start + _CHUNK]
        best[start : start + _CHUNK] = (part[:, None, :] * masks[None]).sum(-1).argmax(dim=1)
    return expand_groups(best.reshape(-1, in_ch), filter_group, out_ch)


def extract_pattern_library(
    weights: Iterable[torch.Tensor],
    num_patterns: int = 8,
    candidates: Sequence[Pattern] | None = None,
) -> list[Pattern]:
    """The ``num_patterns`` candidates chosen most often as a kernel's best pattern.

    Every nonzero kernel of every weight (OIHW, 3x3) votes for the candidate keeping most of its
    energy; the library is the most voted, most voted first (ties: smallest tuple). Candidates
    default to :func:`candidate_patterns` (4 taps with the centre). If fewer candidates received
    votes than asked, the rest are filled with unvoted candidates in order.
    """
    cands = list(candidates) if candidates is not None else candidate_patterns()
    if not 1 <= num_patterns <= len(cands):
        raise ValueError(f"num_patterns must be in [1, {len(cands)}], got {num_patterns}")
    votes: Counter[int] = Counter()
    for w in weights:
        best = best_pattern_index(w, cands).flatten()
        nonzero = _kernels(w).ne(0).any(dim=1)
        votes.update(best[nonzero].tolist())
    order = sorted(range(len(cands)), key=lambda i: (-votes[i], cands[i]))
    return [cands[i] for i in order[:num_patterns]]


def pattern_mask(
    weight: torch.Tensor, library: Sequence[Pattern], filter_group: int = 1
) -> torch.Tensor:
    """Boolean OIHW mask: each kernel keeps the taps of its best library pattern (chosen per
    group of ``filter_group`` consecutive filters and channel)."""
    best = best_pattern_index(weight, library, filter_group)
    masks = pattern_masks(library, torch.bool).to(weight.device)
    return masks[best].reshape(weight.shape)


def project_patterns(weight: torch.Tensor, library: Sequence[Pattern]) -> torch.Tensor:
    """Euclidean projection of an OIHW 3x3 weight onto "every kernel fits a library pattern"."""
    return weight.detach() * pattern_mask(weight, library)
