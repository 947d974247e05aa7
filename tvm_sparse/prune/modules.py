"""One-shot block pruning of a model's matrices: ``nn.Linear``, ``nn.GRU`` / ``nn.LSTM`` /
``nn.RNN`` (``weight_ih_l*`` and ``weight_hh_l*`` of every layer and direction) and
``nn.MultiheadAttention`` (``in_proj_weight`` or the separate q / k / v weights; its
``out_proj`` is a Linear).

Each matrix (rows = outputs) is projected on its own with ``project_bsr`` (keep the
highest-norm ``keep`` fraction of whole blocks) or ``project_bcr`` (GRIM's block column-row:
inside every block keep ``col_keep`` of the columns, then ``row_keep`` of the rows). The
returned masks are keyed by parameter name (``rnn.weight_hh_l0``), the form ``MaskEnforcer``
takes for fine-tuning under the masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .blocks import bcr_mask, bsr_mask

FORMATS = ("bsr", "bcr")


def prunable_matrices(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weights ``block_prune_`` cuts, by parameter name, in definition order."""
    found: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        names: list[str] = []
        if isinstance(module, nn.Linear):
            names = ["weight"]
        elif isinstance(module, nn.RNNBase):
            own = module.named_parameters(recurse=False)
            names = [n for n, _ in own if n.startswith("weight_")]
        elif isinstance(module, nn.MultiheadAttention):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        for name in names:
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter) and param.ndim == 2:
                found[f"{prefix}.{name}" if prefix else name] = param
    return found


def block_prune_(
    model: nn.Module,
    keep: float,
    block: tuple[int, int] = (8, 8),
    fmt: str = "bsr",
    *,
    row_keep: float = 1.0,
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune every matrix of ``prunable_matrices`` in place; returns its mask by parameter
    name. ``fmt="bsr"`` keeps ``keep`` of the ``block`` blocks; ``fmt="bcr"`` keeps ``keep``
    of the columns inside every block and ``row_keep`` of its rows. ``select(name)`` limits
    pruning to the names it accepts (e.g. ``lambda n: "weight_hh" in n``)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"block must be (rows, columns), both >= 1, got {block}")
    masks = {}
    matrices = prunable_matrices(model)
    if not matrices:
        raise ValueError(f"{type(model).__name__} has no Linear, RNN or attention weight to prune")
    for name, param in matrices.items():
        if select is not None and not select(name):
            continue
        if fmt == "bsr":
            mask = bsr_mask(param, block, keep)
        else:
            mask = bcr_mask(param, block, row_keep, keep)
        with torch.no_grad():
            param.mul_(mask.to(param.device))
        masks[name] = mask
    return masks
