"""Every x86 ISA this host can run is compiled and run here: an AVX-512 host checks the AVX2
build too. The kernels follow the target's ISA, never the build host's."""

import numpy as np
import pytest
import torch
from kernel_utils import ISA_TARGETS

import tvm_sparse
from schedules.max_pool2d import PoolGeometry, pool_unsupported
from tvm_sparse.demo import build_demo_model
from tvm_sparse.targets import resolve_target, runs_here, vector_lanes

# Each ISA build whose code this host can execute (an AVX2-only host skips the AVX-512 one).
TOL = 1e-4  # float32 with a different summation order, relative to the largest output


@pytest.fixture(scope="module")
def grouped_resnet():
    """ResNet-18 (16 channels first, 32x32 input) pruned per group of 16 filters."""
    model = build_demo_model(width=16, num_classes=10, filter_group=16)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    with torch.no_grad():
        return model, x, model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module", params=ISA_TARGETS)
def isa_build(request, grouped_resnet):
    """(ISA name, the grouped ResNet compiled for it)."""
    model, x, _ = grouped_resnet
    return request.param, tvm_sparse.compile(model, (x,), target=request.param)


def _machine_code(cm) -> str:
    return "\n".join(m.inspect_source("asm") for m in cm.executable.mod.imports)


def test_isa_build_matches_pytorch_and_uses_only_its_registers(grouped_resnet, isa_build):
    _, x, ref = grouped_resnet
    isa, cm = isa_build
    got = cm(x)
    assert np.max(np.abs(got - ref)) <= TOL * max(1.0, float(np.abs(ref).max()))
    asm = _machine_code(cm)
    assert "ymm" in asm  # 256-bit vectors on both
    assert ("zmm" in asm) == (isa == "x86-avx512")


def test_kernel_choices_follow_the_target_lanes(isa_build):
    _, cm = isa_build
    lanes = vector_lanes(cm.target)
    in_lanes = [r for r in cm.layers if "filters computed in vector lanes" in r.reason]
    # Groups of 16 filters fill the lanes of both ISAs (16 AVX-512, 2 x 8 AVX2).
    assert in_lanes
    # The stride-2 max-pool kernel needs a map at least one vector wide: 16 -> 8 here.
    pool = PoolGeometry(1, 16, 16, 16, kernel=(3, 3), padding=(1, 1, 1, 1))
    takes_pool = pool_unsupported(pool, lanes) is None
    assert takes_pool == (lanes == 8)
    lib = cm.executable.mod.imports[0]
    assert lib.implements_function("max_pool2d_s2") == takes_pool


def test_avx512_build_is_not_run_on_a_host_without_it():
    # Code for an ISA the host lacks must be refused, not die of an illegal instruction.
    assert not runs_here(resolve_target("arm64"))
    host_has_avx512 = vector_lanes(resolve_target("x86")) == 16
    assert runs_here(resolve_target("x86-avx512")) == host_has_avx512
    assert runs_here(resolve_target("x86-avx2"))
