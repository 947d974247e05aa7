"""MetaSchedule tuning on tiny budgets: the template space, tuned numerics vs PyTorch, resume
after a killed run, corrupt records, records in a fresh process, the RPC runner on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import tvm_sparse
from schedules.pattern_conv2d import (
    ConvGeometry,
    Epilogue,
    PatternConvConfig,
    config_knobs,
    pattern_conv2d_primfunc,
    pattern_conv2d_template,
)
from schedules.tunable import RealizeTunableKernels, knob_space, realize, template, tunable_block
from tvm_sparse.kernel_bounds import applied_configs
from tvm_sparse.pipeline import lower, prepare
from tvm_sparse.rpc import RPCError
from tvm_sparse.targets import resolve_target, vector_lanes
from tvm_sparse.tuning.apply import apply_records, lowered_with_records
from tvm_sparse.tuning.model_check_store import (
    BUILDS,
    KernelChoice,
    ModelCheck,
    load_check,
    store_check,
    workload_key,
)
from tvm_sparse.tuning.records import (
    RECORDS,
    CorruptRecordWarning,
    UnmatchedRecordsWarning,
    open_database,
)
from tvm_sparse.tuning.search import space_for
from tvm_sparse.tuning.verify import open_verified

ROOT = Path(__file__).resolve().parents[1]
RTOL = ATOL = 1e-4  # float32 both sides; only the summation order differs
# SLOW_TUNING: the two tests marked ``slow`` here (~80 s of the suite) repeat a path a default
# test covers: the lanes kernel's template is tuned and applied in ``test_tuning_hardening``'s
# every-kernel model (AVX-512 hosts) and by ``benchmarks/bench_tuning.py``; RPC tuning runs
# against the emulated arm64 device (``test_rpc_arm64``).


def _net() -> tuple[torch.nn.Module, np.ndarray]:
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
    )  # fmt: skip
    net = pattern_prune_model_(net, kernel_keep=0.5).eval()
    # One filter at a time: the first conv's kernel (32-wide rows, 2 vectors of 16) takes the
    # lane-segmented layout, the second's (8 wide at stride 1) the phase layout, so both are
    # tuned and applied.
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 32)).astype("float32")
    return net, x


def _check(cm, net, x) -> None:
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cm(x), ref, rtol=RTOL, atol=ATOL)


GEOM = ConvGeometry(1, 8, 12, 12, 16, (3, 3), (1, 1), (1, 1, 1, 1))
CFG = PatternConvConfig(rows=3, vector=8)


def _template():
    return pattern_conv2d_template(
        GEOM, ((0, 1, 4, 5), (1, 4, 7, 8)), 40, 4, Epilogue(bias=True), CFG, "k", 1, 16
    )


# ------------------------------------------------------------------------------ the search space
def test_template_default_is_the_hand_kernel() -> None:
    """Before: the template; Expected: the hand kernel at the default config (same TIR)."""
    expected = pattern_conv2d_primfunc(
        GEOM, ((0, 1, 4, 5), (1, 4, 7, 8)), 40, 4, Epilogue(bias=True), CFG, "k", 1
    )
    tvm.ir.assert_structural_equal(realize(_template()).without_attr("tvm_sparse.params"), expected)


def test_rule_samples_every_knob_default_first() -> None:
    func = _template().with_attr("global_symbol", "main")
    space = knob_space(func)
    assert {k: v[0] for k, v in space.items()} == config_knobs(CFG)
    assert space["vector"] == [8, 16] and space["filters"] == [1]  # sparse: one filter per job
    target = resolve_target("x86")
    ctx = ms.TuneContext(
        mod=tvm.IRModule({"main": func}), target=target, space_generator=space_for(func, target),
        search_strategy=ms.search_strategy.ReplayTrace(), task_name="t",
    )  # fmt: skip
    (sch,) = ctx.generate_design_space()
    sampled = [i for i in sch.trace.insts if i.kind.name == "SampleCategorical"]
    assert len(sampled) == len(space)
    # A record's trace replayed on the template gives a kernel with the sampled knobs.
    replay = s_tir.Schedule(tvm.IRModule({"main": func}))
    trace = sch.trace
    for inst in sampled:  # every knob at its default but rows = 5 (candidates 3, 1, 2, 4, 5...)
        pick = list(inst.attrs[0]).index(5) if inst.attrs[0][0] == 3 else 0
        trace = trace.with_decision(inst, pick, True)
    trace.apply_to_schedule(replay, remove_postproc=True)
    tuned = realize(replay.mod["main"])
    expected = pattern_conv2d_primfunc(
        GEOM, ((0, 1, 4, 5), (1, 4, 7, 8)), 40, 4, Epilogue(bias=True),
        PatternConvConfig(**{**CFG.__dict__, "rows": 5}), "k", 1,
    )  # fmt: skip
    assert tunable_block(tuned) is None
    assert str(tuned.body) == str(expected.body)


# ------------------------------------------------------------------------------ tune and compile
@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory) -> Path:
    net, x = _net()
    work = tmp_path_factory.mktemp("tuned")
    assert sorted(c.segmented for c in applied_configs(net, x, None).values()) == [False, True]
    result = tvm_sparse.tune(net, (x,), trials=12, work_dir=str(work), progress=False)
    assert [t.template for t in result.tasks].count(True) == 2
    check = result.model_check  # the tuned kernels were then compared inside the model
    assert check is not None and check.kept in BUILDS and sorted(check.ms) == sorted(BUILDS)
    assert all(v > 0 for v in check.ms.values()) and check.workloads
    assert {k.name for k in check.kernels} == set(check.workloads.values())
    assert load_check(str(work), prepare(net, (x,), resolve_target("x86"), True)[0],
                      resolve_target("x86")) is not None  # fmt: skip
    for task in result.tasks:
        if task.template:
            # The default is measured first, so the best record can only equal or beat it.
            assert task.default_ms and task.best_ms and task.best_ms <= task.default_ms
            assert task.trials >= 2
            # Its best records and the default were re-timed; one of them was kept.
            assert task.verified in ("default", "tuned") and task.verified_ms > 0
    return work


def test_tuned_model_matches_pytorch(tuned_dir) -> None:
    net, x = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRecordsWarning)  # every kernel has its records
        _check(tvm_sparse.compile(net, (x,), tuning=str(tuned_dir)), net, x)
    curve = [json.loads(line) for line in (tuned_dir / "curve.jsonl").read_text().splitlines()]
    assert curve and all(e["best_ms"] is None or e["best_ms"] > 0 for e in curve)


def test_a_lucky_measurement_is_re_timed_and_loses(tmp_path) -> None:
    """A record claiming 1 ns for a slow candidate (1-row tiles, narrow vectors, 1 vector per
    tile) tops MetaSchedule's database; the verification pass re-times it against the default
    and the other best records and keeps a faster one, which compile then applies."""
    net, x = _net()
    work = str(tmp_path)
    tvm_sparse.tune(net, (x,), trials=12, work_dir=work, progress=False, verify=0)
    db = open_database(work)
    rec, trace = _slow_trace(db)
    db.commit_tuning_record(
        ms.database.TuningRecord(trace, rec.workload, [1e-9], rec.target, rec.args_info)
    )
    assert str(db.get_top_k(rec.workload, 1)[0].trace) == str(trace)  # it would be applied

    result = tvm_sparse.tune(net, (x,), trials=12, work_dir=work, progress=False, verify=3)
    assert all(t.verified for t in result.tasks if t.template)
    verified = open_verified(work)
    winner = verified.get_top_k(verified.commit_workload(rec.workload.mod), 1)[0]
    assert str(winner.trace) != str(trace)
    _check(tvm_sparse.compile(net, (x,), tuning=work), net, x)


def _first(mod):
    return next(iter(mod.functions.values()))


def _slow_trace(db) -> tuple[ms.database.TuningRecord, s_tir.Trace]:
    """A template task's record, and its trace with slow knobs (1-row tiles, narrow vectors,
    1 vector per tile): a schedule no verification would pick."""
    rec = next(r for r in db.get_all_tuning_records() if tunable_block(_first(r.workload.mod)))
    space = knob_space(_first(rec.workload.mod))
    slow = {"rows": 1, "vector": min(space["vector"]), "col_vectors": 1, "shifted": 1}
    trace = rec.trace
    sampled = [i for i in trace.insts if i.kind.name == "SampleCategorical"]
    for inst, (name, values) in zip(sampled, space.items(), strict=True):
        if name in slow:
            trace = trace.with_decision(inst, values.index(slow[name]), True)
    return rec, trace


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a tuning work directory (records, verified records, in-model check)."""
    shutil.copytree(src, dst)
    return dst


