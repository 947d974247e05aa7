"""Fixed-mask fine-tuning: keep pruned weights at zero through every optimizer step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .constraints import layer_weights


class MaskEnforcer:
    """Holds boolean masks (module name -> mask shaped like ``module.weight``) on a model.

    ``attach(optimizer)`` registers hooks so that, on every ``optimizer.step()``, gradients of
    pruned weights are zeroed before the update and the pruned weights are zeroed after it (the
    latter also cancels momentum / weight decay / Adam state). ``apply()`` zeroes them by hand.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.weights = layer_weights(model, list(masks))
        self.masks = {
            n: m.to(device=self.weights[n].device, dtype=torch.bool) for n, m in masks.items()
        }
        for name, mask in self.masks.items():
            if mask.shape != self.weights[name].shape:
                raise ValueError(
                    f"mask for {name} is {tuple(mask.shape)}, weight is "
                    f"{tuple(self.weights[name].shape)}"
                )
        self._handles: list[RemovableHandle] = []

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight in place."""
        for name, weight in self.weights.items():
            weight.mul_(self.masks[name])

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (where a gradient exists)."""
        for name, weight in self.weights.items():
            if weight.grad is not None:
                weight.grad.mul_(self.masks[name])

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskEnforcer:
        """Enforce the masks around every ``optimizer.step()``; returns self."""

        def pre(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            self.mask_grads()

        def post(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            self.apply()

        self._handles += [
            optimizer.register_step_pre_hook(pre),
            optimizer.register_step_post_hook(post),
        ]
        self.apply()
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def density(self) -> float:
        """Kept weights / constrained weights."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        return kept / max(1, sum(m.numel() for m in self.masks.values()))
