"""The filters-in-lanes kernel's schedule knobs (``LanesConfig``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LanesConfig:
    """Schedule knobs: output rows and columns per tile (``rows x cols`` accumulator vectors)
    and the parallel shares (one per core)."""

    rows: int = 2
    cols: int = 8
    shares: int = 2
    prefetch: int = 0
