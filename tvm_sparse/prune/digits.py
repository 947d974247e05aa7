"""The real-data check: a small CNN on scikit-learn's digits, dense -> ADMM prune -> fine-tune.

Data: the 1797 8x8 grey images shipped with scikit-learn (pixel values 0..16, scaled to [0, 1]),
split 75/25 stratified with a fixed seed. Model: three 3x3 convs (with BN) on NCHW (N, 1, 8, 8)
input. Pruning: 8 patterns on every 3x3 conv plus connectivity pruning of all but the first conv
(whose 1 input channel leaves only ``width[0]`` kernels). Everything is seeded and runs on one
thread, so a run is bit-for-bit reproducible on a given machine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .admm import ADMMPruner
from .constraints import PatternConstraint, pattern_constraints, project_model
from .masks import MaskEnforcer
from .report import SparsityReport, sparsity_report

WIDTH = (32, 64, 64)  # channels of the three convs; (16, 32, 32) prunes to ~1 point lost


class DigitsCNN(nn.Module):
    """conv3x3(1->c1)-BN-ReLU, conv3x3(c1->c2)-BN-ReLU-maxpool, conv3x3(c2->c3)-BN-ReLU-maxpool, fc.

    Input (N, 1, 8, 8) float32; output (N, 10) logits.
    """

    def __init__(self, width: tuple[int, int, int] = WIDTH) -> None:
        super().__init__()
        c1, c2, c3 = width
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(c3 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.pool(self.relu(self.bn3(self.conv3(x))))
        return self.fc(torch.flatten(x, 1))


@dataclass(frozen=True)
class DigitsData:
    """Train / test tensors: x (N, 1, 8, 8) float32 in [0, 1], y (N,) int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(split_seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's digits, stratified split (seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return DigitsData(*(torch.from_numpy(a) for a in (xtr, ytr, xte, yte)))


@dataclass(frozen=True)
class Recipe:
    """Training schedule (epochs over the training set, minibatches of ``batch_size``)."""

    dense_epochs: int = 30
    admm_epochs: int = 30
    finetune_epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    rho: float = 1e-2
    rho_growth: float = 1.5
    rho_max: float = 1.0
    update_every: int = 0  # optimizer steps between Z/U updates; 0 = once per epoch


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    acc = 100.0 * correct / len(y)
    model.train(was_training)
    return acc


def train(
    model: nn.Module,
    data: DigitsData,
    epochs: int,
    lr: float,
    recipe: Recipe,
    seed: int,
    admm: ADMMPruner | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> None:
    """Adam + cosine LR over ``epochs``; optional ADMM penalty / updates or fixed masks."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    n = len(data.y_train)
    steps_per_epoch = -(-n // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    enforcer = MaskEnforcer(model, masks).attach(opt) if masks is not None else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if admm is not None:
                loss = loss + admm.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if admm is not None:
                admm.step()
    if enforcer is not None:
        enforcer.detach()
    model.eval()


def digits_constraints(
    model: DigitsCNN, num_patterns: int = 8, kernel_keep: float = 0.27, filter_group: int = 1
) -> dict[str, PatternConstraint]:
    """8-pattern library from the model's weights; conv1 pattern-only, the rest ``kernel_keep``;
    ``filter_group``: choices per group of filters (see ``PatternConstraint``)."""
    return pattern_constraints(
        model,
        num_patterns,
        {"conv1": 1.0, "conv2": kernel_keep, "conv3": kernel_keep},
        filter_group=filter_group,
    )


@dataclass
class DigitsResult:
    """Test accuracies (percent) and the pruned model with its sparsity report."""

    dense_acc: float
    pruned_acc: float
    oneshot_acc: float | None  # projection of the dense model without ADMM, fine-tuned alike
    compression: float  # dense / nonzero 3x3 conv weights
    report: SparsityReport
    model: DigitsCNN
    dense_model: DigitsCNN


def train_dense(
    data: DigitsData,
    seed: int = 0,
    recipe: Recipe = Recipe(),
    width: tuple[int, int, int] = WIDTH,
) -> DigitsCNN:
    """A dense DigitsCNN trained from a seeded init."""
    with _threads(1):
        torch.manual_seed(seed)
        model = DigitsCNN(width)
        train(model, data, recipe.dense_epochs, recipe.lr, recipe, seed)
    return model


def prune_digits(
    dense: DigitsCNN,
    data: DigitsData,
    method: str = "admm",
    num_patterns: int = 8,
    kernel_keep: float = 0.27,
    seed: int = 0,
    recipe: Recipe = Recipe(),
    filter_group: int = 1,
) -> DigitsCNN:
    """A pruned copy of ``dense``: ``method`` "admm" (ADMM, hard prune, fine-tune) or "oneshot"
    (project the dense weights, fine-tune with the same budget)."""
    if method not in ("admm", "oneshot"):
        raise ValueError(f"method must be 'admm' or 'oneshot', got {method!r}")
    with _threads(1):
        torch.manual_seed(seed)
        model = copy.deepcopy(dense)
        constraints = digits_constraints(model, num_patterns, kernel_keep, filter_group)
        if method == "admm":
            steps_per_epoch = -(-len(data.y_train) // recipe.batch_size)
            admm = ADMMPruner(
                model,
                constraints,
                rho=recipe.rho,
                update_every=recipe.update_every or steps_per_epoch,
                rho_growth=recipe.rho_growth,
                rho_max=recipe.rho_max,
            )
            train(model, data, recipe.admm_epochs, recipe.lr, recipe, seed + 1, admm=admm)
            masks = admm.hard_prune()
            finetune_epochs = recipe.finetune_epochs
        else:
            masks = project_model(model, constraints)
            finetune_epochs = recipe.admm_epochs + recipe.finetune_epochs
        train(model, data, finetune_epochs, recipe.finetune_lr, recipe, seed + 2, masks=masks)
    return model


def run_digits(
    seed: int = 0,
    num_patterns: int = 8,
    kernel_keep: float = 0.27,
    recipe: Recipe = Recipe(),
    with_oneshot: bool = False,
    width: tuple[int, int, int] = WIDTH,
) -> DigitsResult:
    """Train dense, ADMM-prune and fine-tune (optionally the one-shot baseline too)."""
    data = load_digits_data()
    dense = train_dense(data, seed, recipe, width)
    pruned = prune_digits(dense, data, "admm", num_patterns, kernel_keep, seed, recipe)
    oneshot = None
    if with_oneshot:
        base = prune_digits(dense, data, "oneshot", num_patterns, kernel_keep, seed, recipe)
        oneshot = accuracy(base, data.x_test, data.y_test)
    report = sparsity_report(pruned, (data.x_test[:1],))
    return DigitsResult(
        dense_acc=accuracy(dense, data.x_test, data.y_test),
        pruned_acc=accuracy(pruned, data.x_test, data.y_test),
        oneshot_acc=oneshot,
        compression=report.conv3x3_compression,
        report=report,
        model=pruned,
        dense_model=dense,
    )
