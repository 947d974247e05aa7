"""Argument checks shared by the API entry points: errors name the argument and what is wrong."""

from __future__ import annotations

import numbers
import os
import tempfile
from typing import Any

from .errors import InputError


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers too; bools and floats refused), else
    ``InputError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name}: expected {wanted}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return value


def check_work_dir(work_dir: Any, name: str = "work_dir") -> str:
    """``work_dir`` as a str path, created if missing; ``InputError`` naming ``name`` when it is
    not a path, is an existing non-directory, or cannot be created or written."""
    if not isinstance(work_dir, str | os.PathLike):
        raise InputError(f"{name}: expected a directory path (str or PathLike), got {work_dir!r}")
    path = os.fspath(work_dir)
    if not isinstance(path, str) or not path:
        raise InputError(f"{name}: expected a directory path, got {work_dir!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{name}: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise InputError(f"{name}: cannot create or write {path!r}: {err.strerror}") from err
    return path
