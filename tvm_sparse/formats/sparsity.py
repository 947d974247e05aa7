"""Sparsity statistics of conv weights and the format decision made from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pattern import kernel_masks, pattern_library

# Above this many distinct patterns the per-pattern code paths cost more than they save.
MAX_PATTERNS = 32
# The sparse kernel pays for index loads and shorter inner loops: below ~2x fewer FLOPs, stay dense.
MAX_FLOPS_KEPT = 0.5


@dataclass(frozen=True)
class ConvSparsity:
    """What a conv weight (OIHW) keeps: the facts the format choice is made from."""

    shape: tuple[int, int, int, int]
    density: float  # nonzero weights / all weights
    kernel_density: float  # kernels with any nonzero / all kernels (connectivity)
    num_patterns: int  # distinct tap sets among kept kernels
    max_taps: int  # taps in the largest pattern

    @property
    def flops_kept(self) -> float:
        """Fraction of the dense multiply-adds the pattern kernel computes (== density)."""
        return self.density


def conv_sparsity(weight: np.ndarray) -> ConvSparsity:
    """Measure the pattern / connectivity sparsity of an OIHW weight."""
    weight = np.asarray(weight)
    masks = kernel_masks(weight)
    kept = masks.any(axis=-1)
    pats = pattern_library(weight)
    return ConvSparsity(
        shape=tuple(int(d) for d in weight.shape),
        density=float(masks.mean()) if masks.size else 0.0,
        kernel_density=float(kept.mean()) if kept.size else 0.0,
        num_patterns=len(pats),
        max_taps=max((len(p) for p in pats), default=0),
    )


def choose_conv_format(stats: ConvSparsity) -> tuple[str, str]:
    """Pick "pattern" or "dense" for a conv and say why."""
    if stats.num_patterns > MAX_PATTERNS:
        return (
            "dense",
            f"{stats.num_patterns} distinct patterns (> {MAX_PATTERNS}): not pattern-pruned",
        )
    if stats.flops_kept > MAX_FLOPS_KEPT:
        return "dense", (
            f"keeps {stats.flops_kept:.0%} of the FLOPs (> {MAX_FLOPS_KEPT:.0%}): "
            "sparse would not win"
        )
    return "pattern", (
        f"{stats.num_patterns} patterns of <= {stats.max_taps} taps, "
        f"{stats.kernel_density:.0%} of kernels kept: "
        f"{1 / max(stats.flops_kept, 1e-9):.1f}x fewer FLOPs"
    )
