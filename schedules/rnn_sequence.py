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
``r * h`` to scratch; barrier; n and the new state). The recurrent weight is packed per tile as
(tiles, K, gates, vectors * lanes) by ``pack_recurrent_weight``: each k of the step's matvec
reads one contiguous run of gates x tile width (``_dense_matvec``, the one place that knows the
weight is dense, so a block-sparse ``W_hh`` can replace it). The outputs are ``hidden_padded``
wide; the caller slices them when H is not a multiple of the tile width.

Sigmoid and tanh use a vectorized exp (Cephes-style range reduction and polynomial, as TVM's
``topi.fast_exp``), NaN kept: |error| < 2e-7 against float64 over [-20, 20] for both.

Measured on Intel Xeon (AVX-512, 2 cores), GRU, T=100, batch 1, the build's own default knobs:
one launch with a barrier per step against a launch per step (``one_launch=False``), 2 threads
(1 thread in brackets): H=1024 23.5 vs 28.4 ms (46 ms), H=256 0.33 vs 0.38 ms (0.51 ms), H=64
0.057 vs 0.113 ms (0.042 ms); a barrier costs ~0.13 us, a launch ~0.9 us. At H=1024 each step
streams the 12.6 MB ``W_hh`` (larger than both L2s) at ~54 GB/s: the memory bound, where
ONNX Runtime is too. Build: ~0.1-0.2 s per kernel (intermediates kept in ``keep`` buffers;
with ``T.Bind`` the build's analysers substitute them back: 16-120 s for an LSTM).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .buffers import accumulator_rows, allocated_view
from .epilogue import clamp

CELLS = {"gru": 3, "lstm": 4, "rnn": 1}  # gates per cell, in ONNX order: zrh / iofc / i
# TVM's CPU codegen: after the statement it wraps, every thread of the launch waits for all.
BARRIER = "pragma_parallel_barrier_when_finish"
ACCUMULATOR_REGISTERS = 24  # of AVX-512's 32 vector registers, the rest for weights / h


@dataclass(frozen=True)
class RecurrentGeometry:
    """One direction of one recurrent layer: ``steps`` x ``batch`` inputs, ``hidden`` units."""

    cell: str
    steps: int
    batch: int
    hidden: int
    reverse: bool = False
    linear_before_reset: bool = True  # GRU only

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    @property
    def two_phase(self) -> bool:
        """GRU with ``linear_before_reset=0``: ``R_n`` applies to ``r * h``, a second phase."""
        return self.cell == "gru" and not self.linear_before_reset


RECURRENT_ATTR = "tvm_sparse.recurrence"  # the kernel's geometry, for the compile report


def describe_recurrence(geom: RecurrentGeometry) -> str:
    """``"gru 1024 hidden, 100 steps x batch 1, reverse"``: the report's shape of a layer."""
    reverse = ", reverse" if geom.reverse else ""
    return f"{geom.cell} {geom.hidden} hidden, {geom.steps} steps x batch {geom.batch}{reverse}"


def recurrence_flops(geom: RecurrentGeometry) -> int:
    """2 x the multiply-adds of the recurrent weight over every step (h x W_hh^T)."""
    return 2 * geom.steps * geom.batch * geom.gates * geom.hidden * geom.hidden


@dataclass(frozen=True)
class RecurrentConfig:
    """Knobs: vector lanes, vectors of hidden units per tile, batch rows per register tile."""

    lanes: int = 16
    vectors: int = 4
    rows: int = 1
    one_launch: bool = True  # False: a thread-pool launch per phase, no barriers

    @property
    def width(self) -> int:
        return self.lanes * self.vectors


def default_recurrent_config(
    geom: RecurrentGeometry, lanes: int = 16, cores: int = 2
) -> RecurrentConfig:
    """Batch rows first (each row reuses the tile's weights), then as many vectors as the
    accumulators allow, but no wider than leaves every core a tile."""
    rows = min(geom.batch, 4)
    vectors = max(1, min(4, ACCUMULATOR_REGISTERS // (geom.gates * rows)))
    vectors = min(vectors, max(1, math.ceil(geom.hidden / lanes / cores)))
    return RecurrentConfig(lanes=lanes, vectors=vectors, rows=rows)


def hidden_padded(geom: RecurrentGeometry, cfg: RecurrentConfig) -> int:
    """Hidden units rounded up to whole tiles: the width of ``xp`` per gate and of the outputs."""
    return math.ceil(geom.hidden / cfg.width) * cfg.width


def recurrent_unsupported(geom: RecurrentGeometry, cfg: RecurrentConfig) -> str | None:
    """Why the kernel cannot take this layer, or None."""
    if geom.cell not in CELLS:
        return f"unknown recurrent cell {geom.cell!r} (one of {', '.join(CELLS)})"
    if min(geom.steps, geom.batch, geom.hidden) < 1:
        return f"empty sequence, batch or hidden size ({geom})"
    if cfg.lanes < 1 or cfg.vectors < 1 or cfg.rows < 1:
        return f"invalid config {cfg}"
    return None


def _phase_gates(geom: RecurrentGeometry) -> list[list[int]]:
    """The gates (ONNX order) whose ``h @ R^T`` each phase computes."""
    if geom.two_phase:
        return [[0, 1], [2]]
    return [list(range(geom.gates))]


def pack_recurrent_weight(
    weight: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig
) -> list[np.ndarray]:
    """``R`` (gates * H, H) -> one array per phase, (tiles, H, phase gates, width), zero-padded
    units: what ``_dense_matvec`` streams (a tile's slab is contiguous, k-major)."""
    h, h_pad = geom.hidden, hidden_padded(geom, cfg)
    per_gate = weight.reshape(geom.gates, h, h).astype("float32")
    padded = np.zeros((geom.gates, h_pad, h), "float32")
    padded[:, :h, :] = per_gate
    packed = []
    for gates in _phase_gates(geom):
        sel = padded[gates].reshape(len(gates), h_pad // cfg.width, cfg.width, h)
        packed.append(np.ascontiguousarray(sel.transpose(1, 3, 0, 2)))
    return packed


def pad_gate_rows(values: np.ndarray, geom: RecurrentGeometry, cfg: RecurrentConfig) -> np.ndarray:
    """(gates * H, ...) -> (gates * hidden_padded, ...), zeros in the padding: for ``W_ih`` and
    the input projection's bias, so ``xp``'s gate blocks line up with the kernel's tiles."""
    h, h_pad = geom.hidden, hidden_padded(geom, cfg)
    per_gate = values.reshape(geom.gates, h, *values.shape[1:])
    pad = [(0, 0), (0, h_pad - h)] + [(0, 0)] * (values.ndim - 1)
    return np.pad(per_gate, pad).reshape(geom.gates * h_pad, *values.shape[1:])


def _const(value: float, lanes: int) -> tirx.PrimExpr:
    return tirx.Broadcast(tirx.const(value, "float32"), lanes)


# topi.fast_exp's constants: exp(x) = 2^n * p(x - n ln 2), n = round(x / ln 2).
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2)
_EXP_POLY += (1.6666665459e-1, 5.0000001201e-1)


def keep(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """``value`` stored to a new register-sized stack buffer and read back (inside a kernel
    being built). The gate math reuses values; ``T.Bind`` would make the analysers of the
    build substitute them back, exponentially (LSTM: 16 s for hidden 13); LLVM keeps these
    buffers in registers."""
    slot = allocated_view((value.ty.dtype.lanes,), str(value.ty.dtype.with_lanes(1)))
    at = tirx.Ramp(0, 1, value.ty.dtype.lanes)
    T.buffer_store(slot, value, [at])
    return slot[at]


def vector_exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``exp(x)`` of a float32 vector in vector instructions (NaN in, NaN out)."""
    lanes = x.ty.dtype.lanes
    x = keep(clamp(keep(x), -88.3762626647949, 88.3762626647950))
    n = keep(tirx.floor(x * _const(1.4426950408889634, lanes) + _const(0.5, lanes)))
    r = keep(x - n * _const(0.6931471805599453, lanes))
    poly = _const(_EXP_POLY[0], lanes)
    for coef in _EXP_POLY[1:]:
        poly = poly * r + _const(coef, lanes)
    y = poly * r * r + r + _const(1.0, lanes)
    exponent = tirx.Cast(f"int32x{lanes}", n) + tirx.Broadcast(tirx.const(127, "int32"), lanes)
    shifted = tirx.shift_left(exponent, tirx.Broadcast(tirx.const(23, "int32"), lanes))
    return keep(y * tirx.reinterpret(f"float32x{lanes}", shifted))


def vector_sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    lanes = x.ty.dtype.lanes
    return keep(_const(1.0, lanes) / (_const(1.0, lanes) + vector_exp(-x)))


def vector_tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``2 sigmoid(2x) - 1`` (absolute error ~1e-7, which is float32's resolution near 1)."""
    lanes = x.ty.dtype.lanes
    return keep(_const(2.0, lanes) * vector_sigmoid(x * _const(2.0, lanes)) - _const(1.0, lanes))


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
                    acc, _const(0.0, cfg.lanes), [tirx.Ramp(v * cfg.lanes, 1, cfg.lanes)]
                )


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
    geom: RecurrentGeometry, cfg: RecurrentConfig | None = None, name: str = "rnn_sequence"
) -> tirx.PrimFunc:
    """Arguments: xp (T*B, gates * Hp) (rows t*B + b), one packed weight per phase
    (``pack_recurrent_weight``), [GRU linear_before_reset=1: rbias_n (Hp,)], h0 (B, H),
    [LSTM: c0 (B, H)], then the outputs Y (T, B, Hp), Y_h (B, Hp), [LSTM: Y_c (B, Hp)];
    Hp = ``hidden_padded``."""
    cfg = cfg or default_recurrent_config(geom)
    reason = recurrent_unsupported(geom, cfg)
    if reason is not None:
        raise ValueError(reason)
    steps, batch, hidden = geom.steps, geom.batch, geom.hidden
    h_pad = hidden_padded(geom, cfg)
    tiles = h_pad // cfg.width
    phases = _phase_gates(geom)
    lstm = geom.cell == "lstm"
    has_rbias = geom.cell == "gru" and geom.linear_before_reset

    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        # Final (``tirx.is_scheduled``); opaque so Relax fuses nothing into it.
        T.func_attr(
            {
                "tir.noalias": True,
                "op_pattern": 8,
                "tirx.is_scheduled": True,
                RECURRENT_ATTR: {
                    "cell": geom.cell,
                    "steps": steps,
                    "batch": batch,
                    "hidden": hidden,
                    "reverse": int(geom.reverse),
                },
            }
        )
        xp = T.arg("xp", T.buffer((steps * batch, geom.gates * h_pad), "float32"))
        weights = [
            T.arg(f"weight{i}", T.buffer((tiles, hidden, len(g), cfg.width), "float32"))
            for i, g in enumerate(phases)
        ]
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
    weight: tirx.Buffer,
    h_load: Callable[..., tirx.PrimExpr],
) -> None:
    """One phase of a step: parallel over (unit tile, batch chunk), then a barrier."""
    cfg, batch = step.cfg, step.geom.batch
    tiles = weight.shape[0]
    with _scope(cfg, BARRIER):
        for start, count, rows in _batch_chunks(batch, cfg.rows):
            with _jobs(tiles * count) as job:
                tile, b0 = job // count, start + job % count * rows
                accs = [accumulator_rows(gates, cfg.width) for _ in range(rows)]
                _zero(accs, cfg)
                _dense_matvec(
                    accs, h_load, [b0 + r for r in range(rows)], weight, tile, cfg, step.geom.hidden
                )
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
