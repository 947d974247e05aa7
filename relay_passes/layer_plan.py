"""LayerPlan: what one conv2d / matmul layer becomes, decided once before any rewrite.

A plan holds the layer's format, its packed weight, the kernel that runs it and that kernel's
config, with the reason; the rewrite passes only emit what the plan says
(``plan_layers.planned_rewrite``) and the compile report is the plans' rows
(``LayerPlan.record``). ``plan_layers`` makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax

from tvm_sparse.formats.block import CostTable
from tvm_sparse.report import LayerRecord

from .epilogue import EpilogueMatch

# The kernels a plan can name, each emitted by one pass.
# RewriteConv2D:
CONV_KERNELS = ("pattern", "lanes", "conv_gemm", "dense_conv", "depthwise", "winograd")
BLOCK_CONV_KERNELS = ("bsr_conv1x1",)  # RewriteBSRConv1x1
BLOCK_LINEAR_KERNELS = ("bsr_matmul",)  # RewriteBSRMatmul
LINEAR_KERNELS = ("linear_gemm", "gemv")  # RewriteDenseMatmul
LEFT_TO_TVM = "tvm"


@dataclass(frozen=True)
class PlanTarget:
    """What the decisions read from the target: fp32 lanes and vector registers, cores, the
    block-format cost table (None: no block formats) and whether sparsity is used at all."""

    lanes: int = 16
    registers: int = 32
    cores: int = 1
    costs: CostTable | None = None
    sparse: bool = True


@dataclass
class LayerPlan:
    """One layer's decision: ``kernel`` (one of the ``*_KERNELS`` or ``"tvm"``) runs
    ``packing`` (the packed weight arrays) with ``config``; ``geometry`` is the layer's shape as
    that kernel takes it; ``block_note`` says why a block format was not chosen."""

    index: int
    op: str
    shape: str
    format: str
    kernel: str
    reason: str
    density: float = 1.0
    flops_dense: int = 0
    flops_kept: int = 0
    geometry: Any = None
    packing: Any = None
    config: Any = None
    block_note: str = ""
    epilogue: str = ""  # what the rewrite fused, filled in when it is emitted

    def record(self) -> LayerRecord:
        """The report row."""
        reason = f"{self.block_note}; {self.reason}" if self.block_note else self.reason
        return LayerRecord(
            name=f"{self.op}_{self.index}",
            op=self.op,
            shape=self.shape,
            format=self.format,
            density=self.density,
            flops_dense=self.flops_dense,
            flops_kept=self.flops_kept,
            reason=reason,
            epilogue=self.epilogue,
        )


Plans = dict[relax.Var, LayerPlan]
PlanEmit = Callable[[relax.BlockBuilder, EpilogueMatch, Callable, LayerPlan], relax.Expr]


def planned_calls(mod: tvm.IRModule, plans: Plans) -> dict[relax.Call, LayerPlan]:
    """The plans by the calls now bound to their vars in ``mod`` (earlier rewrites replace the
    calls whose operands they changed, but keep the vars)."""
    calls = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    if binding.var in plans:
                        calls[binding.value] = plans[binding.var]
    return calls
