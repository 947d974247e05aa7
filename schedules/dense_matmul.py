"""Dense matmul with a constant weight (fully connected layers): TIR kernel generator.

``out[m, n] = act(sum_k x[m, k] * w[k, n] + bias[n])``, weight packed column-block-major as
(N / block, K, block) so each job streams one contiguous panel. Each parallel job owns ``rows``
input rows x one column block of ``block`` outputs held in registers (a batch-1 FC layer is a
weight-bandwidth-bound GEMV: the weight is read exactly once, sequentially).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .epilogue import Epilogue, optional_load


@dataclass(frozen=True)
class MatmulConfig:
    """Schedule knobs: input rows per job, vector lanes, vectors per column block."""

    rows: int = 1
    vector: int = 16
    vectors: int = 4

    @property
    def block(self) -> int:
        return self.vector * self.vectors


def default_matmul_config(m: int, lanes: int = 16) -> MatmulConfig:
    rows = min(m, 4)
    return MatmulConfig(rows=rows, vector=lanes, vectors=max(1, 8 // rows))


def padded_columns(n: int, config: MatmulConfig) -> int:
    return math.ceil(n / config.block) * config.block


def pack_weight(weight: np.ndarray, config: MatmulConfig) -> np.ndarray:
    """(K, N) -> (N_padded / block, K, block), zero-padded: the layout the kernel reads."""
    k, n = weight.shape
    padded = np.pad(weight, ((0, 0), (0, padded_columns(n, config) - n)))
    return np.ascontiguousarray(padded.reshape(k, -1, config.block).transpose(1, 0, 2))


def dense_matmul_primfunc(
    m: int,
    k: int,
    n: int,
    epilogue: Epilogue = Epilogue(),
    config: MatmulConfig | None = None,
    name: str = "dense_matmul",
) -> tirx.PrimFunc:
    """Arguments: x (M, K), weight ``pack_weight(w, config)``, [bias (N_padded,)],
    [residual (M, N)], out (M, N). ``padded_columns(n, config)`` gives N_padded."""
    cfg = config or default_matmul_config(m)
    rows, vec, block = cfg.rows, cfg.vector, cfg.block
    n_pad = padded_columns(n, cfg)
    row_tiles, col_blocks = math.ceil(m / rows), n_pad // block
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8})
        x = T.arg("x", T.buffer((m, k), "float32"))
        w = T.arg("weight", T.buffer((col_blocks, k, block), "float32"))
        bias, resid = epilogue.declare_args((n_pad,), (m, n))
        out = T.arg("out", T.buffer((m, n), "float32"))
        with T.parallel(0, row_tiles * col_blocks) as job:
            m0 = job // col_blocks * rows
            n0 = job % col_blocks * block
            acc = T.alloc_buffer((rows, block), "float32")  # < 1 KiB: on the stack
            with T.unroll(0, rows) as r, T.unroll(0, cfg.vectors) as v:
                with T.vectorized(0, vec) as j:
                    T.buffer_store(acc, tvm.tirx.const(0.0, "float32"), [r, v * vec + j])
            with T.serial(0, k) as kk:
                with T.unroll(0, rows) as r:
                    xv = x[tvm.tirx.min(m0 + r, m - 1), kk]
                    with T.unroll(0, cfg.vectors) as v, T.vectorized(0, vec) as j:
                        col = v * vec + j
                        value = acc[r, col] + xv * w[job % col_blocks, kk, col]
                        T.buffer_store(acc, value, [r, col])
            with T.serial(0, rows) as r, T.serial(0, block) as col:
                with T.If(tvm.tirx.all(m0 + r < m, n0 + col < n)), T.Then():
                    value = epilogue.apply(
                        acc[r, col],
                        optional_load(bias, n0 + col),
                        optional_load(resid, m0 + r, n0 + col),
                    )
                    T.buffer_store(out, value, [m0 + r, n0 + col])
    return ib.get().without_attr("global_symbol")
