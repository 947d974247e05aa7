"""``CompiledModel`` under threads, and ``export`` / ``load`` when files or destinations are bad.

Thread results are compared with sequential ones for exact equality (the same kernels on the
same inputs); the round trip is compared with PyTorch at rtol 1e-4 / atol 1e-4 x output scale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import tvm_sparse
from tvm_sparse.errors import ExportError, TvmSparseError
from tvm_sparse.testing import pattern_prune_model_
from tvm_sparse.toolchain import ToolchainError

SHAPE = (1, 8, 16, 16)
THREADS, CALLS = 4, 10


class _Small(nn.Module):
    """Three 3x3 convs (pattern-pruned) with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        return self.conv3(torch.relu(self.conv2(y) + y))


def _inputs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype("float32") for _ in range(n)]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return pattern_prune_model_(_Small(), kernel_keep=0.5).eval()


@pytest.fixture(scope="module")
def compiled(model):
    return tvm_sparse.compile(model, (_inputs(1)[0],))


@pytest.fixture(scope="module")
def exported(compiled, tmp_path_factory) -> str:
    return compiled.export(tmp_path_factory.mktemp("exported") / "m.so")


@pytest.fixture
def copy(exported, tmp_path):
    """A fresh copy of the exported library and its metadata; returns (library, metadata)."""

    def make(name: str = "m.so") -> tuple[str, dict]:
        lib = str(tmp_path / name)
        shutil.copyfile(exported, lib)
        shutil.copyfile(exported + ".json", lib + ".json")
        with open(lib + ".json") as f:
            return lib, json.load(f)

    return make


def _write_meta(lib: str, meta: dict) -> None:
    with open(lib + ".json", "w") as f:
        json.dump(meta, f)


def _in_threads(work, n: int = THREADS) -> list:
    """Run ``work(i)`` in ``n`` threads started together; their results, or re-raise."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _check_threads_match_sequential(cm) -> None:
    xs = _inputs(THREADS, seed=1)
    expected = [cm(x) for x in xs]
    got = _in_threads(lambda i: [cm(xs[i]) for _ in range(CALLS)])
    for i, outs in enumerate(got):
        for out in outs:
            np.testing.assert_array_equal(out, expected[i])


def test_threads_share_a_fresh_model(model):
    cm = tvm_sparse.compile(model, (_inputs(1)[0],))  # no VM yet: first calls race too
    _check_threads_match_sequential(cm)


def test_threads_share_a_loaded_model(exported):
    _check_threads_match_sequential(tvm_sparse.load(exported))


def test_benchmark_and_profile_from_threads(compiled):
    x = _inputs(1)[0]

    def work(i: int) -> tuple[float, int]:
        ms = compiled.benchmark(x, number=2, repeat=2)
        prof = compiled.profile(x, runs=2)
        compiled(x)
        return ms, len(prof.kernels)

    for ms, kernels in _in_threads(work):
        assert ms > 0 and kernels >= 3  # three convs (the residual add may be fused)


def test_round_trip_matches_pytorch(model, compiled, exported, tmp_path):
    x = _inputs(1, seed=2)[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    loaded = tvm_sparse.load(exported)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(loaded(x), ref, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_array_equal(loaded(x), compiled(x))
    assert loaded.report() == compiled.report()
    again = tvm_sparse.load(loaded.export(tmp_path / "again.so"))  # a loaded model is copied
    np.testing.assert_array_equal(again(x), compiled(x))


def test_export_records_the_library_and_leaves_no_temporary_files(exported):
    with open(exported + ".json") as f:
        meta = json.load(f)
    assert meta["format"] == "tvm-sparse/2"
    assert meta["library"]["size"] == os.path.getsize(exported)
    assert len(meta["library"]["sha256"]) == 64
    assert sorted(os.listdir(os.path.dirname(exported))) == ["m.so", "m.so.json"]


_LOAD_TRUNCATED = """
import json, sys
import tvm_sparse
for path in sys.argv[1:]:
    try:
        tvm_sparse.load(path)
        print(json.dumps(["loaded", path]))
    except tvm_sparse.ModelLoadError as err:
        print(json.dumps([str(err), err.field]))
