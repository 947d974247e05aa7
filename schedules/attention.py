"""Scaled dot-product attention as one kernel: ``out = softmax(scale * q @ kt (+ mask)) @ v``.
TIR generator.

Operands ``q (N, T, D)``, ``kt (N, D, S)`` (keys transposed: a row of ``kt`` is one depth of
every key), ``v (N, S, Dv)``, N = batch x heads, each read in place from its source tensor
(``OperandView``: the head split of a QKV projection is a strided view of it, no copy). Where
kt's keys are not contiguous there, each job first copies its head's kt into a (D, S) block.
A job takes ``rows`` queries of one head, for all keys:

1. scores: the dense GEMM's register tiles (``dense_gemm.tile_block``) with the queries
   broadcast and ``kt``'s rows as vectors over the keys, scaled (and masked) into a scratch row
   block (``(rows, S)``, in L1);
2. softmax per query row in vectors (max, ``exp(s - max)`` with a vector exp, sum); the
   ``1 / sum`` is kept per row;
3. ``probs @ v``: register tiles again, ``v``'s rows as vectors over the value depth, the
   ``1 / sum`` applied at the store.

``safe`` is PyTorch's scaled_dot_product_attention: a query whose scores are all ``-inf`` (every
key masked) gets zeros where plain softmax gives NaN.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import allocated_view
from .dense_gemm import GemmConfig, tile_block
from .operand_view import OperandView
from .tunable import SCHEDULED_ATTR
from .vector_math import row_reduce, span, splat, vector_exp

NEG_INF = float("-inf")
ZERO = tirx.const(0.0, "float32")


@dataclass(frozen=True)
class AttentionShape:
    """Static facts: N = batch x heads, T queries, S keys, depth D, value depth Dv; where q
    (N, T, D), kt (N, D, S) and v (N, S, Dv) lie in their source tensors (``OperandView``: in
    place, e.g. the head split of a fused QKV projection; v's columns contiguous); the output's
    leading dims; the scale; the mask operand's (heads, queries) dims, each 1 (broadcast) or
    N / T, None without a mask; the all-masked-row rule."""

    heads: int
    queries: int
    keys: int
    depth: int
    value_depth: int
    q: OperandView
    kt: OperandView
    v: OperandView
    out_lead: tuple[int, ...]
    scale: float = 1.0
    mask: tuple[int, int] | None = None
    safe: bool = False

    @property
    def transposes_keys(self) -> bool:
        """kt's keys are not contiguous: each job copies its head's kt into a (D, S) block."""
        return self.kt.col_stride != 1


def attention_rows(shape: AttentionShape, cfg: GemmConfig, cores: int) -> int:
    """Queries per job: whole register tiles, at least four jobs per core where the heads
    allow; at most 4 tiles (the score block stays in L1), or half the queries where each job
    copies its head's keys."""
    tiles = math.ceil(shape.queries / cfg.rows)
    most = math.ceil(tiles / 2) if shape.transposes_keys else 4
    per_job = max(1, min(most, tiles * shape.heads // (4 * cores)))
    return cfg.rows * min(per_job, tiles)


def attention_primfunc(
    shape: AttentionShape, cfg: GemmConfig, cores: int = 1, name: str = "attention"
) -> tirx.PrimFunc:
    """Arguments: the sources of q, kt and v (their ``OperandView.source`` shapes; one tensor
    may be passed for several), [mask (*mask, S)], out (*out_lead, T, Dv)."""
    g = shape
    n, t, s, d, dv = g.heads, g.queries, g.keys, g.depth, g.value_depth
    rows = attention_rows(g, cfg, cores)
    q_tiles = math.ceil(t / rows)
    lanes = cfg.lanes
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, "op_pattern": 8, SCHEDULED_ATTR: True})
        sources = [
            T.arg(label, T.buffer(view.source, "float32"))
            for label, view in (("q", g.q), ("kt", g.kt), ("v", g.v))
        ]
        mask = T.arg("mask", T.buffer((*g.mask, s), "float32")) if g.mask else None
        out_arg = T.arg("out", T.buffer((*g.out_lead, t, dv), "float32"))
        q, kt, v = (_flat(source) for source in sources)
        out = T.decl_buffer((n, t, dv), "float32", data=out_arg.data)
        with T.parallel(0, n * q_tiles) as job:
            h, t0 = job // q_tiles, job % q_tiles * rows
            probs = allocated_view((rows, s))
            inv_sum = allocated_view((rows,))

            def query(row: tirx.PrimExpr) -> tirx.PrimExpr:
                return tirx.min(t0 + row, t - 1)  # a last tile's rows repeat the last query

            def store_scores(row, col, width, value) -> None:
                value = value * splat(tirx.const(g.scale, "float32"), width)
                if mask is not None:
                    heads, queries = g.mask
                    at = (h if heads > 1 else 0, query(row) if queries > 1 else 0)
                    value = value + mask[(*at, span(col, width))]
                T.buffer_store(probs, value, [row, span(col, width)])

            if g.transposes_keys:  # this head's kt as a contiguous (D, S) block
                keys = allocated_view((d, s))
                with T.serial(0, s) as j, T.serial(0, d) as kk:
                    T.buffer_store(keys, kt[g.kt.at(h, kk, j)], [kk, j])

                def key_vector(kk, col, width):
                    return keys[kk, span(col, width)]
            else:

                def key_vector(kk, col, width):
                    return kt[span(g.kt.at(h, kk, col), width)]

            tile_block(
                rows, s, d, cfg,
                lambda row, kk: q[g.q.at(h, query(row), kk)],
                key_vector,
                store_scores,
            )  # fmt: skip
            with T.serial(0, rows) as row:
                _softmax_row(probs, inv_sum, row, s, lanes, g.safe)

            def store_out(row, col, width, value) -> None:
                with T.If(t0 + row < t), T.Then():
                    scaled = value * splat(inv_sum[row], width)
                    T.buffer_store(out, scaled, [h, t0 + row, span(col, width)])

            tile_block(
                rows, dv, s, cfg,
                lambda row, kk: probs[row, kk],
                lambda kk, col, width: v[span(g.v.at(h, kk, col), width)],
                store_out,
            )  # fmt: skip
    return ib.get().without_attr("global_symbol")


def _flat(buffer: tirx.Buffer) -> tirx.Buffer:
    """A 1-D view of ``buffer`` (an ``OperandView`` indexes it flat)."""
    return T.decl_buffer((math.prod(buffer.shape),), "float32", data=buffer.data)


def _softmax_row(
    probs: tirx.Buffer, inv_sum: tirx.Buffer, row: tirx.PrimExpr, s: int, lanes: int, safe: bool
) -> None:
    """``probs[row] = exp(probs[row] - max)`` and ``inv_sum[row] = 1 / sum`` (0 for a row of
    ``-inf`` when ``safe``), in vectors of ``lanes`` reduced across lanes at the end."""
    top = T.Bind(row_reduce(s, lanes, NEG_INF, tirx.max, lambda at, w: probs[row, span(at, w)]))
    if safe:  # a row of -inf: exp(-inf - 0) = 0 everywhere, the row's output 0
        top = T.Bind(tirx.Select(top == tirx.const(NEG_INF, "float32"), ZERO, top))

    def exp_store(at: tirx.PrimExpr, width: int) -> tirx.PrimExpr:
        x = probs[row, span(at, width)] - splat(top, width)
        e = vector_exp(x) if width > 1 else tirx.exp(x)
        # exp below -80 is 0 to float32 next to the row's 1; vector_exp would give ~1e-38,
        # whose products with v are subnormal (a microcode assist each: 3x slower when masked)
        e = tirx.Select(x < splat(tirx.const(-80.0, "float32"), width), splat(ZERO, width), e)
        T.buffer_store(probs, e, [row, span(at, width)])
        return probs[row, span(at, width)]

    total = T.Bind(row_reduce(s, lanes, 0.0, operator.add, exp_store))
    inverse = tirx.const(1.0, "float32") / total
    if safe:
        inverse = tirx.Select(total == ZERO, ZERO, inverse)
    T.buffer_store(inv_sum, inverse, [row])


__all__ = ["AttentionShape", "attention_primfunc", "attention_rows"]
