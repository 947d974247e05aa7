"""ADMM pruning (ADMM-NN / PatDNN) that plugs into the user's own training loop.

Problem: minimise ``loss(W)`` subject to ``W_i in S_i`` for each constrained layer i. Scaled ADMM
splits it into ``loss(W) + sum_i rho/2 ||W_i - Z_i + U_i||^2`` (trained by the user's optimizer),
``Z_i = proj_S_i(W_i + U_i)`` and ``U_i += W_i - Z_i`` every ``update_every`` steps, with rho
multiplied by ``rho_growth`` after each update (up to ``rho_max``; U is rescaled to stay the same
unscaled dual). Usage::

    admm = ADMMPruner(model, constraints, rho=1e-3, update_every=50)
    for x, y in loader:
        loss = criterion(model(x), y) + admm.penalty()
        opt.zero_grad(); loss.backward(); opt.step()
        admm.step()
    masks = admm.hard_prune()                 # project W onto S, return masks
    MaskEnforcer(model, masks).attach(opt)    # then fine-tune: masks hold on every step
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .constraints import Constraint, layer_weights, project_model


class ADMMPruner:
    """ADMM state (Z, U, rho) for ``constraints`` (module name -> :class:`Constraint`)."""

    def __init__(
        self,
        model: nn.Module,
        constraints: Mapping[str, Constraint],
        rho: float = 1e-3,
        update_every: int = 50,
        rho_growth: float = 1.0,
        rho_max: float = 1.0,
    ) -> None:
        if rho <= 0 or update_every < 1 or rho_growth < 1.0:
            raise ValueError("need rho > 0, update_every >= 1, rho_growth >= 1")
        self.model = model
        self.constraints = dict(constraints)
        self.weights = layer_weights(model, list(self.constraints))
        self.rho = rho
        self.update_every = update_every
        self.rho_growth = rho_growth
        self.rho_max = rho_max
        self.steps = 0
        self.updates = 0
        with torch.no_grad():
            self.Z = {n: self.constraints[n].project(w).clone() for n, w in self.weights.items()}
            self.U = {n: torch.zeros_like(w) for n, w in self.weights.items()}

    def penalty(self) -> torch.Tensor:
        """The augmented-Lagrangian term ``rho/2 sum ||W - Z + U||^2`` (differentiable in W)."""
        terms = [(w - self.Z[n] + self.U[n]).square().sum() for n, w in self.weights.items()]
        return 0.5 * self.rho * torch.stack(terms).sum()

    @torch.no_grad()
    def update(self) -> None:
        """One Z (projection) and U (dual ascent) update, then the rho schedule."""
        for name, w in self.weights.items():
            self.Z[name] = self.constraints[name].project(w + self.U[name])
            self.U[name] += w - self.Z[name]
        new_rho = min(self.rho * self.rho_growth, self.rho_max)
        if new_rho != self.rho:
            for u in self.U.values():
                u.mul_(self.rho / new_rho)
            self.rho = new_rho
        self.updates += 1

    def step(self) -> bool:
        """Call after each ``optimizer.step()``; runs :meth:`update` every ``update_every`` calls.

        Returns whether an update ran.
        """
        self.steps += 1
        if self.steps % self.update_every:
            return False
        self.update()
        return True

    @torch.no_grad()
    def residual(self) -> float:
        """Primal residual ``sum ||W - Z||^2 / sum ||W||^2`` (distance to the last Z)."""
        num = sum(float((w - self.Z[n]).square().sum()) for n, w in self.weights.items())
        den = sum(float(w.square().sum()) for w in self.weights.values())
        return num / max(den, 1e-30)

    @torch.no_grad()
    def violation(self) -> float:
        """Constraint violation ``sum ||W - proj(W)||^2 / sum ||W||^2`` (0 iff W is feasible)."""
        num = den = 0.0
        for name, w in self.weights.items():
            num += float((w - self.constraints[name].project(w)).square().sum())
            den += float(w.square().sum())
        return num / max(den, 1e-30)

    def hard_prune(self) -> dict[str, torch.Tensor]:
        """Project every constrained weight in place onto its set; return the boolean masks."""
        return project_model(self.model, self.constraints)
