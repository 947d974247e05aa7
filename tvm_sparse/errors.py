"""Errors tvm-sparse raises instead of letting a failure surface deep inside TVM."""

from __future__ import annotations


class TvmSparseError(Exception):
    """Base class of the project's errors."""


class ModelLoadError(TvmSparseError):
    """A model file or module could not be read or imported (names the file / model).

    ``path`` is the file at fault and ``field`` the metadata field, when the error has them.
    """

    def __init__(self, message: str, path: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class InputError(TvmSparseError, ValueError):
    """Inputs do not match what the model expects (names the input and what is wrong)."""


class ExportError(TvmSparseError, OSError):
    """A model cannot be written where it was asked to go (names the path; raised before any
    compiler or linker runs). ``errno`` and ``filename`` are set as on the ``OSError``."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.filename = filename

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.errno, self.filename)


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message (its type's name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def last_line(err: BaseException) -> str:
    """The last non-blank line of ``err``'s message, where TVM's errors put the message after
    their traceback (its type's name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
