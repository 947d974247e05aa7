"""A whole recurrent layer direction (GRU / LSTM / vanilla RNN) as one kernel: TIR generator.

The input projection of every time step, ``xp = X (T*B, I) @ W_ih^T + b`` (gates in ONNX
order, each padded to ``hidden_padded`` columns), is a matmul before this kernel. The kernel
loops over time inside one parallel region (one thread-pool launch, a barrier per phase)::

    parallel launch:
        state[0] = h0 (zero-padded), cell = c0                 # parallel over unit tiles
        barrier
        for s in 0 .. T-1 (t = s, or T-1-s reversed):
            parallel for unit tile (vectors * lanes hidden units) x chunk of batch rows:
                acc[g] = h_prev @ R_g^T for the tile's units      # packed weight, contiguous
                gates, new h (and c) in vectors -> state[(s+1) % 2], Y[t] (, cell)
            barrier
        Y_h = state[T % 2]

``h_prev`` is ``state[s % 2]`` (every thread reads all units of it while writing its own units
of the other half, hence the ping-pong and the barrier). GRU with ``linear_before_reset=0``
needs ``r * h_prev`` of every unit before ``R_n`` applies, so its step has two phases (z, r and
``r * h`` to scratch; barrier; n and the new state). The recurrent weight comes packed by
``rnn_weights.pack_recurrent``, dense or block-sparse as its zeros make faster:

- dense, (tiles, K, gates, vectors * lanes): each k of the step's matvec reads one contiguous
  run of gates x tile width (``_dense_matvec``);
- BSR, blocks of ``units`` (8 / 16) hidden units x ``cols`` (1 / 8) columns, a tile's blocks
  contiguous (``_block_matvec``): per block row (gate, ``units`` slice of the tile) a loop
  over its stored blocks, each column one broadcast of h and one ``units``-wide FMA into one
  of 8 partial sums (the FMA latency), summed into the tile's accumulators at the row's end.

Both fill the same accumulators, so the gate math after them is one code. The outputs are
``hidden_padded`` wide; the caller slices them when H is not a multiple of the tile width.

Sigmoid and tanh use a vectorized exp (Cephes-style range reduction and polynomial, as TVM's
``topi.fast_exp``), NaN kept: |error| < 2e-7 against float64 over [-20, 20] for both.

Measured on Intel Xeon (AVX-512, 2 cores), GRU, T=100, batch 1, the build's own default knobs:
one launch with a barrier per step against a launch per step (``one_launch=False``), 2 threads
(1 thread in brackets): H=1024 23.5 vs 28.4 ms (46 ms), H=256 0.33 vs 0.38 ms (0.51 ms), H=64
0.057 vs 0.113 ms (0.042 ms); a barrier costs ~0.13 us, a launch ~0.9 us. At H=1024 each step
streams the 12.6 MB ``W_hh`` (larger than both L2s) at ~54 GB/s: the memory bound, where
ONNX Runtime is too. On AMD EPYC Zen 5 (32 MB L3, 2 threads), same layer, kernel alone:
dense 5.9 ms (59 us a step, W_hh from L3); W_hh keeping 10 % of its 8x8 blocks, 8x8 BSR
0.74-0.80 ms, 8x1 0.9 ms, 16x8 1.2-1.4 ms; LSTM 9.6 ms dense, 1.2 ms at 10 % (8x8). Build:
~0.1-0.5 s per kernel (intermediates kept in ``keep`` buffers; with ``T.Bind`` the build's
analysers substitute them back: 16-120 s for an LSTM).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows
from .rnn_geometry import (
    CELLS,
    RECURRENT_ATTR,
    RecurrentConfig,
    RecurrentGeometry,
    default_recurrent_config,
    describe_recurrence,
    hidden_padded,
    phase_gates,
    recurrence_flops,
    recurrent_unsupported,
)
from .rnn_weights import BlockLayout, pack_recurrent_weight, pad_gate_rows
from .tunable import SCHEDULED_ATTR
from .vector_math import const_vector, keep, vector_sigmoid, vector_tanh

__all__ = [
    "CELLS",
    "RECURRENT_ATTR",
    "RecurrentConfig",
    "RecurrentGeometry",
    "default_recurrent_config",
    "describe_recurrence",
    "hidden_padded",
    "pack_recurrent_weight",
    "pad_gate_rows",
    "recurrence_flops",
    "recurrent_sequence_primfunc",
    "recurrent_unsupported",
]

# TVM's CPU codegen: after the statement it wraps, every thread of the launch waits for all.
BARRIER = "pragma_parallel_barrier_when_finish"
PARTIAL_SUMS = 8  # independent FMA chains per block row of the sparse matvec (FMA latency 4)


def _dense_matvec(
    accs: list[list[tirx.Buffer]],
    h_load: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
    h_rows: list[tirx.PrimExpr],
    weight: tirx.Buffer,
    tile: tirx.PrimExpr,
    cfg: RecurrentConfig,
    hidden: int,
) -> None:
    """``accs[r][g] += h_load(h_rows[r], k) * W_g[tile's units, k]`` over k < hidden: the
    packed weight (tiles, K, gates, width) read once per k, one contiguous run."""
    lanes = cfg.lanes
    with T.serial(0, hidden) as k:
        for r, row_accs in enumerate(accs):
            hv = tirx.Broadcast(h_load(h_rows[r], k), lanes)
            for g, acc in enumerate(row_accs):
                for v in range(cfg.vectors):
                    at = tirx.Ramp(v * lanes, 1, lanes)
                    w = weight[tile, k, g, tirx.Ramp(v * lanes, 1, lanes)]
                    T.buffer_store(acc, acc[at] + hv * w, [at])


def _zero(accs: list[list[tirx.Buffer]], cfg: RecurrentConfig) -> None:
    for row in accs:
        for acc in row:
            for v in range(cfg.vectors):
                T.buffer_store(
                    acc, const_vector(0.0, cfg.lanes), [tirx.Ramp(v * cfg.lanes, 1, cfg.lanes)]
                )


def _block_matvec(
    accs: list[list[tirx.Buffer]],
    h_load: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr],
    h_rows: list[tirx.PrimExpr],
    weight: tuple[tirx.Buffer, tirx.Buffer, tirx.Buffer],
    tile: tirx.PrimExpr,
    cfg: RecurrentConfig,
) -> None:
    """``accs[r][g][slice] = sum over the slice's stored blocks of h_load(h_rows[r], col + j)
    * block[j]``: the tile's block rows (gate, slice of ``units``) in packed order, each into
    ``PARTIAL_SUMS`` independent partial sums (by column, or by block when blocks are
    narrower), added up at the end of the row."""
    ptr, col, values = weight
    cols, units = (int(d) for d in values.shape[1:])
    slices, gates = cfg.width // units, len(accs[0])
    per_row = max(1, PARTIAL_SUMS // len(h_rows))
    unroll = max(1, per_row // cols)  # blocks per iteration of the block loop
    parts = [accumulator_rows(per_row, units) for _ in h_rows]
    at = tirx.Ramp(0, 1, units)

    def block(b: tirx.PrimExpr, p: int) -> None:
        for j in range(cols):
            w = values[b, j, at]
            for r, row_parts in enumerate(parts):
                part = row_parts[(p * cols + j) % per_row]
                hv = tirx.Broadcast(h_load(h_rows[r], col[b] + j), units)
                T.buffer_store(part, part[at] + w * hv, [at])

    for g in range(gates):
        for v in range(slices):
            i = (tile * gates + g) * slices + v
            for row_parts in parts:
                for part in row_parts:
                    T.buffer_store(part, const_vector(0.0, units), [at])
            start, count = ptr[i], ptr[i + 1] - ptr[i]
            with T.serial(0, count // unroll) as q:
                for p in range(unroll):
                    block(start + q * unroll + p, p)
            if unroll > 1:
                with T.serial(count // unroll * unroll, count) as q:
                    block(start + q, 0)
            for r, row_parts in enumerate(parts):
                total = row_parts[0][at]
                for part in row_parts[1:]:
                    total = total + part[at]
                T.buffer_store(accs[r][g], total, [tirx.Ramp(v * units, 1, units)])


def _batch_chunks(batch: int, rows: int) -> list[tuple[int, int, int]]:
    """(first chunk, chunk count, rows) runs covering the batch: whole chunks, then the tail."""
    whole = batch // rows
    runs = [(0, whole, rows)] if whole else []
    if batch % rows:
        runs.append((whole * rows, 1, batch % rows))
    return runs


@dataclass
class _Step:
    """The buffers and indices one time step's gate math reads and writes."""

    geom: RecurrentGeometry
    cfg: RecurrentConfig
    xp: tirx.Buffer
    state: tirx.Buffer
    y: tirx.Buffer
    y_c: tirx.Buffer | None
    rbias: tirx.Buffer | None
    gate_z: tirx.Buffer | None
    reset_h: tirx.Buffer | None
    s: tirx.PrimExpr
    t: tirx.PrimExpr

    def gates_out(
        self, phase: int, accs: list[tirx.Buffer], b: tirx.PrimExpr, j0: tirx.PrimExpr, v: int
    ) -> None:
        """Vector ``v`` of a tile (units j0 + v * lanes ...) of batch row ``b``: the gates of
        ``phase`` from its accumulators, then the new state (or, GRU phase 1 of 2, z and r * h)."""
        geom, lanes = self.geom, self.cfg.lanes
        h_pad = hidden_padded(geom, self.cfg)
        units = tirx.Ramp(j0, 1, lanes)
        at = tirx.Ramp(v * lanes, 1, lanes)
        row = self.t * geom.batch + b

        def pre(g: int, acc: tirx.Buffer) -> tirx.PrimExpr:
            return self.xp[row, tirx.Ramp(g * h_pad + j0, 1, lanes)] + acc[at]

        h_prev = keep(self.state[self.s % 2, b, units])
        if geom.cell == "rnn":
            h_new = vector_tanh(pre(0, accs[0]))
        elif geom.cell == "lstm":
            i, o, f = (vector_sigmoid(pre(g, accs[g])) for g in range(3))
            cell = keep(f * self.y_c[b, units] + i * vector_tanh(pre(3, accs[3])))
            T.buffer_store(self.y_c, cell, [b, units])
            h_new = o * vector_tanh(cell)
        elif geom.two_phase and phase == 0:
            z, r = (vector_sigmoid(pre(g, accs[g])) for g in range(2))
            T.buffer_store(self.gate_z, z, [b, units])
            T.buffer_store(self.reset_h, r * h_prev, [b, units])
            return
        elif geom.two_phase:
            n = vector_tanh(pre(2, accs[0]))
            h_new = n + self.gate_z[b, units] * (h_prev - n)
        else:
            z, r = (vector_sigmoid(pre(g, accs[g])) for g in range(2))
            hn = accs[2][at] + self.rbias[units]
            n = vector_tanh(self.xp[row, tirx.Ramp(2 * h_pad + j0, 1, lanes)] + r * hn)
            h_new = n + z * (h_prev - n)
        h_new = keep(h_new)
        T.buffer_store(self.state, h_new, [(self.s + 1) % 2, b, units])
        T.buffer_store(self.y, h_new, [self.t, b, units])


def recurrent_sequence_primfunc(
    geom: RecurrentGeometry,
    cfg: RecurrentConfig | None = None,
    name: str = "rnn_sequence",
    layout: BlockLayout | None = None,
) -> tirx.PrimFunc:
    """Arguments: xp (T*B, gates * Hp) (rows t*B + b), the packed weight of each phase (dense:
    one array, ``pack_recurrent_weight``; ``layout`` given: block_ptr, block_col, block_values,
    ``pack_block_recurrent``), [GRU linear_before_reset=1: rbias_n (Hp,)], h0 (B, H), [LSTM:
    c0 (B, H)], then the outputs Y (T, B, Hp), Y_h (B, Hp), [LSTM: Y_c (B, Hp)];
    Hp = ``hidden_padded``."""
    cfg = cfg or default_recurrent_config(geom)
    reason = recurrent_unsupported(geom, cfg)
    if reason is None and layout is not None:
        reason = _layout_unsupported(geom, cfg, layout)
    if reason is not None:
        raise ValueError(reason)
    steps, batch, hidden = geom.steps, geom.batch, geom.hidden
    h_pad = hidden_padded(geom, cfg)
    phases = phase_gates(geom)
    lstm = geom.cell == "lstm"
    has_rbias = geom.cell == "gru" and geom.linear_before_reset

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        # Final (``tirx.is_scheduled``); opaque so Relax fuses nothing into it.
        T.func_attr(
            {
                "tir.noalias": True,
                "op_pattern": 8,
                SCHEDULED_ATTR: True,
                RECURRENT_ATTR: {
                    "cell": geom.cell,
                    "steps": steps,
                    "batch": batch,
                    "hidden": hidden,
                    "reverse": int(geom.reverse),
                    "format": "dense" if layout is None else "bsr",
                    "block": list(layout.block) if layout else [],
                    "stored": _stored_weights(geom, cfg, layout),
                },
            }
        )
        xp = T.arg("xp", T.buffer((steps * batch, geom.gates * h_pad), "float32"))
        weights = _weight_args(geom, cfg, layout)
        rbias = T.arg("rbias_n", T.buffer((h_pad,), "float32")) if has_rbias else None
        h0 = T.arg("h0", T.buffer((batch, hidden), "float32"))
        c0 = T.arg("c0", T.buffer((batch, hidden), "float32")) if lstm else None
        y = T.arg("y", T.buffer((steps, batch, h_pad), "float32"))
        y_h = T.arg("y_h", T.buffer((batch, h_pad), "float32"))
        y_c = T.arg("y_c", T.buffer((batch, h_pad), "float32")) if lstm else None
        with T.sblock("root"):
            state = T.alloc_buffer((2, batch, h_pad), "float32")
            # GRU, two phases: z and r * h_prev, written in phase 1, read in phase 2.
            gate_z = T.alloc_buffer((batch, h_pad), "float32") if geom.two_phase else None
            reset_h = T.alloc_buffer((batch, h_pad), "float32") if geom.two_phase else None
            with _scope(cfg, "pragma_parallel_launch_point"):
                with _scope(cfg, BARRIER):  # (a barrier on an empty statement is dropped)
                    _initial_state(state, h0, y_c, c0, hidden)
                with T.serial(0, steps) as s:
                    t = steps - 1 - s if geom.reverse else s
                    step = _Step(geom, cfg, xp, state, y, y_c, rbias, gate_z, reset_h, s, t)
                    for phase, gates in enumerate(phases):
                        if phase == 1:
                            h_load = lambda b, k: reset_h[b, k]  # noqa: E731
                        else:
                            h_load = lambda b, k: state[s % 2, b, k]  # noqa: E731
                        _phase(step, phase, len(gates), weights[phase], h_load)
                with T.parallel(0, batch * h_pad) as i:
                    T.buffer_store(
                        y_h, state[steps % 2, i // h_pad, i % h_pad], [i // h_pad, i % h_pad]
                    )
    return ib.get().without_attr("global_symbol")


def _layout_unsupported(
    geom: RecurrentGeometry, cfg: RecurrentConfig, layout: BlockLayout
) -> str | None:
    units, cols = layout.block
    if min(units, cols) < 1 or cfg.width % units or cfg.width % cols:
        return f"block {layout.block} does not divide the tile of {cfg.width} units"
    if len(layout.blocks) != len(phase_gates(geom)):
        return f"{len(layout.blocks)} block counts for {len(phase_gates(geom))} phases"
    return None


def _stored_weights(
    geom: RecurrentGeometry, cfg: RecurrentConfig, layout: BlockLayout | None
) -> int:
    """Multiply-adds per batch row and step: the stored weights (blocks zero-padded)."""
    if layout is None:
        return geom.gates * geom.hidden * geom.hidden
    return sum(layout.blocks) * layout.block[0] * layout.block[1]


def _weight_args(
    geom: RecurrentGeometry, cfg: RecurrentConfig, layout: BlockLayout | None
) -> list[tirx.Buffer | tuple[tirx.Buffer, ...]]:
    """The packed weight's arguments, per phase: a buffer (dense) or (ptr, col, values)."""
    tiles = hidden_padded(geom, cfg) // cfg.width
    phases = phase_gates(geom)
    if layout is None:
        shape = lambda g: (tiles, geom.hidden, len(g), cfg.width)  # noqa: E731
        return [T.arg(f"weight{i}", T.buffer(shape(g), "float32")) for i, g in enumerate(phases)]
    units, cols = layout.block
    args: list[tirx.Buffer | tuple[tirx.Buffer, ...]] = []
    for i, (gates, blocks) in enumerate(zip(phases, layout.blocks, strict=True)):
        rows = tiles * len(gates) * (cfg.width // units)
        stored = max(blocks, 1)
        args.append(
            (
                T.arg(f"block_ptr{i}", T.buffer((rows + 1,), "int32")),
                T.arg(f"block_col{i}", T.buffer((stored,), "int32")),
                T.arg(f"block_values{i}", T.buffer((stored, cols, units), "float32")),
            )
        )
    return args


def _initial_state(
    state: tirx.Buffer,
    h0: tirx.Buffer,
    y_c: tirx.Buffer | None,
    c0: tirx.Buffer | None,
    hidden: int,
) -> None:
    """state[0] = h0 and (LSTM) the cell = c0, zero in the padded units; parallel."""
    _, batch, h_pad = state.shape
    with T.parallel(0, batch * h_pad) as i:
        b, j = i // h_pad, i % h_pad
        inside = j < hidden
        col = tirx.min(j, hidden - 1)
        zero = tirx.const(0.0, "float32")
        T.buffer_store(state, tirx.if_then_else(inside, h0[b, col], zero), [0, b, j])
        if y_c is not None:
            T.buffer_store(y_c, tirx.if_then_else(inside, c0[b, col], zero), [b, j])


def _phase(
    step: _Step,
    phase: int,
    gates: int,
    weight: tirx.Buffer | tuple[tirx.Buffer, ...],
    h_load: Callable[..., tirx.PrimExpr],
) -> None:
    """One phase of a step: parallel over (unit tile, batch chunk), then a barrier."""
    cfg, batch = step.cfg, step.geom.batch
    tiles = hidden_padded(step.geom, cfg) // cfg.width
    with _scope(cfg, BARRIER):
        for start, count, rows in _batch_chunks(batch, cfg.rows):
            with _jobs(tiles * count) as job:
                tile, b0 = job // count, start + job % count * rows
                accs = [accumulator_rows(gates, cfg.width) for _ in range(rows)]
                h_rows = [b0 + r for r in range(rows)]
                if isinstance(weight, tuple):
                    _block_matvec(accs, h_load, h_rows, weight, tile, cfg)
                else:
                    _zero(accs, cfg)
                    _dense_matvec(accs, h_load, h_rows, weight, tile, cfg, step.geom.hidden)
                for r in range(rows):
                    for v in range(cfg.vectors):
                        step.gates_out(phase, accs[r], b0 + r, tile * cfg.width + v * cfg.lanes, v)


@contextlib.contextmanager
def _scope(cfg: RecurrentConfig, pragma: str) -> Iterator[None]:
    """The launch-point / barrier pragma around a statement (nothing without ``one_launch``)."""
    if cfg.one_launch:
        with T.attr(0, pragma, 1):
            yield
    else:
        yield


@contextlib.contextmanager
def _jobs(count: int) -> Iterator[tirx.Var]:
    """A parallel loop over ``count`` jobs inside the launch. A loop of one iteration would be
    simplified away and its body run by every thread (a race on LSTM's in-place cell): it
    becomes two iterations, the second skipped."""
    with T.parallel(0, max(count, 2)) as job:
        if count > 1:
            yield job
        else:
            with T.If(job < count), T.Then():
                yield job
