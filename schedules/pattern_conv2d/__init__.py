"""Pattern-sparse conv2d (NCHW, OIHW weight packed as ``PatternWeight``): TIR kernel generator.

Modules: ``config`` (the knobs), ``heuristics`` (default knobs and the measurements behind
them), ``tiling`` (layout math), ``staging`` (input staging TIR), ``emit`` (the kernel's TIR),
``template`` (the MetaSchedule template and search space).

The kernel is generated per layer with the layer's patterns baked in: each pattern is one code
path whose tap offsets ``(dy, dx)`` are compile-time constants, so the inner loop loads one input
channel index and the pattern's weights per kernel, then does ``taps x rows`` vector FMAs over an
output tile of ``rows x padded width``. A dense conv is the same kernel with one full pattern.

Structure (per image)::

    parallel for share h (one per core: a contiguous run of the (row tile, column tile, packed
                          filter) jobs, the split TVM's static schedule would make):
        pad[h, c, phase, Y, q] = the zero-padded input rows the share's tiles read, all
                                 channels, columns split by stride phase (contiguous loads)
        for job (tile, i) of the share:
            acc[rows, width] = 0
            for pattern p:                   # unrolled in Python: one code path per pattern
                for k in kernel_ptr[i, p] .. kernel_ptr[i, p + 1]:
                    c = kernel_channel[k]; w_t = kernel_values[k, t]
                    for r (unrolled), x (vectorized):    # s: stride
                        acc[r, x] += sum_t w_t * pad[h, c, dx_t % s, (y0+r)*s + dy_t, x + dx_t // s]
            out[filter_order[i], y0 + r, :W] = act(acc + bias[i] (+ residual))

Each core stages the rows it reads itself (the two tiles at a share boundary read a few rows
both stage): its reads stay in its own L2, and there is one parallel region per call, no
barrier between staging and compute. Staged over channels by all cores instead, half of each
core's reads came from the other core's cache: 4-20 % slower on ResNet-18's layers here.

Filters whose kernel lists are identical (same channels, same pattern per channel: a dense conv,
or connectivity + patterns pruned per group of filters) are packed in aligned groups; the kernel
then computes ``filters`` of them together, so each input vector load feeds that many FMAs
(PatDNN's load-redundancy elimination across filters).

Staged rows are as wide as the columns valid outputs read, rounded up to a cache line, where
that is less than the vectors' reach (whole-row tiles): the spare lanes of a row's last vector
read the next row and are never stored (``staged_width``).

Rows of enough vectors (``segment_min_vectors``) are staged lane-segmented (``segmented``; the
dimension-lifted transposition of Henretty et al., PACT 2011, for stencils): lane l of vector j
computes output column ``S * l + j`` (S vectors per row), and lane l of segmented vector q of
an input row holds column ``S * l + q``, so tap dx of vector j reads vector ``j + dx``: for q <
S one aligned load of the staged vector, shared by every vector and tap with the same ``j +
dx``, and past those (q = S + i is vector i moved one lane down) a lane shift of a loaded one
in registers (a 3-wide kernel: S loads and 2 shifts per input row, not 3 S loads of which 2 S
split across cache lines). Each staged vector is one shuffle of the input row's vectors (and
zeros for the padding), so staging is a transposition that takes no more memory than the
input; the accumulators are transposed back likewise before the epilogue.

A layer may read its input already staged and write its output in the next layer's staged
layout (``StagedLayout``, ``staged_input`` / ``staged_output``; paired by
``relay_passes.staged_layout``): the consumer then stages nothing, and the producer's
epilogue writes each staged vector as one shuffle of its finished accumulators instead of
transposing them back to NCHW.

Memory: a tile's input rows over all channels outgrow L1 (64 KiB at 128 channels of 28x28), and
a job reads its kernels' channels in an order no hardware prefetcher follows, so the kernel
prefetches the rows of the kernel ``prefetch`` ahead. Narrow outputs (<= 7 columns at 16 lanes)
``fold`` several output rows into one vector: rows are staged ``vector // fold`` wide, by phase
of the stride, and the right padding is read from the next row's left padding.

The schedule knobs (``PatternConvConfig``): rows and columns per tile, vector width, filters
computed together (grouped packings), the input staging layout, the loop order, prefetch
distance and fold. The order above keeps a filter's whole reduction in registers;
``channel_block`` > 0 puts the reduction over input channels outside instead, in blocks of that
many channels, so every filter of a parallel share reads the block's input rows while they are
in L1 (partial sums kept in a buffer between blocks). Each (filter, pattern) run is sorted by
channel, so a block's kernels are the next ones of the run: a per-run cursor walks them and the
packed layout is the same for both orders.
"""

from ..buffers import STACK_BYTES
from ..epilogue import EPILOGUE_ACTIVATIONS, Epilogue, activation
from ..geometry import ConvGeometry
from .config import PatternConvConfig
from .emit import pattern_conv2d_primfunc
from .heuristics import (
    SEGMENT_MIN_VECTORS,
    default_config,
    segment_min_vectors,
    tile_defaults,
)
from .template import (
    PATTERN_CONV2D,
    config_knobs,
    knobs_config,
    layer_params,
    params_geometry,
    pattern_conv2d_template,
    template_input_layout,
    with_staged_layouts,
)
from .tiling import (
    StagedLayout,
    Tiling,
    folded_rows,
    prefetch_lines,
    segmented_vector,
    staged_layout,
    staged_width,
    tap_offset,
    tiling,
)

__all__ = [
    "EPILOGUE_ACTIVATIONS",
    "PATTERN_CONV2D",
    "SEGMENT_MIN_VECTORS",
    "STACK_BYTES",
    "ConvGeometry",
    "Epilogue",
    "PatternConvConfig",
    "StagedLayout",
    "Tiling",
    "activation",
    "config_knobs",
    "default_config",
    "folded_rows",
    "knobs_config",
    "layer_params",
    "params_geometry",
    "pattern_conv2d_primfunc",
    "pattern_conv2d_template",
    "prefetch_lines",
    "segment_min_vectors",
    "segmented_vector",
    "staged_layout",
    "staged_width",
    "tap_offset",
    "template_input_layout",
    "tile_defaults",
    "tiling",
    "with_staged_layouts",
]
