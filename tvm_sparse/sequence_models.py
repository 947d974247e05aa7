"""Block-pruned sequence models: the CLI's ``builtin:gru-bcr`` and ``builtin:bert-bsr``.

- ``recurrent_model``: a stacked ``nn.GRU`` / ``nn.LSTM`` (input 39, hidden 1024, 2 layers,
  100 steps, batch 1 by default), its recurrent weights ``weight_hh_l*`` keeping ``keep`` of
  their 8x8 blocks; compiled from its ONNX export (one recurrence kernel per layer).
- ``encoder_model``: ``nn.TransformerEncoder`` (d_model 768, 12 heads, feed-forward 3072,
  batch_first, 128 tokens), every linear and the attention's ``in_proj_weight`` keeping
  ``keep`` of their 16x1 blocks; compiled from the ``nn.Module`` (torch.export).

Weights are seeded (``torch.manual_seed``), inputs drawn from ``numpy.random.default_rng``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .prune.modules import block_prune_


class RecurrentNet(nn.Module):
    """``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` on (T, B, features) input; returns its output Y."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        if kind not in ("GRU", "LSTM", "RNN"):
            raise ValueError(f"kind must be GRU, LSTM or RNN, got {kind!r}")
        self.rnn = getattr(nn, kind)(features, hidden, num_layers=layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def recurrent_model(
    kind: str = "GRU",
    keep: float | None = 0.1,
    block: tuple[int, int] = (8, 8),
    *,
    features: int = 39,
    hidden: int = 1024,
    layers: int = 2,
    steps: int = 100,
    batch: int = 1,
    seed: int = 0,
) -> tuple[RecurrentNet, np.ndarray]:
    """The model (eval mode; ``keep`` None: unpruned) and an input (steps, batch, features)."""
    torch.manual_seed(seed)
    net = RecurrentNet(kind, features, hidden, layers).eval()
    if keep is not None:
        block_prune_(net, keep, block, select=lambda name: ".weight_hh_" in name)
    x = np.random.default_rng(seed).standard_normal((steps, batch, features)).astype("float32")
    return net, x


def encoder_model(
    layers: int = 4,
    keep: float | None = 0.1,
    block: tuple[int, int] = (16, 1),
    *,
    tokens: int = 128,
    seed: int = 0,
) -> tuple[nn.TransformerEncoder, np.ndarray]:
    """The encoder (eval mode, no dropout; ``keep`` None: unpruned) and an input (1, tokens,
    768)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    if keep is not None:
        block_prune_(net, keep, block)
    x = np.random.default_rng(seed).standard_normal((1, tokens, 768)).astype("float32")
    return net, x


def gru_bcr() -> tuple[object, tuple[np.ndarray, ...]]:
    """``builtin:gru-bcr``: the 2-layer GRU, recurrent weights keeping 10 % of 8x8 blocks, as
    an ONNX model (``onnx.ModelProto``) and its example input."""
    import onnx

    from .benchmarking import onnx_bytes

    net, x = recurrent_model("GRU")
    return onnx.load_from_string(onnx_bytes(net, (x,))), (x,)


def bert_bsr() -> tuple[object, tuple[np.ndarray, ...]]:
    """``builtin:bert-bsr``: the 4-layer encoder, every matrix keeping 10 % of 16x1 blocks, as
    an ``nn.Module`` and its example input."""
    net, x = encoder_model()
    return net, (x,)


BUILTINS = {"builtin:gru-bcr": gru_bcr, "builtin:bert-bsr": bert_bsr}
