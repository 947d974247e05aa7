"""Random small pruned CNNs through ``tvm_sparse.compile``, numerics against PyTorch.

The models come from ``tvm_sparse.fuzzing.model_specs`` (conv 1x1 .. 7x7, strides 1-3,
padding, dilation, bias, BatchNorm, ReLU / ReLU6 / LeakyReLU, residual and global-context
blocks, chains of stride-1 convs, max / avg pools, flatten / mean + linear layers, depthwise and
grouped convs; dense, pattern-pruned, unstructured, all-zero, filter-pruned, BSR / BCR weights;
batch 1-3; odd sizes, 1..17 and 40..80 wide; through PyTorch or ONNX, sparse or the dense
baseline). Tolerance (``tvm_sparse.fuzzing.tolerance``): max |tvm - torch| <= 1e-4 *
max(1, max |torch|) * sqrt(conv / linear depth); failures seen so far were off by 0.1-10.
The longer run: ``benchmarks/fuzz_models.py --examples 200``. The later tests are the
failures the fuzzer found, shrunk.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from torch import nn

import tvm_sparse
import tvm_sparse.pipeline as pipeline
from tvm_sparse.errors import ModelLoadError
from tvm_sparse.formats import CostTable
from tvm_sparse.fuzzing import (
    Conv,
    Linear,
    ModelSpec,
    Pool,
    Residual,
    Sparsity,
    build_model,
    check_spec,
    feature_shape,
    model_specs,
    spec_input,
)

# About 0.5-4 s per model on 2 cores (compile + run): 20 examples took 23-33 s here.
CI_EXAMPLES = 20


@settings(
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking in CI: the failure prints its JSON
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model_specs(max_layers=3))
def test_random_models_match_pytorch(spec):
    result = check_spec(spec)
    assert result.ok, f"{result.summary()}\n{spec.describe()}\nreplay: {spec.to_json()}"


def test_spec_json_round_trip_and_shapes():
    spec = ModelSpec(
        batch=2, channels=3, height=9, width=7,
        features=(
            Conv(8, 3, 2, (1, 0), bias=True, bn=True, act="relu",
                 sparsity=Sparsity("pattern", 0.5, 4, 4, 2)),
            Residual((Conv(8, 3, padding=(1, 1)),), None, "relu6"),
            Pool("max", 3, 2, 1, ceil_mode=True),
        ),
        reduce="flatten",
        head=(Linear(5, sparsity=Sparsity("bsr", 0.3, block=(4, 1))),),
        seed=7,
    )  # fmt: skip
    assert ModelSpec.from_json(spec.to_json()) == spec
    model = build_model(spec)
    with torch.no_grad():
        features = model.features(torch.from_numpy(spec_input(spec)))
    assert tuple(features.shape[1:]) == feature_shape(spec)
    assert tuple(model(torch.from_numpy(spec_input(spec))).shape) == (2, 5)


def test_fuzzed_kernels_are_reached(monkeypatch):
    """A wide map: pattern convs in staged pairs, the max-pool kernel, BSR 1x1, FC (block
    kernels made the cheapest: on layers this tiny the host's table may prefer others)."""
    blocks_win = CostTable("test", {
        "fc_dense": (0.0, 1.0), "conv_dense": (0.0, 1.0), "conv_pattern": (0.0, 1.0),
        "fc_bsr_8x1": (0.0, 1e-6), "conv_bsr_8x1": (0.0, 1e-6),
    })  # fmt: skip
    monkeypatch.setattr(pipeline, "load_cost_table", lambda *_: blocks_win)
    pattern = Sparsity("pattern", 0.28, 8, 4, group=4)
    spec = ModelSpec(
        batch=2, channels=3, height=5, width=64,
        features=(
            Conv(8, 3, padding=(1, 1), bias=True, act="relu", sparsity=pattern),
            Conv(8, 3, padding=(1, 1), bn=True, act="relu6", sparsity=pattern),
            Pool("max", 3, 2, 1),
            Conv(16, 1, sparsity=Sparsity("bsr", 0.1, block=(8, 1))),
        ),
        reduce="mean",
        head=(Linear(10, sparsity=Sparsity("bsr", 0.1, block=(8, 1))),),
    )  # fmt: skip
    result = check_spec(spec)
    assert result.ok, result.summary()
    for kernel in ("pattern_conv2d_staged", "max_pool2d_s2", "bsr_conv1x1"):
        assert kernel in result.kernels


class _Unsupported(nn.Module):
    """A pruned conv followed by an op TVM's PyTorch importer does not take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return nn.functional.adaptive_max_pool2d(self.conv(x), 2)


def test_op_tvm_cannot_import_is_a_clear_error():
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ModelLoadError, match="adaptive_max_pool2d"):
        tvm_sparse.compile(_Unsupported().eval(), (x,))


def test_broadcast_add_is_not_fused_as_residual():
    """``relu(x + conv(mean(x)))``: the add broadcasts the conv's 1x1 output up to x's shape,
    so it is no residual of the conv kernel (which writes the conv's shape); fusing it failed
    the build (``Argument 6 type mismatch``)."""
    body = (Conv(8, 1, bias=True, sparsity=Sparsity("unstructured", 0.5)),)
    spec = ModelSpec(2, 8, 5, 5, (Residual(body, None, "relu", pooled=True),))
    result = check_spec(spec)
    assert result.ok, result.summary()


class _BroadcastFC(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x[:1]) + x  # (1, 8) + (2, 8)


def test_broadcast_add_after_linear_is_not_fused_as_residual():
    model = _BroadcastFC().eval()
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(tvm_sparse.compile(model, (x,))(x), ref, rtol=1e-5, atol=1e-5)


def test_all_zero_conv_after_a_staged_producer_builds():
    """A conv whose weight is all zeros reads no input; paired as a staged-layout consumer,
    its kernel used only ``filter_order`` and TVM's RewriteDataflowReshape took it for a
    reshape and failed (``HasReshapePattern``: body is no SBlockRealize). Not paired now."""
    layers = (Conv(1, 1, padding=(0, 1)), Conv(1, 2, sparsity=Sparsity("zero")))
    result = check_spec(ModelSpec(1, 1, 4, 48, layers, reduce="mean"))
    assert result.ok, result.summary()
    assert "pattern_conv2d_staged" not in result.kernels


def test_depthwise_1x1_conv_is_not_taken_as_block_sparse():
    """A depthwise 1x1 conv with zero weights: RewriteBSRConv1x1 took its (16, 1, 1, 1) weight
    for a (16, 1) matrix (a dense conv from one input channel): max |diff| 4.7."""
    dw = Conv(16, 1, groups=16, sparsity=Sparsity("unstructured", 0.95))
    result = check_spec(ModelSpec(1, 16, 1, 7, (dw,)))
    assert result.ok, result.summary()
    assert result.formats == ["conv2d:depthwise"]
