"""Pruning toolkit (PyTorch side): pattern + connectivity + block sparsity, ADMM, reports.

prune -> fine-tune -> compile: build constraints (:func:`pattern_constraints`, or
:class:`BSRConstraint` / :class:`BCRConstraint` for FC and 1x1 layers), train with
:class:`ADMMPruner` in your own loop, ``hard_prune()``, fine-tune under a :class:`MaskEnforcer`,
check :func:`sparsity_report`, then ``tvm_sparse.compile``. :func:`block_prune_` block-prunes
the matrices of Linear, GRU / LSTM / RNN and attention layers in one call.
"""

from .admm import ADMMPruner
from .blocks import bcr_mask, bsr_mask, project_bcr, project_bsr
from .connectivity import connectivity_mask, num_kept, project_connectivity
from .constraints import (
    BCRConstraint,
    BSRConstraint,
    ConnectivityConstraint,
    Constraint,
    PatternConstraint,
    pattern_constraints,
    pattern_convs,
    project_model,
)
from .masks import MaskEnforcer
from .modules import block_prune_, prunable_matrices
from .patterns import (
    Pattern,
    candidate_patterns,
    extract_pattern_library,
    pattern_mask,
    project_patterns,
)
from .report import BlockSparsity, SparsityReport, block_sparsity, sparsity_report

__all__ = [
    "ADMMPruner",
    "BCRConstraint",
    "BSRConstraint",
    "BlockSparsity",
    "ConnectivityConstraint",
    "Constraint",
    "MaskEnforcer",
    "Pattern",
    "PatternConstraint",
    "SparsityReport",
    "bcr_mask",
    "block_prune_",
    "block_sparsity",
    "bsr_mask",
    "candidate_patterns",
    "connectivity_mask",
    "extract_pattern_library",
    "num_kept",
    "pattern_constraints",
    "pattern_convs",
    "pattern_mask",
    "prunable_matrices",
    "project_bcr",
    "project_bsr",
    "project_connectivity",
    "project_model",
    "project_patterns",
    "sparsity_report",
]