def test_in_model_check_decides_which_kernels_compile_tunes(tuned_dir, tmp_path) -> None:
    """A stored in-model check puts the kernels it found slower in the model back at their
    default schedule; it is ignored once the records it was made from change."""
    work = str(_copy(tuned_dir, tmp_path / "copy"))
    net, x = _net()
    tgt = resolve_target("x86")
    prepared, _, _ = prepare(net, (x,), tgt, True)
    verified = open_verified(work)
    rec, slow = _slow_trace(open_database(work))
    verified.commit_tuning_record(  # the slow schedule becomes this workload's winner
        ms.database.TuningRecord(slow, verified.commit_workload(rec.workload.mod), [1e-9],
                                 rec.target, rec.args_info)
    )  # fmt: skip
    default = lower(RealizeTunableKernels(prepared), tgt)
    key = workload_key(_first(rec.workload.mod))
    name = next(
        gv.name_hint
        for gv, f in lowered_with_records(prepared, tgt, work)[0].functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and workload_key(f) == key
    )

    def kernel(check: ModelCheck | None) -> bool:
        """Whether compile builds that kernel at its default schedule under ``check``."""
        if check is not None:
            store_check(work, prepared, tgt, check)
        mod, loaded = apply_records(prepared, tgt, work)
        assert (loaded is None) == (check is None)
        return tvm_ffi.structural_equal(mod[name], default[name])

    assert not kernel(None)  # no check for these records: the slow winner applies
    wins = [KernelChoice(name, 1, default_ms=1.0, tuned_ms=2.0)]  # the default won in the model
    assert kernel(ModelCheck("mixed", kernels=wins, workloads={key: name}))
    assert not kernel(ModelCheck("tuned", kernels=wins, workloads={key: name}))
    assert kernel(ModelCheck("default", workloads={key: name}))
    _check(tvm_sparse.compile(net, (x,), tuning=work), net, x)

    verified.commit_tuning_record(rec)  # the records change: the stored check is stale
    assert load_check(work, prepared, tgt) is None
    mod, loaded = apply_records(prepared, tgt, work)
    assert loaded is None and not tvm_ffi.structural_equal(mod[name], default[name])


