"""Dense 1x1 convs on the packed GEMM kernel (``schedules.dense_gemm``): numerics against
PyTorch on every x86 ISA this host runs, odd sizes, strides and the fused epilogue; the tiling
helpers; the pass's choice."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import ISA_TARGETS

import tvm_sparse
from relay_passes.linear_plan import GEMM_MIN_ROWS
from schedules.dense_gemm import GemmConfig, column_tiles, pack_columns, pack_rows

EPILOGUES = [(False, False, "none"), (True, False, "relu"), (True, True, "relu6")]
TOL = 1e-4  # float32, another summation order: relative to the largest output


class PointwiseBlock(torch.nn.Module):
    """1x1 conv (+ bias) (+ residual) (+ ReLU / ReLU6), the chains the kernel fuses."""

    def __init__(
        self, cin: int, cout: int, stride: int, bias: bool, residual: bool, act: str
    ) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 1, stride, bias=bias)
        self.residual, self.act = residual, act

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.residual:
            y = y + r
        if self.act == "relu":
            y = torch.relu(y)
        elif self.act == "relu6":
            y = torch.nn.functional.relu6(y)
        return y


def _check(model: torch.nn.Module, inputs: tuple, target: str) -> tvm_sparse.CompiledModel:
    cm = tvm_sparse.compile(model.eval(), inputs, target=target)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(a) for a in inputs)).numpy()
    got = cm(*inputs)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))
    return cm


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cin=st.integers(1, 40),
    cout=st.integers(1, 40),
    size=st.integers(3, 31),
    stride=st.sampled_from([1, 2]),
    batch=st.sampled_from([1, 2]),
    epilogue=st.sampled_from(EPILOGUES),
)
def test_pointwise_conv_matches_pytorch(target, cin, cout, size, stride, batch, epilogue):
    bias, residual, act = epilogue
    model = PointwiseBlock(cin, cout, stride, bias, residual, act)
    rng = np.random.default_rng(cin * 100 + cout)
    out = (size - 1) // stride + 1
    x = rng.standard_normal((batch, cin, size, size)).astype("float32")
    r = rng.standard_normal((batch, cout, out, out)).astype("float32")
    cm = _check(model, (x, r), target)
    conv = cm.layers[0]
    assert "packed GEMM" in conv.reason, conv.reason
    fused = ["bias"] * bias + ["residual"] * residual + [act] * (act != "none")
    assert conv.epilogue == "+".join(fused)  # one kernel: the whole chain fused


def test_resnet50_shaped_layers_match_pytorch():
    # ResNet-50's 1x1 shapes at a smaller map: K up to 1024, O up to 1024, stride 2 shortcut.
    for cin, cout, size, stride in [(256, 64, 14, 1), (1024, 256, 14, 1), (512, 1024, 28, 2)]:
        model = PointwiseBlock(cin, cout, stride, True, False, "relu")
        x = np.random.default_rng(cin).standard_normal((1, cin, size, size)).astype("float32")
        out = (size - 1) // stride + 1
        r = np.zeros((1, cout, out, out), "float32")
        cm = _check(model, (x, r), "x86")
        assert "packed GEMM" in cm.layers[0].reason


def test_column_tiles_cover_the_map_once():
    cfg = GemmConfig(rows=8, vectors=3, lanes=16)
    for columns in [1, 15, 16, 47, 48, 49, 95, 96, 196, 784, 3136]:
        full, last = column_tiles(columns, cfg)
        covered = full * cfg.width + (sum(last.widths) if last else 0)
        assert covered == columns
        if last is not None:
            assert last.start == full * cfg.width
            assert all(0 < w <= cfg.lanes for w in last.widths)
            # the accumulators of the last tile fit the registers the full tiles use
            assert last.rows * len(last.widths) <= cfg.rows * cfg.vectors
            assert cfg.rows % last.rows == 0


def test_packings_round_trip():
    w = np.arange(7 * 5, dtype="float32").reshape(7, 5)
    rows = pack_rows(w, 4)  # (2, 5, 4): tile t, k, row
    assert rows.shape == (2, 5, 4)
    assert rows[1, 3, 2] == w[6, 3] and rows[1, 3, 3] == 0  # zero-padded row 7
    cols = pack_columns(w, 4)  # (2, 7, 4): tile t, k, column
    assert cols.shape == (2, 7, 4)
    assert cols[1, 6, 0] == w[6, 4] and cols[1, 6, 1] == 0


class LinearBlock(torch.nn.Module):
    """nn.Linear on (batch, tokens, features) (+ residual) (+ ReLU): a Transformer's FC."""

    def __init__(self, cin: int, cout: int, residual: bool, relu: bool) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(cin, cout)
        self.residual, self.relu = residual, relu

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.residual:
            y = y + r
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("target", ISA_TARGETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 37),
    cin=st.integers(1, 70),
    cout=st.integers(2, 70),  # (a 1-wide linear imports its bias add differently)
    residual=st.booleans(),
    relu=st.booleans(),
)
def test_linear_over_tokens_matches_pytorch(target, batch, tokens, cin, cout, residual, relu):
    model = LinearBlock(cin, cout, residual, relu)
    rng = np.random.default_rng(tokens * 100 + cin)
    x = rng.standard_normal((batch, tokens, cin)).astype("float32")
    r = rng.standard_normal((batch, tokens, cout)).astype("float32")
    cm = _check(model, (x, r), target)
    fc = cm.layers[0]
    assert fc.format == "dense" and fc.flops_dense == 2 * batch * tokens * cin * cout
    if batch * tokens >= GEMM_MIN_ROWS:
        assert "GEMM" in fc.reason, fc.reason


def test_encoder_sized_linear_fuses_its_chain():
    model = LinearBlock(70, 50, residual=True, relu=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 37, 70)).astype("float32")
    r = rng.standard_normal((2, 37, 50)).astype("float32")
    fc = _check(model, (x, r), "x86").layers[0]
    assert "GEMM" in fc.reason and fc.epilogue == "bias+residual+relu"
