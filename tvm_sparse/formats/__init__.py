"""Sparse weight formats: detection from dense weights, packing, exact round trip."""

from .pattern import PatternWeight, pattern_library
from .sparsity import ConvSparsity, choose_conv_format, conv_sparsity

__all__ = [
    "ConvSparsity",
    "PatternWeight",
    "choose_conv_format",
    "conv_sparsity",
    "pattern_library",
]