def test_records_load_in_a_fresh_process(tuned_dir) -> None:
    code = f"""
        import numpy as np, torch, tvm_sparse
        from tests.test_tuning import _net, _check
        net, x = _net()
        _check(tvm_sparse.compile(net, (x,), tuning={str(tuned_dir)!r}), net, x)
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_corrupt_record_line_is_skipped_with_a_warning(tuned_dir, tmp_path) -> None:
    work = tmp_path / "copy"
    work.mkdir()
    for f in tuned_dir.iterdir():
        if f.is_file():
            (work / f.name).write_bytes(f.read_bytes())
    lines = (work / RECORDS).read_text().splitlines()
    (work / RECORDS).write_text("\n".join([lines[0], "{not json", *lines[1:], '[0, ["trunc'])
                                + "\n")  # fmt: skip
    with pytest.warns(CorruptRecordWarning, match=r"skipped 2 unreadable tuning record"):
        database = open_database(str(work))
    assert len(database) == len(lines)
    net, x = _net()
    _check(tvm_sparse.compile(net, (x,), tuning=str(work)), net, x)


def test_records_of_another_model_are_named_not_silently_ignored(tuned_dir) -> None:
    """A model whose first layer is the tuned one and whose second is new: compile applies the
    first layer's records and warns that the second kernel has none."""
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(0)  # the first conv's weights and pruning are _net()'s
    net = torch.nn.Sequential(  # (stride 2: the second conv does not read the first's
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),  # output in its staged layout)
        torch.nn.Conv2d(16, 8, 3, padding=1, stride=2), torch.nn.ReLU(),
    )  # fmt: skip
    net = pattern_prune_model_(net, kernel_keep=0.5).eval()
    x = _net()[1]
    with pytest.warns(UnmatchedRecordsWarning, match=r"1 of 2 tvm-sparse kernels have no tuning"):
        cm = tvm_sparse.compile(net, (x,), tuning=str(tuned_dir))
    _check(cm, net, x)


