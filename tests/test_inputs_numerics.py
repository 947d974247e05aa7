"""NaN through every fused activation; float16 / bfloat16 / float64 models refused early; .pt2.

NaN: PyTorch's relu / relu6 / hardtanh / clamp keep NaN, and so must every kernel's fused
epilogue and TVM's own relu / clip. Where every weight is computed (dense kernels, TVM's ops, a
NaN weight) the NaN positions are PyTorch's exactly. A sparse kernel skips pruned weights, while
PyTorch's dense conv also multiplies them (0 x NaN = NaN): a NaN input reaches exactly the
outputs it reaches through a non-zero weight (``_reach``), and those are the expected NaN
positions there. Finite values: rtol 1e-4 / atol 1e-4 x output scale (float32).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import tvm_sparse
import tvm_sparse.pipeline as pipeline
from tvm_sparse.formats import CostTable
from tvm_sparse.targets import resolve_target, vector_lanes
from tvm_sparse.testing import block_prune_model_, pattern_prune_model_

TOL = 1e-4
SHAPE = (2, 16, 8, 8)


class Branches(nn.Module):
    """One branch per fused kernel and activation, each reading the input (NaN reaches every
    epilogue), plus relu / clip left on TVM's path."""

    def __init__(self) -> None:
        super().__init__()
        self.pattern = nn.Conv2d(16, 16, 3, padding=1)  # pattern kernel, bias + relu
        self.pattern6 = nn.Conv2d(16, 16, 3, padding=1, bias=False)  # relu6
        self.lanes = nn.Conv2d(16, 32, 3, padding=1)  # dense, filters in lanes (16 lanes)
        self.pointwise = nn.Conv2d(16, 8, 1)  # dense 1x1
        self.block1x1 = nn.Conv2d(16, 64, 1)  # block-sparse 1x1
        self.fc = nn.Linear(16 * 8 * 8, 64)  # block-sparse FC
        self.dense_fc = nn.Linear(16, 12)  # dense FC, clamp(0, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            torch.relu(self.pattern(x)),
            F.relu6(self.pattern6(x)),
            torch.relu(self.lanes(x)),
            torch.relu(self.pointwise(x)),
            torch.relu(self.block1x1(x)),
            torch.relu(self.fc(x.flatten(1))),
            torch.clamp(self.dense_fc(x.mean(dim=(2, 3))), 0.0, 6.0),
            F.hardtanh(x * 2.0),  # clip(-1, 1) on TVM's path
            torch.relu(x - 0.1),  # relu on TVM's path
        )


def _branches() -> Branches:
    torch.manual_seed(0)
    model = Branches()
    pattern_prune_model_(model.pattern, kernel_keep=0.5, seed=1)
    pattern_prune_model_(model.pattern6, kernel_keep=0.5, seed=2)
    block_prune_model_(model.block1x1, keep=0.15)
    block_prune_model_(model.fc, keep=0.1)
    with torch.no_grad():  # leave relu6 / clip something to clip
        model.pattern6.weight.mul_(8.0)
        model.dense_fc.weight.mul_(20.0)
    return model.eval()


def _reach(model: Branches, nan: torch.Tensor) -> list[torch.Tensor | None]:
    """Per output: where a NaN input reaches through a non-zero weight (None: not weighted)."""

    def conv(layer: nn.Conv2d) -> torch.Tensor:
        return F.conv2d(nan, (layer.weight != 0).float(), padding=layer.padding) > 0

    flat = nan.flatten(1) @ (model.fc.weight != 0).float().T > 0
    mean = nan.amax(dim=(2, 3)) @ (model.dense_fc.weight != 0).float().T > 0
    convs = [model.pattern, model.pattern6, model.lanes, model.pointwise, model.block1x1]
    return [*(conv(layer) for layer in convs), flat, mean, None, None]


def _expected(model: Branches, x: np.ndarray) -> list[np.ndarray]:
    """PyTorch's outputs, NaN where a NaN input reaches through a non-zero weight (elsewhere
    PyTorch on the input with its NaN as 0, which pruned weights then multiply)."""
    xt = torch.from_numpy(x)
    nan = torch.isnan(xt).float()
    with torch.no_grad():
        plain = model(xt)
        finite = model(torch.nan_to_num(xt, nan=0.0))
    out = []
    for p, f, reach in zip(plain, finite, _reach(model, nan), strict=True):
        out.append(p.numpy() if reach is None else torch.where(reach, torch.nan, f).numpy())
    return out


def _assert_same(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Same NaN positions, finite values within TOL of the output scale."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN positions")
    scale = max(1.0, float(np.nanmax(np.abs(ref), initial=0.0)))
    np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL * scale, equal_nan=True, err_msg=what)


