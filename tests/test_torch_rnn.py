"""``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` through ``torch.export`` (``tvm_sparse.torch_rnn``):
one recurrence kernel per layer direction, never unrolled steps; numerics vs PyTorch
(tolerance 1e-4 of the output scale) for stacked, bidirectional, batch_first layers, given
initial states, odd hidden sizes, and a block-pruned W_hh."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvm_sparse
from tvm_sparse.prune import block_prune_


class Recurrent(torch.nn.Module):
    """The module's output sequence and final hidden state, from an optional h0 (and c0)."""

    def __init__(self, kind: str, features: int, hidden: int, layers: int,
                 bidirectional: bool, batch_first: bool) -> None:  # fmt: skip
        super().__init__()
        self.kind = kind
        self.rnn = getattr(torch.nn, kind)(
            features, hidden, num_layers=layers, bidirectional=bidirectional,
            batch_first=batch_first,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = (h0, torch.tanh(h0)) if self.kind == "LSTM" else h0
        y, last = self.rnn(x, state)
        return y, last[0] if self.kind == "LSTM" else last


def _check(net: Recurrent, x: np.ndarray, h0: np.ndarray) -> tvm_sparse.CompiledModel:
    cm = tvm_sparse.compile(net.eval(), (x, h0))
    with torch.no_grad():
        refs = net(torch.from_numpy(x), torch.from_numpy(h0))
    for got, ref in zip(cm(x, h0), refs, strict=True):
        ref = ref.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))
    return cm


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["GRU", "LSTM", "RNN"]),
    hidden=st.integers(3, 40),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    batch=st.integers(1, 3),
)
def test_exported_recurrent_layers_match_torch(kind, hidden, layers, bidirectional, batch_first,
                                               batch):  # fmt: skip
    torch.manual_seed(hidden)
    net = Recurrent(kind, 5, hidden, layers, bidirectional, batch_first)
    steps, dirs = 7, 2 if bidirectional else 1
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal((batch, steps, 5) if batch_first else (steps, batch, 5))
    h0 = rng.standard_normal((layers * dirs, batch, hidden))
    cm = _check(net, x.astype("float32"), h0.astype("float32"))
    rows = [r for r in cm.layers if r.op == kind.lower()]
    assert len(rows) == layers * dirs  # one kernel per layer direction


def test_a_long_sequence_compiles_to_kernels_not_unrolled_steps():
    torch.manual_seed(0)
    net = Recurrent("LSTM", 16, 64, 2, False, False)
    block_prune_(net, 0.2, (8, 8), select=lambda name: ".weight_hh_" in name)
    x = np.random.default_rng(0).standard_normal((200, 1, 16)).astype("float32")
    h0 = np.zeros((2, 1, 64), "float32")
    start = time.perf_counter()
    cm = _check(net, x, h0)
    assert time.perf_counter() - start < 30
    rows = [r for r in cm.layers if r.op == "lstm"]
    assert len(rows) == 2 and all(r.format.startswith("bsr") for r in rows)


def test_a_program_exported_in_training_mode_is_refused(tmp_path):
    net = Recurrent("GRU", 4, 8, 1, False, False).train()
    x, h0 = torch.zeros(3, 1, 4), torch.zeros(1, 1, 8)
    path = tmp_path / "gru_train.pt2"
    torch.export.save(torch.export.export(net, (x, h0)), path)
    with pytest.raises(tvm_sparse.ModelLoadError, match="training mode"):
        tvm_sparse.compile(str(path))
