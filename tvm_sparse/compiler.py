"""``tvm_sparse.compile`` / ``analyze``: import, rewrite sparse ops, build with TVM, wrap for use.

The steps are in ``pipeline.py``; tuning records are applied by ``tuning/apply.py``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from schedules.tunable import RealizeTunableKernels

from .compiled_model import CompiledModel
from .errors import InputError
from .pipeline import build_executable, lower, prepare, progress
from .report import format_report
from .targets import resolve_target
from .tuning.apply import apply_records
from .validation import check_bool

__all__ = ["analyze", "compile"]


def analyze(model: Any, example_inputs: Any = None, target: Any = "x86") -> str:
    """The compile report without building: what each layer would become, and why."""
    _mod, records, _inputs = prepare(model, example_inputs, resolve_target(target), sparse=True)
    return format_report(records)


def compile(  # noqa: A001 (the public name users expect)
    model: Any,
    example_inputs: Any = None,
    target: Any = "x86",
    *,
    sparse: bool = True,
    tuning: str | None = None,
    verbose: bool = False,
) -> CompiledModel:
    """Compile a pruned model (``torch.nn.Module``, ONNX path or ``ModelProto``) for ``target``.

    ``sparse=False`` compiles every conv dense (the baseline the sparse build is compared with);
    ``tuning`` is a ``tune()`` work directory whose best records replace the default schedules.
    """
    t0 = time.perf_counter()
    _check_options(sparse=sparse, verbose=verbose, tuning=tuning)
    tgt = resolve_target(target)
    mod, records, inputs = prepare(model, example_inputs, tgt, sparse, verbose)
    if tuning is not None:
        mod, check = apply_records(mod, tgt, tuning)
        kept = f" (in-model check: {check.kept} build kept)" if check else ""
        progress(f"applied the tuning records of {tuning}{kept}", verbose)
    else:
        mod = lower(RealizeTunableKernels(mod), tgt)
    executable = build_executable(mod, tgt)
    progress(
        f"built for {tgt.attrs.get('mtriple') or tgt.kind.name} in {time.perf_counter() - t0:.1f}s",
        verbose,
    )
    return CompiledModel(
        executable=executable,
        inputs=inputs,
        layers=records,
        target=tgt,
        compile_seconds=time.perf_counter() - t0,
    )


def _check_options(*, sparse: Any, verbose: Any, tuning: Any) -> None:
    """``compile``'s options, checked before any work (errors name the argument)."""
    check_bool("sparse", sparse)
    check_bool("verbose", verbose)
    if tuning is None:
        return
    if not isinstance(tuning, str | os.PathLike):
        raise InputError(f"tuning: expected a tune() work directory path, got {tuning!r}")
    if not os.path.isdir(tuning):
        what = "is not a directory" if os.path.exists(tuning) else "does not exist"
        raise InputError(f"tuning: {os.fspath(tuning)} {what} (a tune() work_dir is expected)")
