"""The ``tvm-sparse`` command line, run as a user would (a subprocess), on an ONNX file."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tvm_sparse
from schedules.max_pool2d import PoolGeometry, pool_unsupported
from tvm_sparse.benchmarking import onnx_bytes
from tvm_sparse.models import resnet18
from tvm_sparse.targets import resolve_target, vector_lanes
from tvm_sparse.testing import pattern_prune_model_


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tvm_sparse.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = pattern_prune_model_(resnet18(num_classes=10, width=8)).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    path = tmp_path_factory.mktemp("cli") / "r.onnx"
    path.write_bytes(onnx_bytes(model, (x,)))
    with torch.no_grad():
        return path, x, model(torch.from_numpy(x)).numpy()


def test_inspect_prints_the_per_layer_choice(model_file):
    path, _, _ = model_file
    res = _cli("inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(" pattern ") == 16
    assert "total:" in res.stdout and "x fewer" in res.stdout


def test_compile_writes_a_loadable_library(model_file, tmp_path):
    path, x, ref = model_file
    out = tmp_path / "r.so"
    res = _cli("compile", str(path), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.so.json").read_text())["inputs"][0]["shape"] == [1, 3, 32, 32]
    np.testing.assert_allclose(tvm_sparse.load(out)(x), ref, rtol=1e-4, atol=1e-4)


def test_profile_lists_every_kernel_of_the_model(model_file):
    path, _, _ = model_file
    res = _cli("profile", str(path), "--runs", "3")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:-1]}
    # 16 pattern-pruned 3x3 convs (several share a kernel), the dense 7x7 stem, the max-pool:
    # tvm-sparse's kernel where the 8-wide pooled map fills a vector (8 lanes), else TVM's.
    pattern_calls = sum(int(r[1]) for name, r in rows.items() if name.startswith("pattern_conv2d"))
    assert pattern_calls == 16
    assert any(name.startswith("dense_conv2d_8x3x7x7") for name in rows)
    pool = PoolGeometry(1, 8, 16, 16, kernel=(3, 3), padding=(1, 1, 1, 1))
    lanes = vector_lanes(resolve_target("x86"))
    assert ("max_pool2d_s2" if pool_unsupported(pool, lanes) is None else "max_pool2d") in rows
    shares = [float(r[3].rstrip("%")) for r in rows.values()]
    assert abs(sum(shares) - 100.0) < 1.0 and all(float(r[2]) >= 0 for r in rows.values())
    # each kernel writes a view into the planned storage (no allocation of its own)
    kernel_calls = sum(int(r[1]) for name, r in rows.items() if not name.startswith("vm."))
    assert int(rows["vm.builtin.alloc_tensor"][1]) == kernel_calls
    assert int(rows["vm.builtin.alloc_storage"][1]) < kernel_calls / 2
    assert res.stdout.splitlines()[-1].startswith("sum of kernels")


def test_bad_file_is_one_clear_line(tmp_path):
    res = _cli("inspect", str(tmp_path / "missing.onnx"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("tvm-sparse: error: ")
    assert "missing.onnx: no such ONNX file" in res.stderr


def test_builtin_filter_grouped_model_packs_groups_of_four():
    res = _cli("inspect", "builtin:resnet18-pattern-g4")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("groups of 4") == 16  # every pattern-pruned 3x3 conv
    res = _cli("inspect", "builtin:nope")
    assert res.returncode == 2 and "unknown built-in model 'builtin:nope'" in res.stderr


def _one_error_line(res) -> str:
    """The CLI failed as a user should see it: exit 2, one line on stderr, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvm-sparse: error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("inspect", "m.onnx", "--input-shape", "1,3,abc"), "--input-shape: expected positive"),
        (("tune", "m.onnx", "--trials", "0"), "--trials: expected a positive integer, got '0'"),
        (("tune", "m.onnx", "--trials", "-1"), "--trials: expected a positive integer"),
        (("inspect", "m.onnx", "--target", "cuda"), "target: unknown target 'cuda'"),
        (("inspect", "m.onnx", "--target", "llvm -mcpu=nope"), "does not know the CPU 'nope'"),
        (("demo", "--threads", "0"), "--threads: expected a positive integer"),
        (("compile", "m.onnx"), "required: -o/--output"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(model_file, args, expected):
    path, _, _ = model_file
    args = tuple(str(path) if a == "m.onnx" else a for a in args)
    assert expected in _one_error_line(_cli(*args))


def test_pt2_file_is_inspected_and_compiled_with_its_own_shapes(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
    net = pattern_prune_model_(net).eval()
    x = torch.randn(1, 8, 12, 12)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    res = _cli("inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert " pattern " in res.stdout
    out = tmp_path / "m.so"
    assert _cli("compile", str(path), "-o", str(out)).returncode == 0
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(tvm_sparse.load(out)(x.numpy()), ref, rtol=1e-4, atol=1e-4)


def test_unwritable_output_is_reported_before_compiling(model_file, tmp_path):
    path, _, _ = model_file
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "nodir" / "m.so", tmp_path / "afile" / "m.so"):
        line = _one_error_line(_cli("compile", str(path), "-o", str(out)))
        assert f"cannot export to {out}" in line and "[tvm-sparse]" not in line


def test_debug_shows_the_traceback(model_file):
    path, _, _ = model_file
    res = _cli("--debug", "inspect", str(path), "--target", "cuda")
    assert res.returncode == 2 and "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("tvm-sparse: error: target:")


def test_demo_shows_progress_and_no_third_party_warnings():
    res = _cli("demo", "--image", "32", "--width", "8", "--rounds", "2")
    assert res.returncode == 0, res.stderr
    assert "round 1/2" in res.stderr and "round 2/2" in res.stderr
    assert "Warning" not in res.stderr, res.stderr
    assert "| tvm-sparse |" in res.stdout and "AVX" in res.stdout  # the machine and its ISA


def test_sequence_demo_checks_numerics_and_shows_progress():
    """The GRU demo (block-pruned recurrent layers): it fails unless tvm-sparse matches PyTorch
    within the demo's tolerance, then times the three runtimes."""
    res = _cli("demo", "--model", "gru-bcr", "--rounds", "2")
    assert res.returncode == 0, res.stderr
    assert "round 2/2" in res.stderr
    assert "| ONNX Runtime |" in res.stdout and "max |tvm-sparse - PyTorch|" in res.stdout
