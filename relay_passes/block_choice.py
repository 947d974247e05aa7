"""What the two block-sparse passes share: the block formats, the kernel args, the notes.

The per-layer choice itself is in the plans (``conv_plan``, ``linear_plan``): a layer whose
block choice lost keeps why in its plan's ``block_note``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax

from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch

BLOCK_FORMATS = ("bsr", "bcr")


def block_kernel_args(
    match: EpilogueMatch, visit: Callable, packed, block_rows: int, out_features: int
) -> list[relax.Expr]:
    """Input, packed weight arrays, bias padded to whole block rows, residual: the kernel's args."""
    pad = (0, packed.num_rows * block_rows - out_features)
    weight = [relax.const(a) for a in packed.kernel_args()]
    return [visit(match.anchor.args[0]), *weight, *match.operands(visit, lambda b: np.pad(b, pad))]


def block_notes(
    kernels: tuple[str, ...],
    records: list[LayerRecord] | None,
    notes: list[tuple[str, str, str]] | None,
) -> Callable[[list], None]:
    """A block pass's report of its own plans (when used alone): the rows of the layers it
    rewrote to ``records``, (op, shape, why not) of those a block format lost to ``notes``."""

    def report(plans: list) -> None:
        for plan in plans:
            if plan.kernel in kernels and records is not None:
                records.append(plan.record())
            elif plan.block_note and notes is not None:
                notes.append((plan.op, plan.shape, plan.block_note))

    return report
