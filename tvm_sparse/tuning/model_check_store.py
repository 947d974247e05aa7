"""The in-model check's decision (``ModelCheck``: which tuned kernels compile keeps) and its file.

The decision is stored in ``work_dir/model_check.json``, per model (a hash of the module after
tvm-sparse's passes) with a fingerprint of the records it was made from: ``compile(...,
tuning=work_dir)`` applies it while the records are unchanged. ``model_check.py`` makes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import tvm
import tvm_ffi
from tvm import tirx
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from .records import RECORDS
from .verify import VERIFIED

MODEL_CHECK = "model_check.json"
BUILDS = ("default", "tuned", "mixed")


@dataclass
class KernelChoice:
    """One tuned workload in the model: its kernels' time per run, default and tuned."""

    name: str  # the first kernel of the workload
    kernels: int  # kernels of the model sharing the workload
    default_ms: float
    tuned_ms: float

    @property
    def kept(self) -> str:
        return "tuned" if self.tuned_ms < self.default_ms else "default"


@dataclass
class ModelCheck:
    """The builds compared in the model (median ms per run) and the one kept."""

    kept: str  # one of BUILDS
    ms: dict[str, float] = field(default_factory=dict)
    kernels: list[KernelChoice] = field(default_factory=list)
    workloads: dict[str, str] = field(default_factory=dict)  # workload key -> kernel name
    note: str = ""

    def at_default(self) -> list[str]:
        """The tuned workloads (their first kernel's name) that compile builds at default."""
        if self.kept != "mixed":
            return list(self.workloads.values()) if self.kept == "default" else []
        return [k.name for k in self.kernels if k.kept == "default"]

    def reverted(self) -> list[str]:
        """The keys (``workload_key``) of those workloads."""
        names = set(self.at_default())
        return [key for key, name in self.workloads.items() if name in names]

    def table(self) -> str:
        lines = [f"in-model check: {self.note}"] if self.note else []
        if self.ms:
            timed = ", ".join(f"{b} {self.ms[b]:.3f} ms" for b in BUILDS if b in self.ms)
            lines.append(f"in-model check: {timed} per run; kept {self.kept}")
        for k in self.kernels:
            lines.append(f"  {k.name[:40]:40s} x{k.kernels}  default {k.default_ms:8.3f} ms  "
                         f"tuned {k.tuned_ms:8.3f} ms  -> {k.kept}")  # fmt: skip
        return "\n".join(lines)


def model_key(prepared: tvm.IRModule) -> str:
    """The model a check belongs to: the module after tvm-sparse's passes (weights included)."""
    return f"{tvm_ffi.structural_hash(prepared):x}"


def workload_key(func: tirx.PrimFunc) -> str:
    """A kernel's workload, as MetaSchedule's databases identify it."""
    return f"{tvm_ffi.structural_hash(_normalize_mod(func)):x}"


def records_fingerprint(work_dir: str) -> str:
    """A digest of the records a check was made from (all records, then the verified ones)."""
    digest = hashlib.sha256()
    for path in (os.path.join(work_dir, RECORDS), os.path.join(work_dir, VERIFIED, RECORDS)):
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(f.read())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_check(
    work_dir: str, prepared: tvm.IRModule, target: tvm.target.Target
) -> ModelCheck | None:
    """The stored check for this model and target, if made from the records now in work_dir."""
    entry = _read(work_dir).get(model_key(prepared))
    if entry is None or entry.get("target") != str(target):
        return None
    if entry.get("records") != records_fingerprint(work_dir):
        return None  # records added since (an interrupted re-run): the check is stale
    kernels = [KernelChoice(**k) for k in entry["kernels"]]
    return ModelCheck(entry["kept"], entry["ms"], kernels, entry["workloads"], entry["note"])


def _read(work_dir: str) -> dict:
    path = os.path.join(work_dir, MODEL_CHECK)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a torn write: no check, every record applies


def store_check(
    work_dir: str, prepared: tvm.IRModule, target: tvm.target.Target, check: ModelCheck
) -> None:
    """Write ``check`` for this model (atomically; other models' checks are kept)."""
    entries = _read(work_dir)
    entry = asdict(check)
    entry.update(target=str(target), records=records_fingerprint(work_dir))
    entries[model_key(prepared)] = entry
    path = os.path.join(work_dir, MODEL_CHECK)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    os.replace(path + ".tmp", path)