# Block kernels far cheaper than the alternatives: the block-pruned branches take them whatever
# the host's cost table says of such tiny layers.
BLOCKS_WIN = CostTable("test", {
    "fc_dense": (0.0, 1.0), "conv_dense": (0.0, 1.0), "conv_pattern": (0.0, 1.0),
    "fc_bsr_8x1": (0.0, 1e-6), "conv_bsr_8x1": (0.0, 1e-6),
})  # fmt: skip


@pytest.fixture(scope="module")
def branches():
    model = _branches()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "load_cost_table", lambda *_: BLOCKS_WIN)
        return model, tvm_sparse.compile(model, (x,))


def test_every_branch_runs_on_the_kernel_it_tests(branches):
    _, cm = branches
    by_name = {r.name: r for r in cm.layers}
    assert by_name["pattern"].format == by_name["pattern6"].format == "pattern"
    assert by_name["pattern"].epilogue == "bias+relu" and by_name["pattern6"].epilogue == "relu6"
    assert by_name["pointwise"].format == by_name["lanes"].format == "dense"
    if vector_lanes(resolve_target("x86")) == 16:
        assert "filters computed in vector lanes" in by_name["lanes"].reason
    assert by_name["block1x1"].format in ("bsr", "bcr") and by_name["fc"].format == "bsr"
    assert by_name["dense_fc"].format == "dense" and by_name["dense_fc"].epilogue == "bias+relu6"


def test_nan_inputs_stay_nan_through_every_activation(branches):
    model, cm = branches
    x = np.random.default_rng(1).standard_normal(SHAPE).astype("float32") * 4
    x[0, 3, 4, 5] = x[0, 9, 0, 7] = np.nan  # single pixels (one on the border)
    x[1] = np.nan  # a whole image
    got = cm(x)
    expected = _expected(model, x)
    with torch.no_grad():
        plain = [p.numpy() for p in model(torch.from_numpy(x))]
    for i, (g, ref) in enumerate(zip(got, expected, strict=True)):
        assert np.isnan(ref[1]).all() and np.isnan(ref[0]).any()
        assert i in (5, 6) or not np.isnan(ref[0]).all()  # (the FCs read every pixel)
        _assert_same(g, ref, f"output {i}")
    for i in (2, 3, 7, 8):  # every weight non-zero, or no weight: PyTorch's own NaN positions
        _assert_same(got[i], plain[i], f"output {i} vs PyTorch")
    assert (got[1] == 6.0).any() and (got[7] == 1.0).any()  # values clipped too


def test_nan_weights_stay_nan_through_every_activation():
    model = _branches()
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for layer in (model.pattern, model.pattern6, model.lanes):
            kept = torch.nonzero(layer.weight[:, :, 1, 1])  # centre taps: every pixel
            o, c = kept[rng.integers(len(kept))].tolist()
            layer.weight[o, c, 1, 1] = torch.nan
        model.pointwise.weight[5, 2] = torch.nan
        for layer in (model.block1x1, model.fc):
            o, c = torch.nonzero(layer.weight.flatten(1))[0].tolist()
            layer.weight.view(layer.weight.shape[0], -1)[o, c] = torch.nan
        model.dense_fc.weight[7, 3] = torch.nan
    x = rng.standard_normal(SHAPE).astype("float32") * 4
    got = tvm_sparse.compile(model, (x,))(x)
    with torch.no_grad():
        ref = [r.numpy() for r in model(torch.from_numpy(x))]
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert i >= 7 or np.isnan(r).any()  # one output channel of every layer is NaN
        _assert_same(g, r, f"output {i}")
    assert (got[1] == 6.0).any() and (got[6] == 6.0).any()  # values clipped too


# ---- float16 / bfloat16 / float64: refused before import, naming what and where -------------


