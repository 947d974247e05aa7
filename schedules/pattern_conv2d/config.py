"""The pattern conv kernel's schedule knobs (``PatternConvConfig``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PatternConvConfig:
    """Schedule knobs: output rows per tile, vector lanes along the output width, and filters
    computed together (a divisor of the packing's filter group: filters with the same kernel
    list, so each input vector load feeds ``filters`` FMAs)."""

    rows: int = 2
    vector: int = 8
    filters: int = 1
    # Output columns per tile (a multiple of ``vector``); 0: the whole row. Narrower tiles keep
    # the input rows a tile reads (over all channels) closer to L1.
    cols: int = 0
    # Input staged as one copy per tap column dx, pre-shifted so every vector load is aligned
    # (costs kw x the staging memory); otherwise one copy per stride phase, loads unaligned.
    shifted: bool = False
    # Lane-segmented staging (whole-row tiles, not folded; ``Tiling.segment``): vector lane l
    # computes output column ``S * l + j`` (S vectors per row, j the vector), and the input is
    # staged transposed to match, staged vector q < S of a row holding column ``S * l + q`` in
    # lane l. Every tap reads one aligned staged vector, shared by the vectors and taps that
    # read it, or one lane shift of it in registers (columns past S * l + S - 1): S loads per
    # input row of a 3-wide kernel, not 3 S of which 2 S split; the output is transposed back
    # in registers.
    segmented: bool = False
    # Loop order: 0 keeps each filter's reduction in registers; > 0 runs the input channels
    # outermost in blocks of this many, over ``shares`` parallel shares of the filters.
    channel_block: int = 0
    # Parallel shares (one per core). Registers-only order: contiguous runs of the jobs, each
    # staging the input rows it reads; channel-blocked: shares of the filters.
    shares: int = 2
    # Software prefetch: while computing kernel k, fetch the input rows of kernel k + prefetch
    # into L1 (0: off). A tile's input rows over all channels outgrow L1 (128 channels x 4
    # rows x 128 B = 64 KiB at 28x28), and a job reads its channels in an order no hardware
    # prefetcher follows: measured here, 4-8 kernels ahead cut 0.19 -> 0.165 ms (128x128 @ 28).
    prefetch: int = 0
    # Output rows per vector: the input is staged with rows of ``vector // fold`` columns (the
    # right border's zero column is the next row's left one), so one vector covers ``fold``
    # short output rows: a 7x7 map fills 16-lane vectors two rows at a time instead of 8-lane
    # vectors one row at a time. Applies where the rows fit (``folded_rows``), with whole rows
    # per tile, the phase staging and the registers-only order; else 1.
    fold: int = 1
