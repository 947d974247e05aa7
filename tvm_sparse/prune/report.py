"""Sparsity report of a PyTorch model, computed with the compiler's own detection functions.

Conv rows use :func:`tvm_sparse.formats.conv_sparsity` and :func:`choose_conv_format` on the
weight the compiler sees: with ``example_inputs`` the model is exported and every conv directly
followed by an eval-mode BatchNorm gets the BN scale folded in (``W * gamma / sqrt(var + eps)`` per
output channel, float32 -- zeros stay zeros). Block rows (FC layers and 1x1 convs) use
the compiler's :func:`tvm_sparse.formats.block.block_sparsity` at the given block shape; their
format column is a shape-only rule (``choose_block_format`` below); the compiler decides per
layer by estimated time (``tvm_sparse.formats.block.choose_block_format`` /
``choose_conv1x1_format``, which also need the input size and the machine's cost table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..formats import ConvSparsity, choose_conv_format, conv_sparsity
from ..formats.block import BlockSparsity, block_sparsity

_CONV_OPS = {"conv2d.default", "convolution.default"}
# eval-mode BN ops -> position of eps: (x, gamma, beta, mean, var, [training,] momentum, eps, ...)
_BN_OPS = {"_native_batch_norm_legit_no_training.default": 6, "batch_norm.default": 7}
BLOCK_MAX_KEPT = 0.5  # like the conv rule: below 2x fewer FLOPs a block format would not win


def choose_block_format(stats: BlockSparsity) -> tuple[str, str]:
    """Pick "bsr", "bcr" or "dense" for an FC / 1x1 weight and say why."""
    if stats.block_density <= BLOCK_MAX_KEPT:
        return "bsr", f"{stats.block_density:.0%} of {stats.block} blocks kept"
    if stats.rowcol_density <= BLOCK_MAX_KEPT and np.isclose(stats.rowcol_density, stats.density):
        return "bcr", f"row-column pruned blocks {stats.block}, {stats.density:.0%} kept"
    return "dense", f"{stats.density:.0%} nonzero, no block structure that would win"


@dataclass(frozen=True)
class ConvRow:
    name: str
    stats: ConvSparsity
    format: str
    reason: str

    @property
    def weights(self) -> int:
        return int(np.prod(self.stats.shape))

    @property
    def nonzeros(self) -> int:
        return round(self.stats.density * self.weights)


@dataclass(frozen=True)
class BlockRow:
    name: str
    stats: BlockSparsity
    format: str
    reason: str


@dataclass
class SparsityReport:
    """Per-layer rows plus totals over the 3x3 convs (the pattern-pruned ones)."""

    convs: list[ConvRow] = field(default_factory=list)
    blocks: list[BlockRow] = field(default_factory=list)

    def _conv3x3(self) -> list[ConvRow]:
        return [r for r in self.convs if r.stats.shape[2:] == (3, 3)]

    @property
    def conv3x3_weights(self) -> int:
        return sum(r.weights for r in self._conv3x3())

    @property
    def conv3x3_nonzeros(self) -> int:
        return sum(r.nonzeros for r in self._conv3x3())

    @property
    def conv3x3_compression(self) -> float:
        """Dense / nonzero 3x3 conv weights (the "x fewer weights" figure)."""
        return self.conv3x3_weights / max(1, self.conv3x3_nonzeros)

    def formats(self) -> dict[str, str]:
        """Conv name -> chosen conv format ("pattern" / "dense")."""
        return {r.name: r.format for r in self.convs}

    def block_formats(self) -> dict[str, str]:
        """FC / 1x1 conv name -> chosen block format ("bsr" / "bcr" / "dense")."""
        return {r.name: r.format for r in self.blocks}

    def to_markdown(self) -> str:
        lines = [
            "| layer | shape | density | kernels kept | patterns | format | why |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.convs:
            s = r.stats
            lines.append(
                f"| {r.name} | {'x'.join(map(str, s.shape))} | {s.density:.3f} | "
                f"{s.kernel_density:.3f} | {s.num_patterns} | {r.format} | {r.reason} |"
            )
        for r in self.blocks:
            s = r.stats
            lines.append(
                f"| {r.name} | {'x'.join(map(str, s.shape))} | {s.density:.3f} | "
                f"blocks {s.block_density:.3f} | - | {r.format} | {r.reason} |"
            )
        lines.append(
            f"\n3x3 conv weights: {self.conv3x3_nonzeros} / {self.conv3x3_weights} nonzero "
            f"({self.conv3x3_compression:.2f}x fewer)"
        )
        return "\n".join(lines)

    __str__ = to_markdown


def _target_name(node: torch.fx.Node) -> str:
    return (
        str(getattr(node.target, "_opname", ""))
        + "."
        + str(getattr(node.target, "_overloadname", ""))
    )


def folded_conv_weights(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> dict[str, np.ndarray]:
    """Conv module name -> OIHW float32 weight with a directly following eval BN folded in."""
    was_training = model.training
    try:
        ep = torch.export.export(model.eval(), example_inputs)
    finally:
        model.train(was_training)
    params = {**ep.state_dict, **ep.constants}
    to_param = {**ep.graph_signature.inputs_to_parameters, **ep.graph_signature.inputs_to_buffers}

    def tensor(node: object) -> torch.Tensor:
        assert isinstance(node, torch.fx.Node) and node.name in to_param
        return params[to_param[node.name]].detach()

    out: dict[str, np.ndarray] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or _target_name(node) not in _CONV_OPS:
            continue
        weight_name = to_param[node.args[1].name]
        weight = tensor(node.args[1]).to(torch.float32)
        users = list(node.users)
        if len(users) == 1 and _target_name(users[0]) in _BN_OPS:
            bn = users[0]
            gamma, var = tensor(bn.args[1]), tensor(bn.args[4])
            eps = float(bn.args[_BN_OPS[_target_name(bn)]])
            scale = (gamma / torch.sqrt(var + eps)).to(torch.float32)
            weight = weight * scale[:, None, None, None]
        out[weight_name.removesuffix(".weight")] = weight.numpy()
    return out


def sparsity_report(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    block: tuple[int, int] = (4, 4),
) -> SparsityReport:
    """Report every dense (groups=1) conv and every FC / 1x1 conv of ``model``.

    Without ``example_inputs`` the raw module weights are measured (BN not folded; identical
    unless some BN scale is exactly zero).
    """
    folded = folded_conv_weights(model, example_inputs) if example_inputs is not None else {}
    report = SparsityReport()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            w = folded.get(name, m.weight.detach().float().numpy())
            stats = conv_sparsity(w)
            report.convs.append(ConvRow(name, stats, *choose_conv_format(stats)))
        if isinstance(m, nn.Linear) or (
            isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)
        ):
            w = folded.get(name, m.weight.detach().float().numpy())
            stats_b = block_sparsity(w.reshape(w.shape[0], -1), block)
            report.blocks.append(BlockRow(name, stats_b, *choose_block_format(stats_b)))
    return report
