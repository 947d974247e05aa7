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
- ``filter_group``: packed filters ``[g * G, (g + 1) * G)`` have the same kernels (channels and
  patterns; their values differ). Found from the weight: a dense conv, or one whose connectivity
  and patterns were pruned per group of filters (``tvm_sparse.prune``'s ``filter_group``), packs
  with G = 16, 8, 4 or 2, so the kernel can compute a group's filters from one input load (and
  groups of a vector's lanes put the filters in lanes: ``lane_values``). G = 1 when filters
  cannot all be grouped.
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
    share_size = [
        len(ranked) // num_shares + (s < len(ranked) % num_shares) for s in range(num_shares)
    ]
    shares: list[list[int]] = [[] for _ in range(num_shares)]
    loads = [0] * num_shares
    for f in ranked:
        open_shares = [s for s in range(num_shares) if len(shares[s]) < share_size[s]]
        s = min(open_shares, key=lambda s: (loads[s], s))
        shares[s].append(f)
        loads[s] += int(work[f])
    return np.array([f for share in shares for f in share], dtype=np.int32)


def filter_groups(
    kernel_pattern: np.ndarray, sizes: tuple[int, ...] = (16, 8, 4, 2)
) -> list[list[int]]:
    """Filters (rows of the (O, C) pattern-index map, -1 = pruned kernel) split into groups with
    identical rows: the largest size in ``sizes`` that splits every set of identical filters
    evenly, else singletons."""
    _, inverse, counts = np.unique(kernel_pattern, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    for size in sizes:
        if np.all(counts % size == 0):
            groups = []
            for sig in range(len(counts)):
                members = np.flatnonzero(inverse == sig).tolist()
                groups += [members[i : i + size] for i in range(0, len(members), size)]
            return sorted(groups)
    return [[o] for o in range(kernel_pattern.shape[0])]


@dataclass(frozen=True)
class PatternWeight:
    """An OIHW conv weight packed by pattern (see module docstring for the layout)."""

    shape: tuple[int, int, int, int]
    patterns: tuple[Pattern, ...]
    filter_order: np.ndarray  # int32 (O,)
    kernel_ptr: np.ndarray  # int32 (O, P + 1)
    kernel_channel: np.ndarray  # int32 (K,)
    kernel_values: np.ndarray  # float32 (K, max_taps)
    filter_group: int = 1

    @classmethod
    def from_dense(
        cls,
        weight: np.ndarray,
        patterns: list[Pattern] | None = None,
        num_shares: int = 1,
        keep_zeros: bool = False,
        group_filters: bool = True,
    ) -> PatternWeight:
        """Pack a dense OIHW weight; ``num_shares`` is the number of cores to balance over.

        ``keep_zeros=True`` packs every kernel with the full tap set (zeros computed).
        ``group_filters=False`` packs every filter on its own (``filter_group`` 1).
        """
        weight = np.asarray(weight, dtype=np.float32)
        out_ch, in_ch, kh, kw = weight.shape
        masks = kernel_masks(weight)
        if keep_zeros:
            masks = np.ones((out_ch, in_ch, kh * kw), bool)
            patterns = [tuple(range(kh * kw))]
        pats = list(patterns) if patterns is not None else pattern_library(weight)
        num_p = len(pats)
        # Each kernel's tap set as an integer code, then as an index into the library (-1: empty).
        bits = 1 << np.arange(kh * kw, dtype=np.int64)
        codes = masks.astype(np.int64) @ bits
        lib_codes = np.array([sum(1 << t for t in p) for p in pats], dtype=np.int64)
        lookup = {int(c): i for i, c in enumerate(lib_codes)}
        kernel_pattern = np.full((out_ch, in_ch), -1, dtype=np.int64)
        for code in np.unique(codes[codes != 0]):
            if int(code) not in lookup:
                o, c = np.argwhere(codes == code)[0]
                taps = tuple(int(t) for t in np.flatnonzero(masks[o, c]))
                raise ValueError(f"kernel ({o}, {c}) has taps {taps}, not in the library")
            kernel_pattern[codes == code] = lookup[int(code)]
        per_pattern = np.zeros((out_ch, num_p), dtype=np.int64)
        for p in range(num_p):
            per_pattern[:, p] = (kernel_pattern == p).sum(1)
        work = per_pattern @ np.array([len(p) for p in pats], dtype=np.int64)
        groups = filter_groups(kernel_pattern) if group_filters else [[o] for o in range(out_ch)]
        leaders = [g[0] for g in groups]
        group_order = balanced_filter_order(work[leaders], per_pattern[leaders], num_shares)
        order = np.array([o for g in group_order for o in groups[g]], dtype=np.int32)

        # Kernels sorted by (packed filter, pattern, channel): one contiguous run per (i, p).
        rank = np.empty(out_ch, dtype=np.int64)
        rank[order] = np.arange(out_ch)
        o_idx, c_idx = np.nonzero(kernel_pattern >= 0)
        p_idx = kernel_pattern[o_idx, c_idx]
        sort = np.lexsort((c_idx, p_idx, rank[o_idx]))
        o_idx, c_idx, p_idx = o_idx[sort], c_idx[sort], p_idx[sort]
        counts = per_pattern[order]
        ptr = np.zeros((out_ch, num_p + 1), dtype=np.int32)
        ptr[:, 1:] = np.cumsum(counts, axis=1)
        ptr += np.concatenate([[0], np.cumsum(counts.sum(1))[:-1]]).astype(np.int32)[:, None]

        max_taps = max((len(p) for p in pats), default=1)
        flat = weight.reshape(out_ch, in_ch, kh * kw)
        values = np.zeros((len(o_idx), max_taps), dtype=np.float32)
        for p, pat in enumerate(pats):
            sel = p_idx == p
            values[sel, : len(pat)] = flat[o_idx[sel], c_idx[sel]][:, list(pat)]
        return cls(
            shape=(out_ch, in_ch, kh, kw),
            patterns=tuple(pats),
            filter_order=order,
            kernel_ptr=ptr,
            kernel_channel=c_idx.astype(np.int32),
            kernel_values=values,
            filter_group=len(groups[0]),
        )

    def to_dense(self) -> np.ndarray:
        """Unpack to the dense OIHW weight (exact round trip)."""
        out_ch, in_ch, kh, kw = self.shape
        dense = np.zeros((out_ch, in_ch, kh * kw), dtype=np.float32)
        per_run = np.diff(self.kernel_ptr, axis=1)  # (O, P) kernels per (filter, pattern)
        filt = np.repeat(np.repeat(self.filter_order, len(self.patterns)), per_run.reshape(-1))
        pat = np.repeat(np.tile(np.arange(len(self.patterns)), out_ch), per_run.reshape(-1))
        for p, taps in enumerate(self.patterns):
            sel = pat == p
            rows = self.kernel_values[sel, : len(taps)]
            dense[filt[sel][:, None], self.kernel_channel[sel][:, None], list(taps)] = rows
        return dense.reshape(self.shape)

    @property
    def num_kernels(self) -> int:
        return int(self.kernel_channel.shape[0])

    @property
    def num_taps(self) -> int:
        """Multiply-adds per output pixel (the FLOPs the sparse kernel computes, halved)."""
        counts = np.diff(self.kernel_ptr, axis=1).sum(0)
        return int(sum(int(n) * len(p) for n, p in zip(counts, self.patterns, strict=True)))

    def lane_values(self, lanes: int) -> np.ndarray:
        """``kernel_values`` with each filter group's filters side by side, (K / lanes,
        max_taps, lanes): row ``b / lanes + j`` holds the taps of the group's j-th kernel for
        its ``lanes`` filters, b being the group's first kernel (``kernel_ptr[g * lanes, 0]``).
        Needs groups of ``lanes`` filters (``filter_group``)."""
        if self.filter_group % lanes:
            raise ValueError(f"filters grouped by {self.filter_group}, not by {lanes} lanes")
        taps = self.kernel_values.shape[1]
        out = np.zeros((max(self.num_kernels // lanes, 1), taps, lanes), np.float32)
        for i0 in range(0, self.shape[0], lanes):
            first, end = int(self.kernel_ptr[i0, 0]), int(self.kernel_ptr[i0 + lanes - 1, -1])
            block = self.kernel_values[first:end].reshape(lanes, -1, taps)  # filter, kernel, tap
            out[first // lanes : end // lanes] = block.transpose(1, 2, 0)
        return out
