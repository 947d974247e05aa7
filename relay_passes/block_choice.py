"""What the two block-sparse passes share: the per-layer format decision and the kernel args.

Each layer's choice (``formats.block``: BSR / BCR vs what the next pass would run, by measured
cost) is made once per call. A call whose choice is not a block format is reported as
unsupported with the reason, so it stays for the next pass, and the reason is kept in ``notes``
(op, shape text, reason) for that pass's report record.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax

from tvm_sparse.formats.block import BlockChoice

from .epilogue import EpilogueMatch

BLOCK_FORMATS = ("bsr", "bcr")


class BlockDecisions:
    """Cached per-call decisions and the ``unsupported`` / ``on_fallback`` hooks built on them.

    ``choose(call)`` returns (choice, weight as an (out, in) matrix); it is called only for calls
    ``base_unsupported`` accepts. ``prefix`` marks a reason as "not chosen" (not "cannot").
    """

    def __init__(
        self,
        op: str,
        base_unsupported: Callable[[relax.Call], str | None],
        choose: Callable[[relax.Call], tuple[BlockChoice, np.ndarray]],
        shape_text: Callable[[relax.Call], str],
        prefix: str,
        notes: list[tuple[str, str, str]],
    ) -> None:
        self.op, self.base_unsupported, self.choose = op, base_unsupported, choose
        self.shape_text, self.prefix, self.notes = shape_text, prefix, notes
        self.cache: dict[relax.Call, tuple[BlockChoice, np.ndarray]] = {}

    def decide(self, call: relax.Call) -> tuple[BlockChoice, np.ndarray]:
        if call not in self.cache:
            self.cache[call] = self.choose(call)
        return self.cache[call]

    def unsupported(self, call: relax.Call) -> str | None:
        reason = self.base_unsupported(call)
        if reason is not None:
            return reason
        choice, _ = self.decide(call)
        return None if choice.format in BLOCK_FORMATS else self.prefix + choice.reason

    def fallback(self, call: relax.Call, reason: str) -> None:
        if reason.startswith(self.prefix):
            self.notes.append((self.op, self.shape_text(call), reason.removeprefix(self.prefix)))


def block_kernel_args(
    match: EpilogueMatch, visit: Callable, packed, block_rows: int, out_features: int
) -> list[relax.Expr]:
    """Input, packed weight arrays, bias padded to whole block rows, residual: the kernel's args."""
    args = [visit(match.anchor.args[0])] + [relax.const(a) for a in packed.kernel_args()]
    if match.bias is not None:
        pad = packed.num_rows * block_rows - out_features
        args.append(relax.const(np.pad(match.bias, (0, pad))))
    if match.residual is not None:
        args.append(visit(match.residual))
    return args
