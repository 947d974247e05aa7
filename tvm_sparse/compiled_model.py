"""A compiled model: run it, read its report, export it as a deployable library + metadata.

Threads: a ``CompiledModel`` may be called from any number of threads. The executable (code and
weights) is shared; each thread gets its own Relax VM over it, made on its first call (a VM
instance is not thread-safe). ``__call__``, ``benchmark`` and ``profile`` all use the calling
thread's VM.

Files: ``export(path)`` writes the library and ``path.json`` (format ``tvm-sparse/2``: inputs,
target, report, the library's size and SHA-256), each through a temporary file in the same
directory and ``os.replace``, so a reader never sees a half-written file. ``load`` checks the
metadata and the library against it before the library is opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import threading
import uuid
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.target import Target

from .errors import ExportError, InputError, ModelLoadError, TvmSparseError, first_line
from .frontend import TensorSpec
from .report import LayerRecord, format_report
from .targets import is_arm, isa_name, resolve_target, runs_here

METADATA_SUFFIX = ".json"
FORMAT = "tvm-sparse/2"
LEGACY_FORMAT = "tvm-sparse/1"  # no "library" record: read without the size / hash check
_VM_LOCK = threading.Lock()  # VM creation looks functions up in the shared module


@dataclass
class CompiledModel:
    """A Relax VM executable plus what is needed to call it and explain it."""

    executable: Any  # tvm.runtime.Executable, or a loaded runtime Module
    inputs: list[TensorSpec]
    layers: list[LayerRecord]
    target: Target
    compile_seconds: float = 0.0
    source: str | None = None  # the library file this model was loaded from
    _local: threading.local = field(
        default_factory=threading.local, init=False, repr=False, compare=False
    )

    @property
    def runs_here(self) -> bool:
        """Whether this machine can run the code: its architecture, and no vector ISA the host
        lacks (else run it over ``tvm_sparse.rpc``, or on a machine with that ISA)."""
        return runs_here(self.target)

    @property
    def vm(self) -> relax.VirtualMachine:
        """The calling thread's VM (made on first use; never share it with other threads)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            if not self.runs_here:
                built_for = self.target.attrs.get("mtriple") or isa_name(self.target)
                raise InputError(
                    f"this model was compiled for {built_for}, which this machine cannot run: "
                    "export it and run it on the device (tvm_sparse.rpc.run_remote / tvm-sparse "
                    "run --rpc)"
                )
            with _VM_LOCK:
                vm = relax.VirtualMachine(self.executable, tvm.cpu())
            self._local.vm = vm
        return vm

    def _check(self, args: tuple) -> list:
        if len(args) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} inputs, got {len(args)}")
        tensors = []
        for spec, arg in zip(self.inputs, args, strict=True):
            arr = arg.detach().cpu().numpy() if hasattr(arg, "detach") else np.asarray(arg)
            if tuple(arr.shape) != spec.shape:
                raise InputError(
                    f"input {spec.name!r}: expected shape {spec.shape}, got {tuple(arr.shape)}"
                )
            tensors.append(tvm.runtime.tensor(np.ascontiguousarray(arr, dtype=spec.dtype)))
        return tensors

    def __call__(self, *args: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run on numpy arrays or torch tensors; returns numpy (a tuple for several outputs)."""
        out = self.vm["main"](*self._check(args))
        return _to_numpy(out)

    def benchmark(self, *args: Any, number: int = 10, repeat: int = 5) -> float:
        """Median latency in milliseconds (TVM's time evaluator, ``repeat`` x ``number`` runs)."""
        timer = self.vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return float(np.median(timer(*self._check(args)).results) * 1e3)

    def profile(self, *args: Any, runs: int = 10):
        """Per-kernel time of a forward pass on ``args`` (``tvm_sparse.profiling.Profile``;
        ``.table()`` to print it). Uses a VM of its own."""
        from .profiling import profile_vm

        self.vm  # noqa: B018 (raises the clear error for a model built for another target)
        return profile_vm(self.executable, self._check(args), runs=runs)

    def report(self) -> str:
        """Per layer: op, shape, format chosen, density, FLOPs kept, why."""
        return format_report(self.layers)

    def export(self, path: str | os.PathLike, fcompile: Any = None) -> str:
        """Write ``path`` (shared library) and ``path.json`` (inputs, target, report, the
        library's size and SHA-256), each atomically (temporary file + ``os.replace``).

        ``fcompile`` links the library (default: this host's C compiler, or a cross linker
        from ``tvm_sparse.toolchain`` for another target). Raises ``ExportError`` (an
        ``OSError``) naming the path when it cannot be written, before anything is linked;
        ``ToolchainError`` (one line, the tool named) when linking fails. A loaded model's
        library is copied as it is.
        """
        path = os.fspath(path)
        meta_path = path + METADATA_SUFFIX
        meta_tmp = _reserve_temp(path, meta_path)
        lib_tmp = _temp_name(path, os.path.splitext(path)[1])
        try:
            self._write_library(path, lib_tmp, fcompile)
            _write_json(meta_tmp, self._metadata(lib_tmp))
            os.replace(lib_tmp, path)
            os.replace(meta_tmp, meta_path)
        finally:
            for tmp in (lib_tmp, meta_tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        return path

    def _write_library(self, path: str, tmp: str, fcompile: Any) -> None:
        """Link (or, for a loaded model, copy) the library into ``tmp``."""
        if self.source is not None:
            shutil.copyfile(self.source, tmp)
        else:
            from .toolchain import ToolchainError

            fcompile = fcompile or self._default_fcompile(path)
            kwargs = {"fcompile": fcompile} if fcompile is not None else {}
            try:
                self.executable.export_library(tmp, **kwargs)
            except ToolchainError as err:  # name the destination, not the temporary file
                raise ToolchainError(str(err).replace(tmp, path)) from err
        _fsync(tmp)

    def _default_fcompile(self, path: str) -> Any:
        """The host C compiler, or a cross linker (NDK, aarch64 gcc, clang+lld); ``None`` for
        the formats TVM writes itself (.tar, .wasm)."""
        from .toolchain import fcompile_for, host_linker

        if path.endswith((".tar", ".wasm")):
            return None
        if self.runs_here:
            return host_linker().fcompile()
        return fcompile_for(self.target)

    def _metadata(self, library: str) -> dict:
        return {
            "format": FORMAT,
            "inputs": [s.to_json() for s in self.inputs],
            "target": str(self.target),
            "layers": [r.to_json() for r in self.layers],
            "library": {"size": os.path.getsize(library), "sha256": _sha256(library)},
        }


def load(path: str | os.PathLike, *, trial_run: bool = True) -> CompiledModel:
    """Load a model written by ``CompiledModel.export``.

    Before the library is opened, every field of ``path.json`` is checked and the library's
    size and SHA-256 are compared with the ones recorded there (a truncated or replaced file
    would crash the process when opened). Metadata of format ``tvm-sparse/1`` (written before
    the hash was recorded) is still read: such a library only gets a check that its ELF
    segments lie inside the file. ``trial_run`` (default) runs the model once on zeros, so a
    library that does not take the inputs the metadata declares fails here, not at the first
    call. Every failure is a ``ModelLoadError`` naming the file and the field.
    """
    path = os.fspath(path)
    meta_path = path + METADATA_SUFFIX
    for p in (path, meta_path):
        if not os.path.isfile(p):
            what = "a directory, not a file" if os.path.isdir(p) else "missing"
            raise ModelLoadError(f"{p}: {what} (export writes the library and its .json)", path=p)
    meta = _read_json(meta_path)
    inputs, layers, target, library = _parse_metadata(meta, meta_path)
    _verify_library(path, meta_path, library)
    if target is not None and is_arm(target) != is_arm(resolve_target("x86")):
        raise ModelLoadError(
            f"{path}: built for {target.attrs.get('mtriple')}, which this machine cannot open: "
            "run it on the device (tvm_sparse.rpc.run_remote, tvm-sparse run --rpc)",
            path=path, field="target",
        )  # fmt: skip
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise ModelLoadError(
            f"{path}: cannot load the library ({first_line(err)})", path=path
        ) from err
    cm = CompiledModel(executable=lib, inputs=inputs, layers=layers, target=target, source=path)
    if trial_run and cm.runs_here:
        _trial_run(cm, meta_path)
    return cm


# --- export helpers ---


def check_export_path(path: str | os.PathLike) -> None:
    """Raise ``ExportError`` naming ``path`` now if ``export(path)`` could not write there (so
    a caller can check before spending minutes compiling)."""
    path = os.fspath(path)
    os.remove(_reserve_temp(path, path + METADATA_SUFFIX))


def _temp_name(path: str, suffix: str) -> str:
    """A fresh hidden name beside ``path`` (same directory, so ``os.replace`` is atomic)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _reserve_temp(path: str, final: str) -> str:
    """Create the temporary file for ``final``: proves ``path``'s directory is writable before
    anything is compiled. Raises ``ExportError`` naming ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    for target in (path, final):
        if os.path.isdir(target):
            raise ExportError(
                f"cannot export to {path}: {target} is a directory", errno.EISDIR, target
            )
    tmp = _temp_name(final, "")
    try:
        with open(tmp, "x"):
            pass
    except OSError as err:
        raise ExportError(
            f"cannot export to {path}: {_why_unwritable(parent, err)}", err.errno, path
        ) from err
    return tmp


def _why_unwritable(parent: str, err: OSError) -> str:
    """Which part of the destination is wrong, in words."""
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    return f"cannot create a file in {parent} ({err.strerror})"


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- load helpers ---


def _bad(meta_path: str, name: str, problem: str) -> ModelLoadError:
    return ModelLoadError(
        f"{meta_path}: corrupt metadata: field {name!r}: {problem}", path=meta_path, field=name
    )


def _read_json(meta_path: str) -> dict:
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(
            f"{meta_path}: corrupt metadata: not JSON ({err})", path=meta_path
        ) from err
    except OSError as err:
        raise ModelLoadError(f"{meta_path}: cannot read ({err.strerror})", path=meta_path) from err
    if not isinstance(meta, dict):
        raise _bad(meta_path, "(top level)", f"expected an object, got {type(meta).__name__}")
    return meta


def _field(
    obj: dict, meta_path: str, key: str, kind: type | tuple[type, ...], prefix: str = ""
) -> Any:
    """``obj[key]``, checked to be of ``kind`` (bools are not numbers); the error names the
    field as ``prefix.key``."""
    name = f"{prefix}.{key}" if prefix else key
    if key not in obj:
        raise _bad(meta_path, name, "missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        raise _bad(meta_path, name, f"expected {_kind_name(kind)}, got {value!r}"[:200])
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list"}
    return " or ".join(names.get(k, "an object") for k in _as_tuple(kind))


def _parse_metadata(meta: dict, meta_path: str) -> tuple:
    """(inputs, layers, target, library record or None), every field checked."""
    fmt = _field(meta, meta_path, "format", str)
    if fmt not in (FORMAT, LEGACY_FORMAT):
        raise _bad(meta_path, "format", f"{fmt!r} is not one this version reads ({FORMAT})")
    inputs = _parse_inputs(meta, meta_path)
    layers = _parse_layers(meta, meta_path)
    target = _parse_target(_field(meta, meta_path, "target", str), meta_path)
    library = _parse_library(meta, meta_path) if fmt == FORMAT else None
    return inputs, layers, target, library


def _parse_inputs(meta: dict, meta_path: str) -> list[TensorSpec]:
    items = _field(meta, meta_path, "inputs", list)
    if not items:
        raise _bad(meta_path, "inputs", "empty (a model takes at least one input)")
    specs = []
    for i, item in enumerate(items):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise _bad(meta_path, where, f"expected an object, got {item!r}"[:200])
        name = _field(item, meta_path, "name", str, where)
        shape = _field(item, meta_path, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(meta_path, f"{where}.shape", f"expected sizes >= 0, got {shape!r}"[:200])
        dtype = _field(item, meta_path, "dtype", str, where)
        try:
            np.dtype(dtype)
        except TypeError as err:
            raise _bad(meta_path, f"{where}.dtype", f"unknown dtype {dtype!r}") from err
        specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def _parse_layers(meta: dict, meta_path: str) -> list[LayerRecord]:
    items = _field(meta, meta_path, "layers", list)
    wanted = {f.name: f for f in fields(LayerRecord)}
    kinds = {"float": (int, float), "int": int, "str": str}
    records = []
    for i, item in enumerate(items):
        where = f"layers[{i}]"
        if not isinstance(item, dict):
            raise _bad(meta_path, where, f"expected an object, got {item!r}"[:200])
        extra = sorted(set(item) - set(wanted))
        if extra:
            raise _bad(meta_path, f"{where}.{extra[0]}", "not a field of a layer record")
        for name, spec in wanted.items():
            if name in item or spec.default is MISSING:  # given, or required
                _field(item, meta_path, name, kinds[str(spec.type)], where)
        records.append(LayerRecord(**item))
    return records


def _parse_target(text: str, meta_path: str) -> Target | None:
    """The target's JSON (``str(Target)``); "None" for a model without one."""
    if text == "None":
        return None
    try:
        config = json.loads(text)
        if not isinstance(config, dict):
            raise TypeError(f"expected a JSON object, got {type(config).__name__}")
        return Target(config)
    except Exception as err:
        raise _bad(meta_path, "target", f"not a TVM target ({first_line(err)})"[:300]) from err


def _parse_library(meta: dict, meta_path: str) -> dict:
    record = _field(meta, meta_path, "library", dict)
    size = _field(record, meta_path, "size", int, "library")
    digest = _field(record, meta_path, "sha256", str, "library")
    if size < 0:
        raise _bad(meta_path, "library.size", f"expected a size >= 0, got {size}")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise _bad(meta_path, "library.sha256", f"expected 64 hex digits, got {digest!r}"[:200])
    return record


def _verify_library(path: str, meta_path: str, library: dict | None) -> None:
    """The library is the one the metadata describes (and, in any case, not cut short)."""
    size = os.path.getsize(path)
    if library is not None:
        if size != library["size"]:
            raise ModelLoadError(
                f"{path}: {size} bytes, but {meta_path} records {library['size']} (truncated "
                "or replaced: export the model again)", path=path, field="library.size",
            )  # fmt: skip
        if _sha256(path) != library["sha256"]:
            raise ModelLoadError(
                f"{path}: SHA-256 differs from the one {meta_path} records (corrupt or "
                "replaced: export the model again)", path=path, field="library.sha256",
            )  # fmt: skip
    problem = _elf_problem(path, size)
    if problem:
        raise ModelLoadError(f"{path}: not a loadable library ({problem})", path=path)


def _elf_problem(path: str, size: int) -> str | None:
    """What is wrong with an ELF file's layout (headers or segments past the end of the file),
    or None. Files that are not ELF (.tar, Mach-O) are left to TVM."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return None
        if len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
            return "ELF header cut short or invalid"
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        layout = order + ("QQQIHHHHHH" if wide else "IIIIHHHHHH")
        phoff, shoff = struct.unpack_from(layout, head, 24)[1:3]
        phentsize, phnum, shentsize, shnum = struct.unpack_from(layout, head, 24)[5:9]
        fmt = order + ("IIQQQQQQ" if wide else "IIIIIIII")
        if phnum and phentsize < struct.calcsize(fmt):
            return "invalid program header size"
        if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
            return f"headers end past the file's {size} bytes: truncated"
        f.seek(phoff)
        table = f.read(phnum * phentsize)
    for i in range(phnum):
        fields_ = struct.unpack_from(fmt, table, i * phentsize)
        offset, filesz = (fields_[2], fields_[5]) if wide else (fields_[1], fields_[4])
        if offset + filesz > size:
            return f"segment {i} ends at byte {offset + filesz}, past the file's {size}: truncated"
    return None


def _trial_run(cm: CompiledModel, meta_path: str) -> None:
    """Run the model once on zeros of the declared inputs (the loading thread keeps its VM)."""
    declared = ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in cm.inputs)
    try:
        arity = cm.vm._get_function_arity("main")
    except Exception as err:
        raise ModelLoadError(
            f"{cm.source}: the library has no Relax 'main' function ({first_line(err)})",
            path=cm.source,
        ) from err
    if arity != len(cm.inputs):
        raise _bad(meta_path, "inputs", f"{len(cm.inputs)} declared, the library takes {arity}")
    try:
        cm(*(np.zeros(s.shape, s.dtype) for s in cm.inputs))
    except TvmSparseError:
        raise
    except Exception as err:
        raise _bad(
            meta_path, "inputs", f"the library rejects {declared}: {first_line(err)}"[:400]
        ) from err


def _to_numpy(out: Any) -> np.ndarray | tuple[np.ndarray, ...]:
    if hasattr(out, "numpy"):
        return out.numpy()
    return tuple(_to_numpy(o) for o in out)
