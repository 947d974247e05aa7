"""Errors tvm-sparse raises instead of letting a failure surface deep inside TVM."""


class TvmSparseError(Exception):
    """Base class of the project's errors."""


class ModelLoadError(TvmSparseError):
    """A model file or module could not be read or imported (names the file / model)."""


class InputError(TvmSparseError, ValueError):
    """Inputs do not match what the model expects (names the input and what is wrong)."""
