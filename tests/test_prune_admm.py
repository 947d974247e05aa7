"""ADMM helper in a user-written loop: penalty, Z/U updates, rho schedule, hard prune, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tvm_sparse.prune import (
    ADMMPruner,
    BCRConstraint,
    BSRConstraint,
    MaskEnforcer,
    PatternConstraint,
    candidate_patterns,
    pattern_constraints,
)


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
    )


def _constraints() -> dict:
    lib = tuple(candidate_patterns()[::7][:8])
    return {
        "0": PatternConstraint(lib, 1.0),
        "2": PatternConstraint(lib, 0.5),
        "5": BSRConstraint((4, 8), 0.25),
    }


def _task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression onto a random dense teacher: x (128, 4, 6, 6), y (128, 16)."""
    torch.manual_seed(seed)
    teacher = _model()
    x = torch.randn(128, 4, 6, 6)
    with torch.no_grad():
        return x, teacher(x)


def test_penalty_value_and_gradient() -> None:
    torch.manual_seed(0)
    model = _model()
    admm = ADMMPruner(model, _constraints(), rho=0.3)
    for u in admm.U.values():
        u.normal_()
    pen = admm.penalty()
    pen.backward()
    expected = 0.0
    for name, w in admm.weights.items():
        diff = (w - admm.Z[name] + admm.U[name]).detach()
        expected += 0.5 * 0.3 * float(diff.square().sum())
        torch.testing.assert_close(w.grad, 0.3 * diff)
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-5)


def test_update_schedule_and_rho_rescaling() -> None:
    torch.manual_seed(0)
    model = _model()
    admm = ADMMPruner(model, _constraints(), rho=0.1, update_every=3, rho_growth=2.0, rho_max=0.3)
    w = admm.weights["5"]
    with torch.no_grad():
        w.add_(0.01)  # move W so that W != Z
    assert [admm.step() for _ in range(3)] == [False, False, True]
    z = admm.constraints["5"].project(w)
    torch.testing.assert_close(admm.Z["5"], z)
    # U = W - Z in units of the old rho, rescaled so that rho * U (the true dual) is unchanged.
    torch.testing.assert_close(admm.U["5"] * admm.rho, (w - z).detach() * 0.1)
    assert admm.rho == pytest.approx(0.2)
    for _ in range(6):
        admm.step()
    assert admm.rho == pytest.approx(0.3) and admm.updates == 3


def test_admm_drives_the_constraint_violation_down() -> None:
    x, y = _task()
    torch.manual_seed(1)
    model = _model()
    constraints = _constraints()
    # (With a constant-LR Adam the weights keep jittering by ~lr; decay its LR, as digits does.)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    admm = ADMMPruner(model, constraints, rho=1e-2, update_every=10, rho_growth=1.3, rho_max=10.0)
    start = admm.violation()
    residuals = []
    for _ in range(300):  # the user's own loop
        loss = nn.functional.mse_loss(model(x), y) + admm.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if admm.step():
            residuals.append(admm.residual())
    assert start > 0.1
    assert admm.violation() < 0.01 * start
    assert residuals[-1] < 0.01 * residuals[0]
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(x), y)) < 0.01  # still fits the task
    masks = admm.hard_prune()
    assert admm.violation() == 0.0
    for name, mask in masks.items():
        w = admm.weights[name]
        assert torch.equal(w != 0, mask & (w != 0)) and mask.dtype == torch.bool
        assert torch.equal(constraints[name].project(w), w.detach())


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_mask_enforcer_holds_masks_on_every_step(make_opt) -> None:
    x, y = _task()
    torch.manual_seed(2)
    model = _model()
    opt = make_opt(model.parameters())
    # Build up optimizer state (momentum / Adam moments) on the dense weights first.
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    constraints = {**pattern_constraints(model, 8, 0.3), "5": BCRConstraint((4, 8), 0.5, 0.5)}
    admm = ADMMPruner(model, constraints)
    masks = admm.hard_prune()
    before = {n: w.detach().clone() for n, w in admm.weights.items()}
    enforcer = MaskEnforcer(model, masks).attach(opt)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for name, w in admm.weights.items():
            assert not w[~masks[name]].any()
    for name, w in admm.weights.items():
        assert not torch.equal(w[masks[name]], before[name][masks[name]])  # kept ones train
    assert enforcer.density() == pytest.approx(
        sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    )
    enforcer.detach()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert any(w[~masks[n]].any() for n, w in admm.weights.items())  # hooks are gone


def test_bad_arguments() -> None:
    model = _model()
    with pytest.raises(KeyError, match="no such modules"):
        ADMMPruner(model, {"nope": BSRConstraint((2, 2), 0.5)})
    with pytest.raises(ValueError, match="rho"):
        ADMMPruner(model, _constraints(), rho=0.0)
    with pytest.raises(ValueError, match="mask for 5"):
        MaskEnforcer(model, {"5": torch.ones(3, 3, dtype=torch.bool)})