def _small(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return pattern_prune_model_(model, kernel_keep=0.5).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_non_float32_module_is_refused_naming_the_parameter(dtype):
    name = str(dtype).removeprefix("torch.")
    x = torch.randn(1, 4, 6, 6, dtype=dtype)
    with pytest.raises(tvm_sparse.ModelLoadError) as err:
        tvm_sparse.compile(_small(dtype), (x,))
    assert f"parameter '0.weight' is {name}" in str(err.value)
    assert "model.float()" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_float32_input_is_refused_naming_the_input(dtype):
    x = torch.randn(1, 4, 6, 6).to(dtype)
    with pytest.raises(tvm_sparse.InputError, match=r"example input 0 is b?float16.*float32"):
        tvm_sparse.analyze(_small(), (x,))
    with pytest.raises(tvm_sparse.InputError, match=r"example input 0 is float16"):
        tvm_sparse.compile(_small(), (x.float().numpy().astype("float16"),))


def _onnx_conv(path, elem_type: int, cast_to: int | None = None) -> str:
    """A conv + relu ONNX file with weights of ``elem_type`` (and a Cast after the relu)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(dtype)
    init = helper.make_tensor("w", elem_type, weight.shape, weight.flatten().tolist())
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z" if cast_to else "out"], name="relu"),
    ]
    if cast_to:
        nodes.append(helper.make_node("Cast", ["z"], ["out"], name="to_half", to=cast_to))
    out_type = cast_to or elem_type
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", elem_type, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("out", out_type, [1, 8, 6, 6])],
        initializer=[init],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return str(path)


def test_float16_onnx_file_is_refused_naming_file_and_tensor(tmp_path):
    path = _onnx_conv(tmp_path / "half.onnx", TensorProto.FLOAT16)
    with pytest.raises(tvm_sparse.ModelLoadError) as err:
        tvm_sparse.compile(path)
    assert str(err.value).startswith(f"{path}: initializer 'w' is float16")
    assert "export the model in float32" in str(err.value) and err.value.path == path


def test_cast_to_float16_inside_an_onnx_graph_is_refused(tmp_path):
    path = _onnx_conv(tmp_path / "cast.onnx", TensorProto.FLOAT, cast_to=TensorProto.FLOAT16)
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"'to_half' \(Cast\) output is float16"):
        tvm_sparse.analyze(path)


def test_float32_onnx_file_still_compiles(tmp_path):
    path = _onnx_conv(tmp_path / "ok.onnx", TensorProto.FLOAT)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype("float32")
    proto = onnx.load(path)
    w = torch.from_numpy(numpy_helper.to_array(proto.graph.initializer[0]).copy())
    ref = torch.relu(F.conv2d(torch.from_numpy(x), w, padding=1)).numpy()
    _assert_same(tvm_sparse.compile(path)(x), ref, "float32 ONNX")


# ---- torch.export .pt2 files --------------------------------------------------------------


class Residual(nn.Module):
    """conv + BN + relu, then a pattern conv with a residual add and relu, then an FC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        y = torch.relu(self.conv2(y) + y)
        return self.fc(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = pattern_prune_model_(Residual(), kernel_keep=0.5).eval()
    x = torch.randn(2, 8, 12, 12)
    path = tmp_path_factory.mktemp("pt2") / "residual.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    with torch.no_grad():
        ref = model(x).numpy()
    return str(path), x.numpy(), ref


def test_pt2_file_compiles_with_its_own_input_shapes(pt2):
    path, x, ref = pt2
    cm = tvm_sparse.compile(path)  # no example inputs: the program's own
    assert [(s.shape, s.dtype) for s in cm.inputs] == [((2, 8, 12, 12), "float32")]
    assert [r.format for r in cm.layers if r.op == "conv2d"] == ["pattern", "pattern"]
    assert [r.name for r in cm.layers] == ["conv1", "conv2", "fc"]
    _assert_same(cm(x), ref, ".pt2")


def test_analyze_is_exported_and_reads_pt2(pt2):
    assert "analyze" in tvm_sparse.__all__
    from tvm_sparse.compiler import analyze

    assert tvm_sparse.analyze is analyze
    report = tvm_sparse.analyze(pt2[0])
    assert "conv2" in report and "pattern" in report and "bias+residual+relu" in report
    assert tvm_sparse.analyze(torch.export.load(pt2[0])) == report  # an ExportedProgram too


def test_pt2_example_inputs_must_match_the_program(pt2):
    path, x, _ = pt2
    with pytest.raises(tvm_sparse.InputError, match=r"input0 has shape \(2, 8, 12, 12\)"):
        tvm_sparse.analyze(path, (x[:1],))


@pytest.mark.parametrize("content", [b"not a zip" * 8, "zip"])
def test_corrupt_pt2_names_the_file(tmp_path, content):
    import zipfile

    path = tmp_path / "broken.pt2"
    if content == "zip":  # a zip archive, but not a torch.export one
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/data.txt", "nothing")
    else:
        path.write_bytes(content)
    with pytest.raises(tvm_sparse.ModelLoadError) as err:
        tvm_sparse.compile(str(path))
    assert str(err.value).startswith(f"{path}: ") and err.value.path == str(path)


def test_missing_pt2_names_the_file(tmp_path):
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"nope\.pt2: no such \.pt2 file"):
        tvm_sparse.analyze(str(tmp_path / "nope.pt2"))


def test_float16_pt2_is_refused_naming_the_weight(tmp_path):
    path = tmp_path / "half.pt2"
    x = torch.randn(1, 4, 6, 6, dtype=torch.float16)
    torch.export.save(torch.export.export(_small(torch.float16), (x,)), str(path))
    with pytest.raises(tvm_sparse.ModelLoadError, match=r"weight '0\.weight' is float16"):
        tvm_sparse.compile(str(path))