def test_staged_pair_is_tuned_and_applied(tmp_path) -> None:
    """conv -> relu -> conv, the first writing the second's staged input layout: both staged
    kernels are tasks, tuned within their layouts, and applied by compile."""
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
    )  # fmt: skip
    net = pattern_prune_model_(net, kernel_keep=0.5).eval()
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 64)).astype("float32")  # 4 vectors
    result = tvm_sparse.tune(net, (x,), trials=8, work_dir=str(tmp_path), progress=False,
                             verify=0, model_check=False)  # fmt: skip
    staged = [t for t in result.tasks if t.template and "_staged" in t.name]
    assert len(staged) == 2 and all(t.trials >= 2 for t in staged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRecordsWarning)  # both kernels have records
        _check(tvm_sparse.compile(net, (x,), tuning=str(tmp_path)), net, x)


@pytest.mark.slow  # see SLOW_TUNING
@pytest.mark.skipif(
    vector_lanes(resolve_target("x86")) != 16, reason="tuned at 16 lanes (an AVX-512 host) only"
)
def test_filters_in_lanes_kernel_is_tuned_and_applied(tmp_path) -> None:
    """Connectivity and patterns shared by groups of 16 filters: the filters-in-lanes kernel
    is a task (its template analysed by MetaSchedule), tuned, and applied by compile."""
    from tvm_sparse.testing import pattern_prune_model_

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU())
    net = pattern_prune_model_(net, kernel_keep=0.5, filter_group=16).eval()
    x = np.random.default_rng(2).standard_normal((1, 8, 12, 20)).astype("float32")
    result = tvm_sparse.tune(net, (x,), trials=8, work_dir=str(tmp_path), progress=False,
                             verify=0, model_check=False)  # fmt: skip
    (task,) = [t for t in result.tasks if t.template]
    assert task.trials >= 2 and task.best_ms <= task.default_ms
    cm = tvm_sparse.compile(net, (x,), tuning=str(tmp_path))
    assert "in vector lanes" in cm.layers[0].reason
    _check(cm, net, x)


def test_missing_records_are_a_clear_error(tmp_path) -> None:
    net, x = _net()
    with pytest.raises(tvm_sparse.InputError, match=r"tuning: .*nowhere does not exist"):
        tvm_sparse.compile(net, (x,), tuning=str(tmp_path / "nowhere"))


