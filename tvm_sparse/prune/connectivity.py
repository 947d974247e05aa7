"""Connectivity pruning: keep a fraction of the kernels (O, C pairs) of a conv by L2 norm."""

from __future__ import annotations

import torch

from .patterns import expand_groups, group_sum


def num_kept(total: int, keep: float) -> int:
    """How many of ``total`` items a keep rate in (0, 1] keeps: round(keep * total), at least 1."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep}")
    return min(total, max(1, round(keep * total)))


def top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``count`` largest; ties go to the lower index."""
    flat = scores.detach().flatten().to(torch.float64)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(scores.shape)


def kernel_norms(weight: torch.Tensor) -> torch.Tensor:
    """(O, C) squared L2 norm of each KH x KW kernel of an OIHW weight."""
    return weight.detach().to(torch.float64).square().sum(dim=(2, 3))


def connectivity_mask(weight: torch.Tensor, keep: float, filter_group: int = 1) -> torch.Tensor:
    """Boolean OIHW mask keeping the ``num_kept(O*C, keep)`` highest-norm kernels.

    ``filter_group`` > 1: kernels are kept or dropped per group of that many consecutive
    filters and channel (by the group's norm), so a group's filters share their input channels.
    """
    norms = group_sum(kernel_norms(weight), filter_group)
    kept = top_mask(norms, num_kept(norms.numel(), keep))
    kept = expand_groups(kept, filter_group, weight.shape[0])
    return kept[:, :, None, None].expand_as(weight)


def project_connectivity(weight: torch.Tensor, keep: float) -> torch.Tensor:
    """Euclidean projection onto "at most ``num_kept(O*C, keep)`` nonzero kernels"."""
    return weight.detach() * connectivity_mask(weight, keep)
