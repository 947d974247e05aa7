"""Buffers of the generated kernels accessed through views, which keeps their builds fast.

An unrolled tile of FMAs loads and stores its accumulator rows thousands of times. TVM's
``s_tir.CompactBufferAllocation`` (in every build pipeline) relaxes the region of each access
to an allocated buffer over the enclosing loops and conditions: ~1 ms an access here, 3.5-7 s
of a 4-8 s build for a filters-in-lanes layer with its four code paths (0.6-0.8 s after;
~1.3 s with the edge tiles' code paths, up to nine).
Accesses through a declared view (``DeclBuffer``) are not analysed; the view's ``data``
reference marks the whole allocation used, so nothing is compacted away (the kernels' buffers
are exact already).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

# TVM keeps a CPU allocation inside a parallel loop on the stack (not the workspace heap, where
# LLVM cannot prove it unaliased and keep it in registers) only when it is below this size.
STACK_BYTES = 1024
LINE_FLOATS = 16  # fp32 values in a 64-byte cache line


def allocated_view(shape: tuple, dtype: str = "float32") -> tirx.Buffer:
    """A new buffer of ``shape`` (uninitialised), accessed through a view of its allocation.
    The view must be accessed: StorageRewrite drops an unused allocation and then fails on
    its view ("Buffer alias source must be registered")."""
    buffer = T.alloc_buffer(shape, dtype)
    return T.decl_buffer(shape, dtype, data=buffer.data)


def accumulator_rows(count: int, width: int, dtype: str = "float32") -> list[tirx.Buffer]:
    """``count`` rows of ``width`` elements, each its own allocation: TVM puts those under
    1 KiB on the stack (``STACK_BYTES``), where LLVM keeps them in registers."""
    return [allocated_view((width,), dtype) for _ in range(count)]


def prefetch(element: tirx.BufferLoad, write: bool = False) -> None:
    """Prefetch the cache line holding ``element`` into all cache levels (``write``: for a
    store, the line fetched owned)."""
    address = tirx.address_of(element)
    T.evaluate(tirx.call_intrin("void", "tirx.prefetch", address, int(write), 3, 1))


def prefetch_span(flat: tirx.Buffer, start: tirx.PrimExpr, count: int, write: bool = False) -> None:
    """Prefetch the cache lines of ``count`` elements of the flat buffer ``flat`` from ``start``
    on, one per ``LINE_FLOATS``, each index clamped to the buffer's last element."""
    for line in range(-(-count // LINE_FLOATS)):
        prefetch(flat[tirx.min(start + line * LINE_FLOATS, flat.shape[0] - 1)], write)
