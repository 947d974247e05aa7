"""Sparse weight formats: detection from dense weights, packing, exact round trip."""

from .block import (
    BlockChoice,
    BlockSparsity,
    BSRWeight,
    CostTable,
    block_sparsity,
    choose_block_format,
    load_cost_table,
)
from .pattern import PatternWeight, pattern_library
from .sparsity import ConvSparsity, choose_conv_format, conv_sparsity

__all__ = [
    "BSRWeight",
    "BlockChoice",
    "BlockSparsity",
    "ConvSparsity",
    "CostTable",
    "PatternWeight",
    "block_sparsity",
    "choose_block_format",
    "choose_conv_format",
    "conv_sparsity",
    "load_cost_table",
    "pattern_library",
]
