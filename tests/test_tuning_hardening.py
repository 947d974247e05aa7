"""Tuning on every ISA: each task's FLOPs are known to MetaSchedule (tvm-sparse's templates
carry their useful FLOPs; a kernel it cannot analyse is left out), so ``tune`` never stops in
its FLOP estimator; and ``tune``'s arguments are checked before any work starts."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import tvm
from kernel_utils import assert_matches_torch
from tvm import relax, tirx

import tvm_sparse
from schedules.bsr_matmul import BSRConvConfig, Conv1x1Geometry, bsr_conv1x1_template
from schedules.pattern_conv2d import Epilogue
from schedules.tunable import FLOPS_ATTR, realize, tunable_block
from tvm_sparse.demo import build_demo_model
from tvm_sparse.pipeline import lower, prepare
from tvm_sparse.targets import has_avx512, resolve_target
from tvm_sparse.testing import every_kernel_model
from tvm_sparse.tuning import UntunableKernelWarning, tuning_tasks
from tvm_sparse.tuning.flops import annotate_flops, estimate_flops, template_flops

TARGETS = {
    "avx2": {"kind": "llvm", "mcpu": "haswell", "num-cores": 2},
    "avx512": {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2},
    "arm64": "arm64",
}
NEEDS_AVX512 = pytest.mark.skipif(not has_avx512(resolve_target("x86")), reason="no AVX-512")


@pytest.fixture(scope="module")
def models() -> dict:
    """A pattern-pruned ResNet-18 (16 channels first) and a net with every kernel kind."""
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    return {
        "resnet18": (build_demo_model(width=16, num_classes=10), x),
        "every kernel": (every_kernel_model(), x),
    }


def _main(mod: tvm.IRModule) -> tirx.PrimFunc:
    return next(iter(mod.functions.values()))


# ------------------------------------------------------------------------------ FLOP estimates
@pytest.mark.parametrize("isa", TARGETS)
def test_every_task_has_the_flops_metaschedule_reads(models, isa) -> None:
    """Each task ``tune`` would search gets a finite FLOP count from MetaSchedule's estimator
    (the call its task scheduler makes); every template is a task and carries its layer's
    useful FLOPs (2 x the multiply-adds of the kept weights); final kernels are no tasks."""
    tgt = resolve_target(TARGETS[isa])
    for name, (net, x) in models.items():
        prepared, layers, _ = prepare(net, (x,), tgt, True)
        mod = lower(prepared, tgt)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UntunableKernelWarning)  # none is left out
            tasks = tuning_tasks(mod, tgt)
        flops = {t.task_name: estimate_flops(t.dispatched[0]) for t in tasks}
        assert all(math.isfinite(f) and f >= 1 for f in flops.values()), (name, flops)
        templates = [t for t in tasks if tunable_block(_main(t.dispatched[0])) is not None]
        assert len(templates) == sum(tunable_block(f) is not None for f in mod.functions.values())
        assert all(FLOPS_ATTR in _main(t.dispatched[0]).attrs for t in templates)
        on_templates = _template_flops(layers)
        assert sum(flops[t.task_name] * t.weight for t in templates) == on_templates, name
        final = [gv.name_hint for gv, f in mod.functions.items() if _is_final(f)]
        assert not set(final) & set(flops), (name, final)


def _template_flops(layers) -> int:
    """The useful FLOPs of the convs on tunable templates (every conv kernel is one)."""
    return sum(r.flops_kept for r in layers if r.op == "conv2d" and r.format != "tvm")


def _is_final(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and bool(func.attrs.get("tirx.is_scheduled", False))


def test_bcr_conv1x1_counts_only_the_kept_entries_of_each_block() -> None:
    geom, cfg = Conv1x1Geometry(1, 16, 6, 6, 32), BSRConvConfig(vector=8, vectors=2, shares=2)
    bsr = bsr_conv1x1_template(geom, (8, 1), 20, Epilogue(), cfg, "b", None, 16, 2)
    bcr = bsr_conv1x1_template(geom, (8, 4), 20, Epilogue(), cfg, "b", (4, 2), 16, 2)
    assert template_flops(bsr, []) == 2 * 36 * 20 * 8
    assert template_flops(bcr, []) == 2 * 36 * 20 * 4 * 2


def test_a_kernel_metaschedule_cannot_analyse_is_left_out_with_a_warning() -> None:
    """A kernel with a vector shuffle and no FLOP count would stop the whole tuning run in the
    task scheduler's estimator: it is no task (built at its default), and named."""
    mod = _call_module(_reverse_kernel())
    with pytest.raises(RuntimeError, match="Shuffle"):  # what tune_tasks would hit
        estimate_flops(tvm.IRModule({"main": mod["reverse"]}))
    tgt = resolve_target(TARGETS["avx2"])
    with pytest.warns(UntunableKernelWarning, match=r"reverse: left out of tuning .*Shuffle"):
        assert tuning_tasks(mod, tgt) == []


