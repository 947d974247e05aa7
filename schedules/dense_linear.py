"""Dense linear layer over tokens, ``out[m, n] = sum_k x[m, k] W[k, n]``, on the dense GEMM's
register tile (``dense_gemm.emit_tile``): A is the input (tokens broadcast), B the weight packed
as ``(ceil(N / width), K, width)`` (``dense_gemm.pack_columns``), zero-padded; the last tile
stores only the columns that exist. TIR kernel generator and its MetaSchedule template.

Parallel jobs are (column tile, chunk of row tiles) (``dense_gemm.row_chunks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .dense_gemm import GemmConfig, emit_tile, row_chunks, split_vectors
from .epilogue import Epilogue
from .tunable import SCHEDULED_ATTR, Knobs, TunableKernel, register, template
from .vector_math import span


def over_column_tiles(
    columns: int, cfg: GemmConfig, tile: tirx.PrimExpr, body: Callable[[tuple[int, ...]], None]
) -> None:
    """``body(widths)`` for column tile ``tile`` of ``columns`` split in tiles of ``cfg.width``
    (a GEMM whose packed operand fills the lanes): the full tile's vectors, or in the last
    tile the columns left (its last vector partial)."""
    tiles = math.ceil(columns / cfg.width)
    full = (cfg.lanes,) * cfg.vectors
    last = tuple(split_vectors(columns - (tiles - 1) * cfg.width, cfg.lanes))
    if last == full:
        body(full)
        return
    with T.If(tile < tiles - 1):
        with T.Then():
            body(full)
        with T.Else():
            body(last)


def linear_gemm_primfunc(
    lead: tuple[int, ...],
    k: int,
    n: int,
    epilogue: Epilogue = Epilogue(),
    cfg: GemmConfig | None = None,
    cores: int = 1,
    name: str = "dense_linear",
    tile_rows: int | None = None,
) -> tirx.PrimFunc:
    """Arguments: x (*lead, K), weight ``pack_columns(W, cfg.width)`` of W (K, N),
    [bias (N_padded,)], [residual (*lead, N)], out (*lead, N); N_padded = ``padded(n, cfg)``.
    The leading dims (tokens x batch) are the GEMM's rows, ``tile_rows`` (default
    ``cfg.rows``; at most M) of them a register tile."""
    cfg = cfg or GemmConfig()
    m = math.prod(lead)
    rows = min(tile_rows or cfg.rows, m)
    col_tiles = math.ceil(n / cfg.width)
    row_tiles = math.ceil(m / rows)
    chunk = row_chunks(row_tiles, col_tiles, cores)
    chunks = math.ceil(row_tiles / chunk)
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        x_arg = T.arg("x", T.buffer((*lead, k), "float32"))
        w = T.arg("weight", T.buffer((col_tiles, k, cfg.width), "float32"))
        bias, resid_arg = epilogue.declare_args((col_tiles * cfg.width,), (*lead, n))
        out_arg = T.arg("out", T.buffer((*lead, n), "float32"))
        x = T.decl_buffer((m, k), "float32", data=x_arg.data)
        out = T.decl_buffer((m, n), "float32", data=out_arg.data)
        resid = None if resid_arg is None else T.decl_buffer((m, n), data=resid_arg.data)
        with T.parallel(0, col_tiles * chunks) as job:
            col_tile, first = job // chunks, job % chunks * chunk

            def tile(widths: tuple[int, ...]) -> None:
                n0 = col_tile * cfg.width
                with T.serial(0, chunk) as t:
                    m0 = (first + t) * rows

                    def a_at(r: int, kk: tirx.PrimExpr) -> tirx.PrimExpr:
                        return x[tirx.min(m0 + r, m - 1), kk]  # a last tile's rows repeat

                    def b_at(kk: tirx.PrimExpr, off: int, width: int) -> tirx.PrimExpr:
                        return w[col_tile, kk, span(off, width)]

                    def finish(r: int, off: int, width: int, value: tirx.PrimExpr) -> None:
                        at = (m0 + r, span(n0 + off, width))
                        value = epilogue.apply(
                            value,
                            None if bias is None else bias[span(n0 + off, width)],
                            None if resid is None else resid[at],
                        )
                        with T.If(m0 + r < m), T.Then():
                            T.buffer_store(out, value, list(at))

                    with T.If(first + t < row_tiles), T.Then():
                        emit_tile(k, rows, widths, a_at, b_at, finish)

            over_column_tiles(n, cfg, col_tile, tile)
    return ib.get().without_attr("global_symbol")


def padded(n: int, cfg: GemmConfig) -> int:
    """``n`` columns rounded up to whole tiles: the packed weight's and bias's width."""
    return math.ceil(n / cfg.width) * cfg.width


# --- MetaSchedule search space (see schedules/tunable.py) ----------------------------------


def _linear_build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    cfg = GemmConfig(params["packed_rows"], params["vectors"], params["lanes"])
    return linear_gemm_primfunc(
        tuple(params["lead"]), params["k"], params["n"], Epilogue(**params["epilogue"]), cfg,
        params["cores"], params["name"], tile_rows=knobs["rows"],
    )  # fmt: skip


def _linear_space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """1-8 token rows a tile (at most the tokens); the columns are the packed weight's."""
    return {"rows": list(range(1, min(8, math.prod(params["lead"])) + 1))}


DENSE_LINEAR = register(TunableKernel("dense_linear", _linear_build, _linear_space))


def linear_gemm_template(
    lead: tuple[int, ...],
    k: int,
    n: int,
    epilogue: Epilogue,
    cfg: GemmConfig,
    cores: int,
    name: str,
) -> tirx.PrimFunc:
    """The linear GEMM at ``cfg`` (its weight packed by ``cfg.width``) as a MetaSchedule
    template; the knob is the tile's token rows."""
    params = {
        "lead": list(lead), "k": k, "n": n, "epilogue": asdict(epilogue),
        "packed_rows": cfg.rows, "vectors": cfg.vectors, "lanes": cfg.lanes, "cores": cores,
        "name": name,
    }  # fmt: skip
    knobs = {"rows": min(cfg.rows, math.prod(lead))}
    return template(_linear_build(params, knobs), DENSE_LINEAR.name, params, knobs)
