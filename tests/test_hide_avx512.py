"""`tvm_sparse.hide_avx512`: a preloaded library that hides AVX-512 from CPUID, so that ONNX
Runtime runs its AVX2 kernels beside an AVX2 build. Each check runs a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tvm_sparse import hide_avx512

pytestmark = pytest.mark.skipif(
    hide_avx512.unavailable() is not None, reason=f"{hide_avx512.unavailable()}"
)

# numpy's names of what the library hides (x86-64-v4 is the AVX-512 level); every other
# feature must read as it does bare.
HIDDEN_PREFIXES = ("AVX512", "AVXVNNI", "X86_V4")


def _python(code: str, env: dict | None = None, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hidden_env(tmp_path_factory) -> dict:
    return hide_avx512.environment(os.environ, tmp_path_factory.mktemp("cache"))


FEATURES = """
    import json
    from numpy._core._multiarray_umath import __cpu_features__ as f
    from tvm_sparse import hide_avx512
    print(json.dumps({"features": f, "answered": hide_avx512.answered()}))
"""


def test_cpuid_reports_no_avx512_and_everything_else_unchanged(hidden_env):
    bare = json.loads(_python(FEATURES).stdout)
    hidden = json.loads(_python(FEATURES, hidden_env).stdout)
    assert bare["answered"] is None
    assert hidden["answered"] > 0
    f_bare, f_hidden = bare["features"], hidden["features"]
    assert f_hidden["AVX2"] and f_hidden["FMA3"] and f_hidden["AVX"]
    for name, value in f_bare.items():
        expect = False if name.startswith(HIDDEN_PREFIXES) else value
        assert f_hidden[name] == expect, name
    if hide_avx512.host_has_avx512():
        assert f_bare["AVX512F"]


def test_library_is_built_once_per_source(tmp_path):
    first = hide_avx512.library(tmp_path)
    assert hide_avx512.library(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_environment_prepends_the_library_once(hidden_env, tmp_path):
    """Another build of the library (another cache) is replaced, other preloads are kept."""
    other_build = hidden_env["LD_PRELOAD"].split()[0]
    env = {**hidden_env, "LD_PRELOAD": f"{other_build} /x/other.so"}
    again = hide_avx512.environment(env, tmp_path)
    assert again["LD_PRELOAD"].split() == [str(hide_avx512.library(tmp_path)), "/x/other.so"]


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")])
def test_other_segfaults_still_reach_the_process(hidden_env, flags):
    """A real fault is not taken for a CPUID: the default action, or a handler installed after
    the library (Python's faulthandler), still gets it."""
    out = _python("import ctypes; ctypes.string_at(0)", hidden_env, *flags)
    assert out.returncode == -11
    if flags:
        assert "Fatal Python error: Segmentation fault" in out.stderr


def test_compiled_model_and_onnxruntime_agree_with_torch_under_the_mask(hidden_env):
    """The benchmark's setting: an ``x86-avx2`` build and ONNX Runtime, both with AVX-512
    hidden, against PyTorch (rel 1e-4)."""
    code = """
        import numpy as np, torch
        import tvm_sparse
        from tvm_sparse import hide_avx512
        from tvm_sparse.benchmarking import onnx_bytes, ort_runner
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 48, 1),
            torch.nn.Flatten(), torch.nn.Linear(48 * 10 * 10, 40),
        ).eval()
        x = np.random.default_rng(0).standard_normal((1, 8, 10, 10)).astype("float32")
        want = net(torch.from_numpy(x)).detach().numpy()
        ort_out = ort_runner(onnx_bytes(net, (x,)), (x,), 2)()[0]
        cm = tvm_sparse.compile(net, (x,), target="x86-avx2")
        tvm_out = np.asarray(cm(x))
        scale = np.abs(want).max()
        print(hide_avx512.answered(), np.abs(ort_out - want).max() / scale,
              np.abs(tvm_out - want).max() / scale)
    """
    out = _python(code, hidden_env)
    assert out.returncode == 0, out.stderr[-2000:]
    answered, ort_err, tvm_err = out.stdout.split()[-3:]
    assert int(answered) > 0
    assert float(ort_err) < 1e-4 and float(tvm_err) < 1e-4


def test_isa_target_avx2_reexecutes_with_avx512_hidden(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(
        textwrap.dedent("""
            import os
            from tvm_sparse.benchmarking import PINNED_AVX2, isa_target, ort_isa
            print(isa_target("avx2"))
            print(ort_isa())
            print(all(os.environ[k] == v for k, v in PINNED_AVX2.items()))
        """)
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_SPARSE_HIDE_AVX512"}
    out = subprocess.run(
        [sys.executable, str(script)], env={**env, "TVM_SPARSE_CACHE": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    target, isa, pinned = out.stdout.strip().splitlines()[-3:]
    assert target == "x86-avx2" and pinned == "True"
    if hide_avx512.host_has_avx512():
        assert isa.startswith("AVX2 (AVX-512 hidden from CPUID")
    else:
        assert isa == "the host's best ISA (no AVX-512 here)"
