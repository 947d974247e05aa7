"""FuseAttention: scaled dot-product attention as one ``call_tir`` to ``schedules.attention``.

The chain matched (what ``torch.export`` makes of ``scaled_dot_product_attention`` and of
Hugging Face's eager attention, and what the ONNX importer makes of ``MatMul / Softmax /
MatMul``)::

    s = matmul(q, kt)              q (*lead, T, D), kt (*lead, D, S)
    [s = reshape(s)]
    [s = s * c | s / c]            c a scalar constant
    [s = s + mask]                 mask broadcastable to s
    p = softmax(s, axis=-1)
    [p = where(all(s == -inf) over keys, 0, p)]     PyTorch's all-masked-row rule
    [p = broadcast_to(p) | reshape(p)] ...
    out = matmul(p, v)             v (*lead, S, Dv)

becomes ``attention(q, kt, v[, mask])``: scores, softmax and ``p @ v`` per query tile without
the (heads, T, S) scores and probabilities in memory. q, kt and v are read in place from the
tensors their layout chains start from (``strided_view.trace_view``: the head split of a fused
QKV projection, its reshapes, permutes, ``take`` and scalar scalings are no copies). The
kernel carries its geometry (``ATTENTION_ATTR``) for the report. Other uses of the scores or
probabilities (attention weights returned to the caller) keep their own computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, rewrite_call, wildcard

from schedules.attention import AttentionShape, attention_primfunc
from schedules.dense_gemm import default_gemm_config
from schedules.operand_view import OperandView

from .strided_view import trace_view
from .utils import const_value, rewrite_functions, scalar_value, static_shape

ATTENTION_ATTR = "tvm_sparse.attention"


class _Patterns:
    """The chain's pattern and the sub-patterns the rewrite reads."""

    def __init__(self) -> None:
        self.q, self.kt, self.v, self.mask = wildcard(), wildcard(), wildcard(), wildcard()
        self.scale = is_const()
        self.scores = is_op("relax.matmul")(self.q, self.kt)
        x = self.scores | is_op("relax.reshape")(self.scores, wildcard())
        self.multiply = is_op("relax.multiply")(x, self.scale)
        self.divide = is_op("relax.divide")(x, self.scale)
        x = x | self.multiply | self.divide
        self.logits = x | is_op("relax.add")(x, self.mask)
        self.softmax = is_op("relax.nn.softmax")(self.logits)
        self.fixup = is_op("relax.where")(wildcard(), is_const(), self.softmax)
        p = self.softmax | self.fixup
        p = p | is_op("relax.broadcast_to")(p, wildcard())
        p = p | is_op("relax.reshape")(p, wildcard())
        self.root = is_op("relax.matmul")(p, self.v)


def _all_masked_rule(logits: DFPattern) -> DFPattern:
    """``not any(s != -inf)`` over the last axis, as torch.export decomposes it."""
    finite = is_op("relax.logical_not")(is_op("relax.equal")(logits, is_const()))
    any_finite = is_op("relax.max")(is_op("relax.astype")(finite))
    return is_op("relax.logical_not")(is_op("relax.astype")(any_finite))


def attention_unsupported(matches: dict, p: _Patterns) -> str | None:
    """Why the kernel cannot take a matched chain, or None."""
    shapes = [static_shape(matches[x]) for x in (p.q, p.kt, p.v, p.scores, p.root)]
    if any(s is None or len(s) < 3 for s in shapes):
        return "dynamic shapes or operands below rank 3"
    if any(matches[x].ty.dtype != "float32" for x in (p.q, p.kt, p.v)):
        return "dtype (only float32)"
    q, kt, v, scores, out = shapes
    if q[:-2] != kt[:-2] or q[-1] != kt[-2]:
        return f"q {q} and kt {kt} do not multiply head by head"
    heads = math.prod(q[:-2])
    if math.prod(v[:-2]) != heads or v[-2] != kt[-1] or math.prod(out[:-2]) != heads:
        return f"v {v} does not follow the scores {scores}"
    axis = int(matches[p.softmax].attrs.axis)
    if axis not in (-1, len(static_shape(matches[p.softmax])) - 1):
        return f"softmax over axis {axis}, not the keys"
    logits = static_shape(matches[p.logits])
    if logits is None or math.prod(logits[:-2]) != heads or logits[-2:] != scores[-2:]:
        return f"the mask makes the scores {logits}, not {scores}"
    if p.mask in matches and _mask_dims(matches[p.mask], logits) is None:
        return f"mask {static_shape(matches[p.mask])} does not broadcast to {logits}"
    return None


def _mask_dims(mask: relax.Expr, scores: tuple[int, ...]) -> tuple[int, int] | None:
    """(heads, queries) of the mask as the kernel reads it: each 1 (broadcast) or full."""
    shape = static_shape(mask)
    if shape is None or mask.ty.dtype != "float32" or len(shape) > len(scores):
        return None
    shape = (1,) * (len(scores) - len(shape)) + shape
    if shape[-1] != scores[-1] or shape[-2] not in (1, scores[-2]):
        return None
    lead, full = shape[:-2], scores[:-2]
    if any(d not in (1, f) for d, f in zip(lead, full, strict=True)):
        return None
    return (1 if all(d == 1 for d in lead) else math.prod(full)), shape[-2]


def _scale(matches: dict, p: _Patterns) -> float | None:
    """The scalar applied to the scores (1.0 without one), None if not a scalar."""
    if p.scale not in matches:
        return 1.0
    value = scalar_value(matches[p.scale])
    if value is None:
        return None
    return 1.0 / value if p.divide in matches else value


