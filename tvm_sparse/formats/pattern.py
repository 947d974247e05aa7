"""Pattern-sparse convolution weights in a PatDNN-style FKW (filter-kernel-weight) layout.

A conv weight is OIHW. Each (filter o, input channel c) pair is a *kernel* (KH x KW). A kernel is
either empty (connectivity pruning) or keeps the taps of one *pattern*: a set of tap positions
``dy * KW + dx``. PatDNN-style pruning keeps 4 of 9 taps from a library of ~8 patterns; a dense conv
is the special case of one pattern holding every tap, with every kernel kept.

Packed layout (``PatternWeight``):

- ``patterns``: the distinct tap sets, each a sorted tuple of flat tap indices.
- ``filter_order[i]``: the original filter (output channel) stored at packed position ``i``.
  Filters are reordered so that filters with similar kernel counts / pattern mixes are adjacent and
  each contiguous share of the filters (one per core) carries about the same work.
- ``kernel_ptr[i, p] : kernel_ptr[i, p + 1]``: the kernels of packed filter ``i`` with pattern ``p``
  (kernels are grouped by pattern inside each filter, so each pattern is one code path).
- ``kernel_channel[k]``: input channel of kernel ``k``.
- ``kernel_values[k, t]``: the value of tap ``patterns[p][t]`` of kernel ``k`` (zero-padded to the
  largest pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Pattern = tuple[int, ...]


def kernel_masks(weight: np.ndarray) -> np.ndarray:
    """Boolean (O, C, KH*KW) mask of the nonzero taps of an OIHW weight."""
    out_ch, in_ch, kh, kw = weight.shape
    return (weight != 0).reshape(out_ch, in_ch, kh * kw)


def pattern_library(weight: np.ndarray) -> list[Pattern]:
    """Distinct nonzero tap sets of the kept kernels, most used first (ties: smallest tuple)."""
    masks = kernel_masks(weight)
    kept = masks[masks.any(axis=-1)]
    if kept.size == 0:
        return []
    uniq, counts = np.unique(kept, axis=0, return_counts=True)
    pats = [tuple(int(t) for t in np.flatnonzero(m)) for m in uniq]
    order = sorted(range(len(pats)), key=lambda i: (-counts[i], pats[i]))
    return [pats[i] for i in order]


def balanced_filter_order(work: np.ndarray, signature: np.ndarray, num_shares: int) -> np.ndarray:
    """Order filters so similar ones are adjacent and ``num_shares`` contiguous shares balance.

    Filters are sorted by descending work (then by pattern signature), dealt round-robin into
    ``num_shares`` shares (greedy: each goes to the lightest share), and the shares concatenated.
    """
    keys = [(-int(work[i]), tuple(signature[i]), i) for i in range(len(work))]
    ranked = [k[2] for k in sorted(keys)]
    num_shares = max(1, min(num_shares, len(ranked)))
    share_size = [len(ranked) // num_shares + (s < len(ranked) % num_shares) for s in range(num_shares)]
    shares: list[list[int]] = [[] for _ in range(num_shares)]
    loads = [0] * num_shares
    for f in ranked:
        open_shares = [s for s in range(num_shares) if len(shares[s]) < share_size[s]]
        s = min(open_shares, key=lambda s: (loads[s], s))
        shares[s].append(f)
        loads[s] += int(work[f])
    return np.array([f for share in shares for f in share], dtype=np.int32)


@dataclass(frozen=True)
class PatternWeight:
    """An OIHW conv weight packed by pattern (see module docstring for the layout)."""

    shape: tuple[int, int, int, int]
    patterns: tuple[Pattern, ...]
    filter_order: np.ndarray  # int32 (O,)
    kernel_ptr: np.ndarray  # int32 (O, P + 1)
    kernel_channel: np.ndarray  # int32 (K,)
    kernel_values: np.ndarray  # float32 (K, max_taps)

    @classmethod
    def from_dense(
        cls,
        weight: np.ndarray,
        patterns: list[Pattern] | None = None,
        num_shares: int = 1,
        keep_zeros: bool = False,
    ) -> PatternWeight:
        """Pack a dense OIHW weight; ``num_shares`` is the number of cores to balance over.

        ``keep_zeros=True`` packs every kernel with the full tap set (a dense conv, zeros computed).
        """
        weight = np.asarray(weight, dtype=np.float32)
        out_ch, in_ch, kh, kw = weight.shape
        masks = kernel_masks(weight)
        if keep_zeros:
            masks = np.ones_like(masks)
            patterns = [tuple(range(kh * kw))]
        pats = list(patterns) if patterns is not None else pattern_library(weight)
        index = {p: i for i, p in enumerate(pats)}
        num_p = len(pats)
        kernel_pattern = np.full((out_ch, in_ch), -1, dtype=np.int64)
        for o in range(out_ch):
            for c in range(in_ch):
                if masks[o, c].any():
                    key = tuple(int(t) for t in np.flatnonzero(masks[o, c]))
                    if key not in index:
                        raise ValueError(f"kernel ({o}, {c}) has taps {key}, not in the library")
                    kernel_pattern[o, c] = index[key]
        per_pattern = np.stack([(kernel_pattern == p).sum(1) for p in range(num_p)], axis=1)
        per_pattern = per_pattern.reshape(out_ch, num_p)
        taps = np.array([len(p) for p in pats], dtype=np.int64)
        work = per_pattern @ taps if num_p else np.zeros(out_ch, dtype=np.int64)
        order = balanced_filter_order(work, per_pattern, num_shares)

        max_taps = max((len(p) for p in pats), default=1)
        ptr = np.zeros((out_ch, num_p + 1), dtype=np.int32)
        channels, values = [], []
        for i, o in enumerate(order):
            ptr[i, 0] = len(channels)
            flat = weight[o].reshape(in_ch, kh * kw)
            for p, pat in enumerate(pats):
                for c in np.flatnonzero(kernel_pattern[o] == p):
                    channels.append(c)
                    row = np.zeros(max_taps, dtype=np.float32)
                    row[: len(pat)] = flat[c, list(pat)]
                    values.append(row)
                ptr[i, p + 1] = len(channels)
        return cls(
            shape=(out_ch, in_ch, kh, kw),
            patterns=tuple(pats),
            filter_order=order,
            kernel_ptr=ptr,
            kernel_channel=np.array(channels, dtype=np.int32),
            kernel_values=np.array(values, dtype=np.float32).reshape(len(channels), max_taps),
        )

    def to_dense(self) -> np.ndarray:
        """Unpack to the dense OIHW weight (exact round trip)."""
        out_ch, in_ch, kh, kw = self.shape
        dense = np.zeros((out_ch, in_ch, kh * kw), dtype=np.float32)
        for i, o in enumerate(self.filter_order):
            for p, pat in enumerate(self.patterns):
                for k in range(self.kernel_ptr[i, p], self.kernel_ptr[i, p + 1]):
                    dense[o, self.kernel_channel[k], list(pat)] = self.kernel_values[k, : len(pat)]
        return dense.reshape(self.shape)

    @property
    def num_kernels(self) -> int:
        return int(self.kernel_channel.shape[0])

    @property
    def num_taps(self) -> int:
        """Multiply-adds per output pixel (the FLOPs the sparse kernel computes, halved)."""
        counts = np.diff(self.kernel_ptr, axis=1).sum(0)
        return int(sum(int(n) * len(p) for n, p in zip(counts, self.patterns, strict=True)))
