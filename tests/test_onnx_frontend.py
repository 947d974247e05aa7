"""The ONNX path: a file or ModelProto in, same numbers as ONNX Runtime and PyTorch out; bad files.

Tolerance: rtol 1e-4 / atol 1e-4 x output scale (float32).
"""

import numpy as np
import onnx
import pytest
import torch

import tvm_sparse
from tvm_sparse.benchmarking import onnx_bytes
from tvm_sparse.models import resnet18
from tvm_sparse.testing import pattern_prune_model_, randomize_batchnorm_


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batchnorm_(pattern_prune_model_(resnet18(num_classes=10, width=8))).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    path = tmp_path_factory.mktemp("onnx") / "resnet.onnx"
    path.write_bytes(onnx_bytes(model, (x,)))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return path, x, ref


def test_onnx_file_without_example_inputs(onnx_model):
    path, x, ref = onnx_model
    cm = tvm_sparse.compile(str(path))  # shapes come from the file
    np.testing.assert_allclose(cm(x), ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))
    assert sum(r.format == "pattern" for r in cm.layers) == 16
    assert cm.layers[1].name == "/layer1/layer1.0/conv1/Conv"  # the ONNX node names


def test_onnx_model_proto_matches_onnxruntime(onnx_model):
    ort = pytest.importorskip("onnxruntime")
    path, x, _ = onnx_model
    proto = onnx.load(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    got = tvm_sparse.compile(proto)(x)
    np.testing.assert_allclose(
        got, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max())
    )


def test_missing_onnx_file(tmp_path):
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"nope\.onnx: no such ONNX file"):
        tvm_sparse.compile(str(tmp_path / "nope.onnx"))


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"bad\.onnx: not a valid ONNX model"):
        tvm_sparse.compile(str(bad))


def test_truncated_onnx_file(onnx_model, tmp_path):
    path, _, _ = onnx_model
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"cut\.onnx"):
        tvm_sparse.compile(str(cut))


def test_wrong_number_of_example_inputs(onnx_model):
    path, x, _ = onnx_model
    with pytest.raises(tvm_sparse.InputError, match="has 1 inputs, got 2"):
        tvm_sparse.compile(str(path), (x, x))
