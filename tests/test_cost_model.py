"""Cost tables: measuring one (``tvm_sparse.cost_model``, tiny sizes), storing and finding it
(the CPU's own, else its ISA family's), and the choice over tokens using the ``linear_*`` kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm

import tvm_sparse
import tvm_sparse.formats.block as block_format
import tvm_sparse.pipeline as pipeline
from tvm_sparse.cost_model import _Measure, write_cost_table
from tvm_sparse.formats import CostTable
from tvm_sparse.formats.block import load_cost_table
from tvm_sparse.prune import project_bsr
from tvm_sparse.targets import cost_family, resolve_target


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(block_format, "COST_TABLE_DIR", str(tmp_path))
    return tmp_path


def _table(path, cpu: str) -> None:
    path.joinpath(f"{cpu}.json").write_text(json.dumps({
        "cpu": cpu, "entries": {"fc_dense": {"overhead_ms": 0.0, "ms_per_unit": 1.0}},
    }))  # fmt: skip


def test_the_cpu_table_then_the_family_then_any(table_dir):
    for name in ("avx2", "avx512", "znver5"):
        _table(table_dir, name)
    assert load_cost_table("znver5", "avx512").cpu == "znver5"
    assert load_cost_table("skylake-avx512", "avx512").cpu == "avx512"
    assert load_cost_table("cortex-a76", "neon").cpu == "avx2"  # no NEON CPU measured
    assert load_cost_table("", "").cpu == "avx2"  # the first shipped
    assert cost_family(resolve_target("x86-avx2")) == "avx2"
    assert cost_family(resolve_target("arm64")) == "neon"


def test_measured_kinds_are_written_and_found(table_dir):
    target = tvm.target.Target(resolve_target("x86"))
    measure = _Measure(target, say=lambda msg: None)
    measure.dense_rows("linear_dense", [(16, 32, 32), (16, 64, 64)])
    measure.block_rows("linear", [(16, 32, 32), (16, 64, 64)])
    assert {"linear_dense", "linear_bsr_16x1", "linear_bcr_8x8"} <= set(measure.entries)
    assert all(e["ms_per_unit"] > 0 for e in measure.entries.values())
    write_cost_table(target, measure.entries, "avx512", {"cpu": "test"})
    table = load_cost_table("some-other-cpu", "avx512")
    assert table.estimate("linear_dense", 1000) > 0


def test_over_tokens_the_choice_uses_the_linear_kinds(monkeypatch):
    # BSR far cheaper than the batch-1 GEMV, far dearer than the GEMM over tokens
    table = CostTable("test", {
        "fc_dense": (0.0, 1.0), "fc_bsr_16x1": (0.0, 1e-6),
        "linear_dense": (0.0, 1e-9), "linear_bsr_16x1": (0.0, 1.0),
    })  # fmt: skip
    monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: table)
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 32).eval()
    with torch.no_grad():
        net.weight.copy_(project_bsr(net.weight, (16, 1), 0.2))
    for rows, fmt in (((1, 64), "bsr"), ((2, 20, 64), "dense")):
        x = np.random.default_rng(0).standard_normal(rows).astype("float32")
        cm = tvm_sparse.compile(net, (x,))
        [layer] = cm.layers
        assert layer.format == fmt, layer.reason
        np.testing.assert_allclose(cm(x), net(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