def _reverse_kernel() -> tirx.PrimFunc:
    """b = a reversed, as one 8-lane shuffle."""
    a, b = (tirx.decl_buffer((8,), "float32", n) for n in "ab")
    lanes = tirx.Ramp(tirx.IntImm("int32", 0), tirx.IntImm("int32", 1), 8)
    flip = [tirx.IntImm("int32", 7 - i) for i in range(8)]
    body = tirx.BufferStore(b, tirx.Shuffle([tirx.BufferLoad(a, [lanes])], flip), [lanes])
    return tirx.PrimFunc([a, b], body).with_attr("op_pattern", 8)


def _call_module(kernel: tirx.PrimFunc) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func(kernel, "reverse")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(gv, [x], relax.TensorType((8,), "float32")))
        bb.emit_func_output(out)
    return bb.get()


def test_realized_kernels_drop_the_flop_count(models) -> None:
    net, x = models["every kernel"]
    tgt = resolve_target(TARGETS["avx2"])
    mod = annotate_flops(lower(prepare(net, (x,), tgt, True)[0], tgt))
    annotated = [f for f in mod.functions.values() if tunable_block(f) is not None]
    assert annotated and all(FLOPS_ATTR in f.attrs for f in annotated)
    assert not any(FLOPS_ATTR in realize(f).attrs for f in annotated)


# ------------------------------------------------------------------------------ tune on each ISA
@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", pytest.param("avx512", marks=NEEDS_AVX512)])
def test_whole_pattern_pruned_resnet18_tunes_on_each_isa(isa, tmp_path) -> None:
    """Every template of a pattern-pruned ResNet-18 (pattern, stride-2 (whose AVX2 template,
    vector code with shuffles, stopped tuning), dense stem and 1x1 shortcut kernels) is tuned
    on a one-trial budget, then compiled with the records and checked against PyTorch."""
    net = build_demo_model(width=8, num_classes=10)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype("float32")
    tgt = resolve_target(TARGETS[isa])
    result = tvm_sparse.tune(net, (x,), tgt, trials=1, min_task_trials=1, work_dir=tmp_path,
                             tvm_kernels=False, verify=0, model_check=False,
                             progress=False)  # fmt: skip
    templates = [t for t in result.tasks if t.template]
    assert len(templates) >= 16 and all(t.trials >= 1 and t.best_ms > 0 for t in templates)
    # The table's GFLOP/s are of the useful FLOPs: the templates' sum is the layers' (but fc).
    layers = prepare(net, (x,), tgt, True)[1]
    assert sum(t.flops * t.weight for t in templates) == _template_flops(layers)
    assert "GFLOP/s" in result.table()
    assert_matches_torch(tvm_sparse.compile(net, (x,), tgt, tuning=str(tmp_path)), net, x)


def test_model_with_every_kernel_kind_tunes_and_matches_pytorch(models, tmp_path) -> None:
    """Pattern, lanes (on AVX-512), few-channel dense (the stem), BSR 1x1, depthwise, BSR /
    dense matmul kernels and TVM's own ones, each tuned on a one-trial budget for this host;
    the max-pool kernel is final."""
    net, x = models["every kernel"]
    result = tvm_sparse.tune(net, (x,), "x86", trials=1, min_task_trials=1, work_dir=tmp_path,
                             verify=0, model_check=False, progress=False)  # fmt: skip
    assert all(t.trials >= 1 for t in result.tasks)
    assert sum(t.template for t in result.tasks) >= 4
    assert any(t.name.startswith("dense_conv2d_16x3x7x7") and t.template for t in result.tasks)
    assert_matches_torch(tvm_sparse.compile(net, (x,), tuning=str(tmp_path)), net, x)


# ------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trials": 0}, "trials: expected a positive integer, got 0"),
        ({"trials": -1}, "trials: expected a positive integer, got -1"),
        ({"trials": 1.5}, "trials: expected a positive integer, got 1.5"),
        ({"trials": True}, "trials: expected a positive integer, got True"),
        ({"trials": "8"}, "trials: expected a positive integer, got '8'"),
        ({"min_task_trials": 0}, "min_task_trials: expected a positive integer, got 0"),
        ({"verify": -1}, "verify: expected an integer >= 0, got -1"),
        ({"verify": False}, "verify: expected an integer >= 0, got False"),
        ({"work_dir": 7}, "work_dir: expected a directory path"),
    ],
)
def test_bad_arguments_are_named_before_any_work(kwargs, message) -> None:
    _assert_rejected_fast(kwargs, message)


def test_work_dir_that_is_a_file_or_under_one_is_named(tmp_path) -> None:
    file = tmp_path / "records.json"
    file.write_text("{}")
    _assert_rejected_fast({"work_dir": file}, f"work_dir: '{file}' exists and is not a directory")
    under = file / "tuned"
    _assert_rejected_fast({"work_dir": str(under)}, f"work_dir: cannot create or write '{under}'")


def _assert_rejected_fast(kwargs: dict, message: str) -> None:
    """``tune`` raises InputError with ``message`` at once: the model (none here) is never
    imported, nor anything compiled."""
    t0 = time.perf_counter()
    with pytest.raises(tvm_sparse.InputError) as err:
        tvm_sparse.tune(None, **kwargs)
    assert str(err.value).startswith(message), str(err.value)
    assert time.perf_counter() - t0 < 1.0