def test_killed_run_keeps_its_records_and_resumes(tmp_path) -> None:
    """SIGKILL a tuning process mid-run: every finished record survives, and the next run
    only adds what the budget still lacks."""
    code = f"""
        import tvm_sparse
        from tests.test_tuning import _net
        net, x = _net()
        tvm_sparse.tune(net, (x,), trials=30, work_dir={str(tmp_path)!r}, progress=False)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    records = tmp_path / RECORDS
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and len(records.read_text().splitlines()) >= 6:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "tuning finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [ln for ln in records.read_text().splitlines() if ln.strip()]
    assert len(before) >= 6

    net, x = _net()
    result = tvm_sparse.tune(net, (x,), trials=30, work_dir=str(tmp_path), progress=False)
    after = [ln for ln in records.read_text().splitlines() if ln.strip()]
    kept = set(after)
    assert all(line in kept for line in before[:-1])  # the last line may have been torn
    budget = sum(max(8, t.trials) for t in result.tasks)
    assert len(after) <= budget + 16  # no task re-ran its finished trials from zero
    per_workload = Counter(
        tvm_ffi.structural_hash(rec.workload.mod)
        for rec in open_database(str(tmp_path)).get_all_tuning_records()
    )
    assert sorted(per_workload.values()) == sorted(t.trials for t in result.tasks if t.trials)
    _check(tvm_sparse.compile(net, (x,), tuning=str(tmp_path)), net, x)


# ------------------------------------------------------------------------------ RPC runner
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_device():
    """A TVM RPC tracker and one x86 server registered under key "loopback"."""
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                          "--port", str(port), "--port-end", str(port + 1)],
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    time.sleep(2)
    server_port = _free_port()
    procs.append(
        subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                          "--port", str(server_port), "--port-end", str(server_port + 1),
                          "--tracker", f"127.0.0.1:{port}",
                          "--key", "loopback"],
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the server has registered its key
        try:
            if "loopback" in str(tvm.rpc.connect_tracker("127.0.0.1", port).summary()):
                break
        except (RuntimeError, OSError, tvm.error.TVMError):
            pass
        time.sleep(0.5)
    yield f"127.0.0.1:{port}", procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.slow  # see SLOW_TUNING
def test_tuning_through_an_rpc_tracker(loopback_device, tmp_path) -> None:
    tracker, _procs = loopback_device
    net, x = _net()
    result = tvm_sparse.tune(net, (x,), trials=4, work_dir=str(tmp_path), rpc=tracker,
                             key="loopback", tvm_kernels=False, min_task_trials=2,
                             progress=False)  # fmt: skip
    assert all(t.best_ms and t.trials >= 2 for t in result.tasks)
    # The in-model check ran on the device: whole builds only (no per-kernel instrument there).
    check = result.model_check
    assert check is not None and sorted(check.ms) == ["default", "tuned"] and not check.kernels
    assert check.kept in check.ms and all(v > 0 for v in check.ms.values())
    _check(tvm_sparse.compile(net, (x,), tuning=str(tmp_path)), net, x)


def test_tuning_with_no_device_under_the_key_fails_fast(loopback_device, tmp_path) -> None:
    tracker, _procs = loopback_device
    net, x = _net()
    t0 = time.monotonic()
    with pytest.raises(RPCError, match="phone"):
        tvm_sparse.tune(net, (x,), trials=4, work_dir=str(tmp_path), rpc=tracker, key="phone",
                        progress=False)  # fmt: skip
    assert time.monotonic() - t0 < 30


def test_bsr_conv1x1_template_default_is_the_hand_kernel() -> None:
    from schedules.bsr_matmul import (
        BSRConvConfig,
        Conv1x1Geometry,
        bsr_conv1x1_primfunc,
        bsr_conv1x1_template,
    )

    geom, cfg = Conv1x1Geometry(1, 16, 6, 6, 32), BSRConvConfig(vector=8, vectors=2, shares=2)
    func = bsr_conv1x1_template(geom, (8, 1), 20, Epilogue(), cfg, "b", None, 16, 2)
    expected = bsr_conv1x1_primfunc(geom, (8, 1), 20, Epilogue(), cfg, "b")
    tvm.ir.assert_structural_equal(realize(func).without_attr("tvm_sparse.params"), expected)
    assert knob_space(func) == {"vector": [8, 16], "vectors": [2, 1, 3, 4, 5, 6, 7, 8],
                                "shares": [2, 1], "parallel": [1, 0]}  # fmt: skip
    serial = BSRConvConfig(vector=8, vectors=2, shares=2, parallel=False)
    knobs = {"vector": 8, "vectors": 2, "shares": 2, "parallel": 0}
    tvm.ir.assert_structural_equal(
        bsr_conv1x1_template(geom, (8, 1), 20, Epilogue(), serial, "b", None, 16, 2),
        template(bsr_conv1x1_primfunc(geom, (8, 1), 20, Epilogue(), serial, "b"),
                 "bsr_conv1x1", json.loads(str(func.attrs["tvm_sparse.params"])), knobs),
    )  # fmt: skip
