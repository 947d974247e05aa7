"""The sparsity report: computed with the compiler's detection, BN folded like the compiler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tvm_sparse.formats import choose_conv_format, conv_sparsity
from tvm_sparse.prune import (
    BSRConstraint,
    pattern_constraints,
    project_bcr,
    project_model,
    sparsity_report,
)
from tvm_sparse.prune.report import choose_block_format, folded_conv_weights


class Net(nn.Module):
    """3x3 convs with BN, a 1x1, a 5x5, a depthwise conv and an FC; input (N, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.conv4 = nn.Conv2d(16, 8, 5, padding=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x) + x)
        x = self.dw(torch.relu(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _pruned_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    net.bn2.weight.data[[3, 7]] = 0.0  # two filters the compiler folds to all-zero
    constraints = {**pattern_constraints(net, 8, 0.4), "conv3": BSRConstraint((4, 4), 0.25)}
    project_model(net, constraints)
    with torch.no_grad():
        net.fc.weight.copy_(project_bcr(net.fc.weight, (4, 4), 0.5, 0.5))
    return net.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_bn_folding_matches_a_hand_fold() -> None:
    net = _pruned_net()
    folded = folded_conv_weights(net, (X,))
    assert sorted(folded) == ["conv1", "conv2", "conv3", "conv4", "dw"]
    bn = net.bn2
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    np.testing.assert_allclose(
        folded["conv2"], (net.conv2.weight.detach() * scale[:, None, None, None]).numpy(), rtol=1e-6
    )
    np.testing.assert_array_equal(folded["conv3"], net.conv3.weight.detach().numpy())
    assert net.training is False  # mode restored


def test_report_uses_the_compiler_detection() -> None:
    net = _pruned_net()
    report = sparsity_report(net, (X,))
    folded = folded_conv_weights(net, (X,))
    assert [r.name for r in report.convs] == ["conv1", "conv2", "conv3", "conv4"]  # not dw
    for row in report.convs:
        stats = conv_sparsity(folded[row.name])
        assert row.stats == stats
        assert (row.format, row.reason) == choose_conv_format(stats)
    # The zeroed BN channels empty two whole filters of conv2 (seen only with BN folded).
    raw = sparsity_report(net)
    conv2, conv2_raw = report.convs[1], raw.convs[1]
    assert conv2.nonzeros == conv2_raw.nonzeros - int((net.conv2.weight[[3, 7]] != 0).sum())
    assert conv2.format == "pattern" and report.formats()["conv3"] == "pattern"
    # Totals over the 3x3 convs.
    w3 = [folded[n] for n in ("conv1", "conv2")]
    assert report.conv3x3_weights == sum(w.size for w in w3)
    assert report.conv3x3_nonzeros == sum(int((w != 0).sum()) for w in w3)
    assert report.conv3x3_compression == report.conv3x3_weights / report.conv3x3_nonzeros
    # Block section: the BSR-pruned 1x1 conv and the BCR-pruned FC.
    blocks = {r.name: r for r in report.blocks}
    assert blocks["conv3"].format == "bsr" and blocks["conv3"].stats.block_density == 0.25
    assert blocks["fc"].format == "bcr" and blocks["fc"].stats.density == 0.25
    assert choose_block_format(blocks["fc"].stats)[0] == "bcr"
    assert "conv2" in report.to_markdown() and "x fewer" in str(report)


def test_report_agrees_with_the_compile_report() -> None:
    compiler = pytest.importorskip("tvm_sparse.compiler", reason="tvm_sparse.compile not built")
    net = _pruned_net()
    report = sparsity_report(net, (X,))
    compiled = compiler.compile(net, (X,), target="x86")
    skip = ("tvm", "depthwise")  # the report covers convs with a sparsity choice
    records = {r.name: r for r in compiled.layers if r.op == "conv2d" and r.format not in skip}
    assert sorted(records) == sorted(row.name for row in report.convs)  # named as in torch
    blocks = {row.name: row for row in report.blocks}
    for row in report.convs:
        rec = records[row.name]
        assert rec.shape.startswith("x".join(map(str, row.stats.shape)))
        if rec.format in ("bsr", "bcr"):  # a 1x1 conv the block pass took (by measured cost)
            assert rec.format == blocks[row.name].format
        else:  # the pattern / dense decision, word for word (a block note may precede it,
            # the kernel's notes follow it)
            assert (rec.format, rec.density) == (row.format, row.stats.density)
            assert row.reason in rec.reason
    with torch.no_grad():
        np.testing.assert_allclose(compiled(X.numpy()), net(X).numpy(), rtol=1e-4, atol=1e-5)
