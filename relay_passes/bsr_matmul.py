"""RewriteBSRMatmul: ``relax.matmul(x, W)`` with a block-sparse constant weight -> BSR kernel.

Takes the linear layers ``RewriteDenseMatmul`` would take (x of any rank, its leading dims,
tokens x batch, being the rows; a constant 2-D float32 weight ``(K, N)`` as folded from
``linear``) whose weight, viewed as ``(N, K)``, is block-sparse enough that the BSR kernel is
estimated faster than the dense one (``formats.block.choose_block_format`` with the target's
cost table; the block shape is detected from the weight). The matmul and its epilogue (bias,
residual add, ReLU / ReLU6) become one ``call_tir`` to ``schedules.bsr_matmul``. Everything
else is left as it is, for RewriteDenseMatmul (which runs after this pass); ``notes`` get why
such a layer stayed dense.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from schedules.bsr_matmul import bsr_matmul_primfunc, default_bsr_matmul_config
from schedules.pattern_conv2d import Epilogue
from tvm_sparse.formats.block import (
    BlockChoice,
    CostTable,
    choose_block_format,
    pack_block_weight,
)
from tvm_sparse.report import LayerRecord

from .block_choice import BlockDecisions, block_kernel_args
from .dense_matmul import GEMM_MIN_ROWS, linear_unsupported
from .epilogue import EpilogueMatch, describe
from .rewrite import anchored_rewrite_pass
from .utils import add_kernel, const_value, static_shape

NOT_CHOSEN = "kept dense: "
# Over tokens a block format must be estimated this much faster than the dense GEMM. The table's
# BSR kernels run on weights that stay in cache; a model's do not: a 4-layer encoder (768 / 3072,
# 128 tokens) at 50 % of 16x1 blocks was estimated 1.12x faster than dense and ran 0.92x in the
# model (19.6 vs 18.0 ms, AMD Zen 5, AVX-512, 2 threads); at 80 % and 90 % BSR is 2-4x faster.
LINEAR_MARGIN = 1.25


def matmul_shape(call: relax.Call) -> str:
    """The report's shape text for a matmul (the same as RewriteDenseMatmul's)."""
    *lead, k = static_shape(call.args[0])
    return f"{k}x{static_shape(call.args[1])[1]} (batch {math.prod(lead)})"


def RewriteBSRMatmul(  # noqa: N802 (TVM's pass naming)
    costs: CostTable,
    records: list[LayerRecord] | None = None,
    num_threads: int = 1,
    notes: list[tuple[str, str, str]] | None = None,
) -> tvm.transform.Pass:
    """The pass. ``notes`` collects (op, shape, reason) for FC layers left dense by cost."""
    records = records if records is not None else []
    notes = notes if notes is not None else []
    kernels: dict[tuple, tvm.ir.GlobalVar] = {}

    def choose(call: relax.Call) -> tuple[BlockChoice, np.ndarray]:
        matrix = const_value(call.args[1]).astype(np.float32).T  # (N, K)
        m = math.prod(static_shape(call.args[0])[:-1])
        # over tokens the dense alternative is the GEMM: its own measured kinds where the table
        # has them ("linear_*", with LINEAR_MARGIN), else the batch-1 ones
        if m >= GEMM_MIN_ROWS and "linear_dense" in costs.entries:
            choice = choose_block_format(matrix, costs, "linear", m, margin=LINEAR_MARGIN)
        else:
            choice = choose_block_format(matrix, costs, "fc", work=m)
        return choice, matrix

    decisions = BlockDecisions(
        "matmul", linear_unsupported, choose, matmul_shape, NOT_CHOSEN, notes
    )

    def emit(bb: relax.BlockBuilder, match: EpilogueMatch, visit) -> relax.Expr:
        call = match.anchor
        choice, matrix = decisions.decide(call)
        *lead, k = static_shape(call.args[0])
        lead, m, n = tuple(lead), math.prod(lead), matrix.shape[0]
        cfg = default_bsr_matmul_config(m, num_threads)
        fmt = choice.format
        packed, kept = pack_block_weight(matrix, fmt, choice.block, cfg.shares)
        epi = Epilogue(match.bias is not None, match.residual is not None, match.activation)
        r, c = choice.block
        name = f"{fmt}_matmul_{k}x{n}_{r}x{c}"
        kernel = add_kernel(
            bb, kernels, (lead, k, n, choice.block, packed.num_blocks, epi, cfg, kept), name,
            lambda: bsr_matmul_primfunc(
                lead, k, n, choice.block, packed.num_blocks, epi, cfg, name, kept
            ),
        )  # fmt: skip
        args = block_kernel_args(match, visit, packed, r, n)
        records.append(
            LayerRecord(
                name=f"matmul_{len(records)}",
                op="matmul",
                shape=matmul_shape(call),
                format=fmt,
                density=float((matrix != 0).mean()),
                flops_dense=2 * m * k * n,
                flops_kept=2 * m * packed.num_blocks * (math.prod(kept or choice.block)),
                reason=choice.reason,
                epilogue=describe(match),
            )
        )
        return relax.call_tir(kernel, args, relax.TensorType((*lead, n), "float32"))

    return anchored_rewrite_pass(
        "RewriteBSRMatmul", "relax.matmul", decisions.unsupported, emit, channel_axis=-1,
        on_fallback=decisions.fallback,
    )  # fmt: skip
