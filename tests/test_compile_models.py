"""Whole models through ``tvm_sparse.compile``: numerics against PyTorch, report, export/load.

Tolerance: rtol 1e-4 / atol 1e-4 relative to the output scale (float32, reordered sums).
"""

import numpy as np
import pytest
import torch
from torch import nn

import tvm_sparse
from tvm_sparse.models import resnet18, vgg16_bn
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_


def _check(model, x, tol=1e-4):
    cm = tvm_sparse.compile(model, (x,))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = cm(x)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)
    return cm


def _pruned(model, seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm_(pattern_prune_model_(model, seed=seed), seed=seed).eval()


def test_tiny_resnet_residual_blocks_batch2():
    model = _pruned(resnet18(num_classes=10, width=8))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("float32")
    cm = _check(model, x)
    formats = [r.format for r in cm.layers if r.op == "conv2d"]
    assert formats.count("pattern") == 16  # every 3x3 conv of the residual stages
    assert any("residual" in r.epilogue for r in cm.layers)
    names = [r.name for r in cm.layers]
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]  # the torch module paths
    assert "layer2.0.downsample.0" in names and names[-1] == "fc"


def test_tiny_vgg_with_batchnorm():
    model = _pruned(vgg16_bn(num_classes=10, width=8, classifier_width=32, image_size=32))
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype("float32")
    cm = _check(model, x)
    assert sum(r.format == "pattern" for r in cm.layers) == 13  # all 13 3x3 convs pruned
    # conv + bias + BatchNorm folded into one conv, so bias and ReLU fuse into the kernel
    assert all(r.epilogue == "bias+relu" for r in cm.layers if r.op == "conv2d")


def test_unpruned_model_compiles_dense_and_says_why():
    model = randomize_batchnorm_(resnet18(num_classes=10, width=8)).eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype("float32")
    cm = _check(model, x)
    convs = [r for r in cm.layers if r.op == "conv2d"]
    assert convs and all(r.format == "dense" for r in convs)
    assert all("sparse would not win" in r.reason for r in convs)
    assert "dense" in cm.report() and "why" in cm.report()


class _Mixed(nn.Module):
    """A pruned conv next to ops the sparse kernels do not take (depthwise conv, sigmoid)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dilated = nn.Conv2d(8, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return torch.sigmoid(self.dilated(self.depthwise(torch.relu(self.conv(x)))))


def test_unsupported_ops_fall_back_to_tvm():
    model = pattern_prune_model_(_Mixed(), kernel_keep=0.5).eval()
    x = np.random.default_rng(3).standard_normal((1, 8, 12, 12)).astype("float32")
    cm = _check(model, x)
    by_format = {r.format for r in cm.layers}
    assert by_format == {"pattern", "depthwise", "tvm"}
    reasons = " ".join(r.reason for r in cm.layers if r.format == "tvm")
    assert "dilation" in reasons


def test_export_and_load_round_trip(tmp_path):
    model = _pruned(resnet18(num_classes=10, width=8))
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype("float32")
    cm = tvm_sparse.compile(model, (x,))
    path = cm.export(tmp_path / "m.so")
    loaded = tvm_sparse.load(path)
    np.testing.assert_array_equal(loaded(x), cm(x))
    assert loaded.report() == cm.report()


def test_wrong_input_shape_is_a_clear_error():
    model = _pruned(resnet18(num_classes=10, width=8))
    x = np.zeros((1, 3, 32, 32), "float32")
    cm = tvm_sparse.compile(model, (x,))
    with pytest.raises(
        tvm_sparse.InputError, match=r"input 'input0': expected shape \(1, 3, 32, 32\)"
    ):
        cm(np.zeros((1, 3, 16, 16), "float32"))
    with pytest.raises(tvm_sparse.InputError, match="takes 1 inputs, got 2"):
        cm(x, x)


def test_load_missing_or_corrupt_artifact(tmp_path):
    with pytest.raises(tvm_sparse.ModelLoadError, match="missing"):
        tvm_sparse.load(tmp_path / "nothing.so")
    (tmp_path / "bad.so").write_bytes(b"not a library")
    (tmp_path / "bad.so.json").write_text("{not json")
    with pytest.raises(tvm_sparse.ModelLoadError, match="corrupt metadata"):
        tvm_sparse.load(tmp_path / "bad.so")


class _Depthwise(nn.Module):
    """MobileNetV2's pieces: depthwise 3x3 (stride 1 and 2) + ReLU6 (imported as clip)."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        y = nn.functional.relu6(self.dw1(x))
        return self.grouped(self.dw2(y) * 2.0)


def test_depthwise_convs_run_on_the_pattern_kernel_with_relu6_fused():
    model = randomize_batchnorm_(_Depthwise()).eval()
    x = np.random.default_rng(5).standard_normal((2, 8, 13, 11)).astype("float32") * 4
    cm = _check(model, x)
    formats = [(r.format, r.epilogue) for r in cm.layers if r.op == "conv2d"]
    assert formats[:2] == [("depthwise", "bias+relu6"), ("depthwise", "")]
    assert formats[2][0] == "tvm" and "groups=2" in cm.layers[2].reason
