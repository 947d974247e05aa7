"""Block pruning of 2-D weights (FC layers, 1x1 convs): BSR and BCR (GRIM-style) projections.

A weight of any rank >= 2 is viewed as a matrix (O, I*KH*KW...) -- an FC (O, I) or a 1x1 conv
OIHW as (O, I) -- and cut into blocks of ``(rows, cols)``. Edge blocks of a matrix whose size is
not a multiple of the block are zero-padded to the full block (so they count as full blocks).

- BSR: keep the highest-Frobenius-norm fraction of whole blocks.
- BCR (block column-row): inside every block keep a fraction of whole columns (by column norm),
  then of whole rows (by row norm of the kept columns); the block's nonzeros form a
  rows x columns product, the same number in every block.
"""

from __future__ import annotations

import math

import torch

from .connectivity import num_kept, top_mask


def _padded_blocks(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(R, C, r, c) float64 blocks of ``weight`` viewed as a matrix, zero-padded."""
    r, c = block
    if r < 1 or c < 1:
        raise ValueError(f"block shape must be positive, got {block}")
    mat = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    rows, cols = mat.shape
    pad_r, pad_c = -rows % r, -cols % c
    mat = torch.nn.functional.pad(mat, (0, pad_c, 0, pad_r))
    return mat.reshape((rows + pad_r) // r, r, (cols + pad_c) // c, c).permute(0, 2, 1, 3)


def _unblock(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_padded_blocks` for a (R, C, r, c) mask: crop to ``shape``."""
    n_r, n_c, r, c = mask.shape
    mat = mask.permute(0, 2, 1, 3).reshape(n_r * r, n_c * c)
    rows = shape[0]
    cols = math.prod(shape[1:])
    return mat[:rows, :cols].reshape(shape)


def _top_mask_last(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` largest along the last dim (ties: lower index), batched."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :count], True)
    return mask


def bsr_mask(weight: torch.Tensor, block: tuple[int, int], keep: float) -> torch.Tensor:
    """Boolean mask (shape of ``weight``) keeping the ``num_kept(#blocks, keep)`` largest blocks."""
    blocks = _padded_blocks(weight, block)
    norms = blocks.square().sum(dim=(2, 3))
    kept = top_mask(norms, num_kept(norms.numel(), keep))
    return _unblock(kept[:, :, None, None].expand(blocks.shape), weight.shape)


def project_bsr(weight: torch.Tensor, block: tuple[int, int], keep: float) -> torch.Tensor:
    """Euclidean projection onto "at most ``num_kept(#blocks, keep)`` nonzero blocks"."""
    return weight.detach() * bsr_mask(weight, block, keep)


def bcr_mask(
    weight: torch.Tensor, block: tuple[int, int], row_keep: float, col_keep: float
) -> torch.Tensor:
    """Boolean mask keeping, in every block, the best ``col_keep`` columns then ``row_keep`` rows.

    Columns are ranked by their L2 norm in the block, then rows by their norm over the kept
    columns. With ``row_keep == 1`` (or ``col_keep == 1``) this is the exact projection.
    """
    blocks = _padded_blocks(weight, block)
    r, c = block
    cols = _top_mask_last(blocks.square().sum(dim=2), num_kept(c, col_keep))  # (R, C, c)
    rows_energy = (blocks.square() * cols[:, :, None, :]).sum(dim=3)  # (R, C, r)
    rows = _top_mask_last(rows_energy, num_kept(r, row_keep))
    return _unblock(rows[..., :, None] & cols[..., None, :], weight.shape)


def project_bcr(
    weight: torch.Tensor, block: tuple[int, int], row_keep: float, col_keep: float
) -> torch.Tensor:
    """Project onto "each block keeps num_kept(r, row_keep) rows x num_kept(c, col_keep) cols"."""
    return weight.detach() * bcr_mask(weight, block, row_keep, col_keep)
