"""A Hugging Face BERT encoder (``transformers``' own model definition, built from a config with
random weights), its linears block-pruned, through ``tvm_sparse.compile`` (torch.export) vs
PyTorch with a padding mask: BSR linears over tokens with GELU fused, the attention fused with
its mask. Tolerance 1e-4 of the output scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_sparse
import tvm_sparse.pipeline as pipeline
from tvm_sparse.formats import CostTable
from tvm_sparse.testing import block_prune_model_

transformers = pytest.importorskip("transformers")

BSR_WINS = CostTable("test", {"fc_dense": (0.0, 1.0), "fc_bsr_16x1": (0.0, 1e-6)})


class Encoder(torch.nn.Module):
    """BertModel's last hidden state from token ids and an attention mask."""

    def __init__(self, config) -> None:
        super().__init__()
        self.bert = transformers.BertModel(config, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def test_block_pruned_bert_matches_torch(monkeypatch):
    monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: BSR_WINS)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    net = Encoder(config).eval()
    block_prune_model_(net, keep=0.3, block=(16, 1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (2, 11)).astype("int64")
    mask = np.ones((2, 11), "int64")
    mask[1, 7:] = 0  # the second sequence is 7 tokens long
    cm = tvm_sparse.compile(net, (ids, mask))
    with torch.no_grad():
        ref = net(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(cm(ids, mask), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    linears = [r for r in cm.layers if r.op == "matmul"]
    assert len(linears) == 12 and all(r.format == "bsr" for r in linears)
    assert [r.epilogue for r in linears].count("bias+gelu") == 2  # the intermediate dense
    assert [r.epilogue for r in cm.layers if r.op == "attention"] == ["mask", "mask"]