"""


def test_truncated_library_is_an_error_not_a_crash(copy):
    lib, _ = copy("cut.so")
    legacy, meta = copy("legacy.so")
    meta["format"] = "tvm-sparse/1"  # written before the hash was recorded
    del meta["library"]
    _write_meta(legacy, meta)
    for path in (lib, legacy):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    res = subprocess.run(
        [sys.executable, "-c", _LOAD_TRUNCATED, lib, legacy],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr  # a SIGBUS would be -7
    (cut_msg, cut_field), (legacy_msg, _) = (json.loads(ln) for ln in res.stdout.splitlines())
    assert cut_msg.startswith(f"{lib}: ") and "truncated" in cut_msg
    assert cut_field == "library.size"
    assert legacy_msg.startswith(f"{legacy}: not a loadable library") and "truncated" in legacy_msg


def test_changed_library_fails_the_hash_check(copy):
    lib, _ = copy()
    with open(lib, "r+b") as f:
        f.seek(os.path.getsize(lib) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(tvm_sparse.ModelLoadError, match="SHA-256") as info:
        tvm_sparse.load(lib)
    assert info.value.field == "library.sha256" and str(lib) in str(info.value)


def test_legacy_metadata_without_a_hash_still_loads(copy):
    lib, meta = copy()
    meta["format"] = "tvm-sparse/1"
    del meta["library"]
    _write_meta(lib, meta)
    x = _inputs(1)[0]
    assert tvm_sparse.load(lib)(x).shape == SHAPE


def _set(path: list, value):
    def edit(meta: dict) -> None:
        node = meta
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


_DELETE = object()

CORRUPT = {
    "target-int": (_set(["target"], 123), "target", "expected a string, got 123"),
    "target-kind": (_set(["target"], '{"kind": "nope"}'), "target", "not a TVM target"),
    "shape-mismatch": (
        _set(["inputs", 0, "shape"], [1, 8, 32, 32]), "inputs", r"rejects input0 float32\[1, 8"
    ),
    "shape-rank": (_set(["inputs", 0, "shape"], [1, 8, 16]), "inputs", "rejects"),
    "shape-type": (_set(["inputs", 0, "shape"], "1x8"), "inputs[0].shape", "expected a list"),
    "dtype": (_set(["inputs", 0, "dtype"], "float99"), "inputs[0].dtype", "unknown dtype"),
    "two-inputs": (lambda m: m["inputs"].append(m["inputs"][0]), "inputs", "the library takes 1"),
    "no-layers": (_set(["layers"], _DELETE), "layers", "missing"),
    "no-name": (_set(["inputs", 0, "name"], _DELETE), "inputs[0].name", "missing"),
    "layer-density": (_set(["layers", 0, "density"], "x"), "layers[0].density", "expected"),
    "format": (_set(["format"], "tvm-sparse/9"), "format", "not one this version reads"),
    "hash-type": (_set(["library", "sha256"], 5), "library.sha256", "expected a string"),
    "no-library": (_set(["library"], _DELETE), "library", "missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_bad_metadata_names_the_file_and_the_field(copy, case):
    edit, field, message = CORRUPT[case]
    lib, meta = copy()
    edit(meta)
    _write_meta(lib, meta)
    with pytest.raises(tvm_sparse.ModelLoadError, match=message) as info:
        tvm_sparse.load(lib)
    assert str(info.value).startswith(f"{lib}.json: corrupt metadata: field {field!r}: ")
    assert info.value.field == field and info.value.path == lib + ".json"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_metadata_that_is_not_an_object(copy, text):
    lib, _ = copy()
    with open(lib + ".json", "w") as f:
        f.write(text)
    with pytest.raises(tvm_sparse.ModelLoadError, match="corrupt metadata") as info:
        tvm_sparse.load(lib)
    assert str(info.value).startswith(f"{lib}.json: ")


@pytest.fixture
def marker_cc(tmp_path, monkeypatch) -> str:
    """$CXX set to a compiler that only records that it ran; returns the record's path."""
    record = tmp_path / "cc-ran"
    script = tmp_path / "fake-cc"
    script.write_text(f"#!/bin/sh\ntouch {record}\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return str(record)


@pytest.mark.parametrize(
    "dest, why",
    [
        ("missing/m.so", "directory .*missing does not exist"),
        ("afile/m.so", "afile is a file, not a directory"),  # root may write anywhere else
        ("afile/sub/m.so", "afile is a file, not a directory"),
        (".", "is a directory"),
    ],
)
def test_bad_destination_fails_before_any_compiler(compiled, tmp_path, marker_cc, dest, why):
    (tmp_path / "afile").write_text("")
    path = str(tmp_path / dest)
    t0 = time.perf_counter()
    with pytest.raises(ExportError, match=why) as info:
        compiled.export(path)
    assert time.perf_counter() - t0 < 1.0
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, TvmSparseError)
    assert str(err).startswith(f"cannot export to {path}: ") and "\n" not in str(err)
    assert err.filename == path and err.errno is not None
    assert not os.path.exists(marker_cc)


def test_failing_linker_is_one_line_and_keeps_the_old_model(
    compiled, exported, tmp_path, marker_cc
):
    lib = str(tmp_path / "m.so")
    shutil.copyfile(exported, lib)
    shutil.copyfile(exported + ".json", lib + ".json")
    with pytest.raises(ToolchainError) as info:
        compiled.export(lib)
    msg = str(info.value)
    assert os.path.exists(marker_cc)
    assert msg.startswith(f"fake-cc failed to link {lib}: ") and "\n" not in msg
    assert isinstance(info.value, TvmSparseError)
    assert sorted(os.listdir(tmp_path)) == ["cc-ran", "fake-cc", "m.so", "m.so.json"]
    assert tvm_sparse.load(lib)(_inputs(1)[0]).shape == SHAPE  # the previous export is intact