def FuseAttention(lanes: int = 16, registers: int = 32, cores: int = 1) -> tvm.transform.Pass:  # noqa: N802
    """The pass; ``lanes`` / ``registers`` size the register tiles, ``cores`` the jobs."""
    cfg = default_gemm_config(lanes, registers)

    @tvm.transform.module_pass(opt_level=0, name="FuseAttention")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        kernels: dict[AttentionShape, tvm.ir.GlobalVar] = {}

        def fuse(bb: relax.BlockBuilder, func: relax.Function) -> relax.Function:
            def kernel(shape: AttentionShape) -> tvm.ir.GlobalVar:
                if shape not in kernels:
                    name = f"attention_{len(kernels)}"
                    prim = attention_primfunc(shape, cfg, cores, name)
                    kernels[shape] = bb.add_func(prim.with_attr(ATTENTION_ATTR, _describe(shape)),
                                                 name)  # fmt: skip
                return kernels[shape]

            return _fuse(func, kernel)

        return rewrite_functions(mod, fuse)

    return transform


def _fuse(
    func: relax.Function, kernel: Callable[[AttentionShape], tvm.ir.GlobalVar]
) -> relax.Function:
    """``func`` with every supported chain a call to ``kernel(its shape)``."""
    p = _Patterns()
    var2val = relax.analysis.get_var2val(func)

    def rewrite(expr: relax.Expr, matches: dict) -> relax.Expr:
        scale = _scale(matches, p)
        if scale is None or attention_unsupported(matches, p) is not None:
            return expr
        safe = p.fixup in matches
        if safe and not _is_all_masked_rule(matches, p, var2val):
            return expr
        shape, sources, mask = _shape(matches, p, scale, safe, var2val)
        args = sources + ([mask] if mask is not None else [])
        out_ty = relax.TensorType(static_shape(matches[p.root]), "float32")
        return relax.call_tir(kernel(shape), args, out_ty)

    return rewrite_call(p.root, rewrite, func)


def _is_all_masked_rule(matches: dict, p: _Patterns, var2val: dict) -> bool:
    """The where's condition is the all-masked-row rule (over the keys) on these logits and its
    value is 0 (a scalar, or zeros of the scores' shape as torch.export folds them)."""
    where = matches[p.fixup]
    zero = const_value(where.args[1])
    if zero is None or np.any(zero):
        return False
    if not _all_masked_rule(wildcard()).match(where.args[0], var2val):
        return False

    def value(expr: relax.Expr) -> relax.Expr:
        return var2val.get(expr, expr)

    chain = [value(where.args[0])]  # logical_not, astype, max, astype, logical_not, equal
    for _ in range(5):
        chain.append(value(chain[-1].args[0]))
    reduce, equal = chain[2], chain[5]
    axes = [int(a) for a in reduce.attrs.axis] if reduce.attrs.axis is not None else []
    inf = scalar_value(equal.args[1])
    rank = len(static_shape(equal.args[0]) or ())
    return (
        axes in ([-1], [rank - 1]) and inf == float("-inf") and
        value(equal.args[0]).same_as(value(matches[p.logits]))
    )  # fmt: skip


def _operands(
    matches: dict, p: _Patterns, var2val: dict
) -> tuple[list[relax.Expr], list[OperandView], float]:
    """q, kt, v as views of the tensors their layout chains start from (the head split of a
    fused QKV projection is one), with the scalars multiplied on the way; v only where its
    columns stay contiguous (they are read as vectors)."""
    sources, views, scale = [], [], 1.0
    for x in (p.q, p.kt, p.v):
        source, view, factor = trace_view(matches[x], var2val)
        if x is p.v and view.col_stride != 1:
            source, view, factor = matches[x], OperandView.contiguous(static_shape(matches[x])), 1
        sources.append(source)
        views.append(view)
        scale *= factor
    return sources, views, scale


def _shape(
    matches: dict, p: _Patterns, scale: float, safe: bool, var2val: dict
) -> tuple[AttentionShape, list[relax.Expr], relax.Expr | None]:
    """The kernel's static facts, its q / kt / v sources, and the mask operand viewed as
    (heads, queries, keys)."""
    q, kt, v = (static_shape(matches[x]) for x in (p.q, p.kt, p.v))
    sources, (q_view, kt_view, v_view), factor = _operands(matches, p, var2val)
    out, scores = static_shape(matches[p.root]), static_shape(matches[p.logits])
    mask, dims = None, None
    if p.mask in matches:
        dims = _mask_dims(matches[p.mask], scores)
        mask = matches[p.mask]
        if dims[0] != 1 and static_shape(mask)[:-2] != scores[:-2]:
            mask = relax.op.broadcast_to(mask, (*scores[:-2], *static_shape(mask)[-2:]))
        mask = relax.op.reshape(mask, (dims[0], dims[1], scores[-1]))
    shape = AttentionShape(
        heads=math.prod(q[:-2]), queries=q[-2], keys=kt[-1], depth=q[-1], value_depth=v[-1],
        q=q_view, kt=kt_view, v=v_view, out_lead=out[:-2], scale=scale * factor,
        mask=dims, safe=safe,
    )  # fmt: skip
    return shape, sources, mask


def _describe(shape: AttentionShape) -> dict:
    return {
        "heads": shape.heads, "queries": shape.queries, "keys": shape.keys, "depth": shape.depth,
        "value_depth": shape.value_depth, "masked": int(shape.mask is not None),
    }  # fmt: skip
