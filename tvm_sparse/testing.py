"""Synthetic pattern-sparse weights and models, for tests, benchmarks and the demo."""

from __future__ import annotations

import itertools
import os

import numpy as np

NOTEBOOK_QUICK_ENV = "TVM_SPARSE_NB_QUICK"


def notebook_quick() -> bool:
    """Whether the notebooks run on small budgets: ``TVM_SPARSE_NB_QUICK=1`` (the tests set it)."""
    return os.environ.get(NOTEBOOK_QUICK_ENV) == "1"


def centre_patterns(kernel: int = 3, taps: int = 4) -> list[tuple[int, ...]]:
    """All ``taps``-entry tap sets of a ``kernel x kernel`` window that contain the centre."""
    centre = (kernel * kernel) // 2
    return [p for p in itertools.combinations(range(kernel * kernel), taps) if centre in p]


def random_pattern_weight(
    out_channels: int,
    in_channels: int,
    kernel: int = 3,
    num_patterns: int = 8,
    kernel_keep: float = 0.28,
    taps: int = 4,
    seed: int = 0,
    filter_group: int = 1,
) -> np.ndarray:
    """An OIHW weight: ``num_patterns`` random tap patterns, ``kernel_keep`` of kernels kept
    (exactly that fraction of the (filter group, channel) pairs, rounded, at random places, as
    ``tvm_sparse.prune``'s global top-k keeps: a layer's FLOPs cut is the same for every seed).

    ``filter_group`` > 1: kept kernels and their patterns are drawn per group of that many
    consecutive filters (the structure ``tvm_sparse.prune``'s filter groups give).
    """
    rng = np.random.default_rng(seed)
    candidates = centre_patterns(kernel, min(taps, kernel * kernel))
    chosen = rng.choice(len(candidates), size=min(num_patterns, len(candidates)), replace=False)
    library = [candidates[i] for i in chosen]
    flat = np.zeros((out_channels, in_channels, kernel * kernel), dtype=np.float32)
    groups = -(-out_channels // filter_group)
    keep = np.zeros(groups * in_channels, dtype=bool)
    keep[rng.choice(keep.size, round(kernel_keep * keep.size), replace=False)] = True
    keep = keep.reshape(groups, in_channels)
    which = rng.integers(len(library), size=(groups, in_channels))
    keep, which = (np.repeat(a, filter_group, axis=0)[:out_channels] for a in (keep, which))
    scale = np.sqrt(2.0 / max(1.0, in_channels * kernel_keep * taps))
    for o, c in zip(*np.nonzero(keep), strict=True):
        pat = list(library[which[o, c]])
        flat[o, c, pat] = rng.standard_normal(len(pat)).astype(np.float32) * scale
    return flat.reshape(out_channels, in_channels, kernel, kernel)


def random_bsr(
    rows: int, cols: int, block: tuple[int, int], keep: float, seed: int | np.random.Generator
) -> np.ndarray:
    """(rows, cols) float32 with each (r, c) block kept with probability ``keep`` (``seed``: an
    int or a generator to draw from)."""
    rng = np.random.default_rng(seed)
    r, c = block
    mask = rng.random((-(-rows // r), -(-cols // c))) < keep
    mask = np.kron(mask, np.ones(block, bool))[:rows, :cols]
    return (rng.standard_normal((rows, cols)) * mask).astype("float32")


def pattern_prune_model_(
    model, num_patterns: int = 8, kernel_keep: float = 0.28, seed: int = 0, filter_group: int = 1
):
    """Replace every 3x3 conv weight (groups 1) of a torch model by a random pattern-sparse one
    (``filter_group``: kernels and patterns drawn per group of filters)."""
    import torch

    for i, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        out_ch, in_ch, kh, kw = module.weight.shape
        if (kh, kw) == (3, 3) and module.groups == 1:
            w = random_pattern_weight(
                out_ch, in_ch, 3, num_patterns, kernel_keep, seed=seed + i,
                filter_group=filter_group,
            )  # fmt: skip
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(w))
    return model


def randomize_batchnorm_(model, seed: int = 0):
    """Give every BatchNorm non-trivial running statistics and affine terms (tests BN folding)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model


def block_prune_model_(model, keep: float = 0.1, block: tuple[int, int] = (8, 1)):
    """Keep the largest ``keep`` fraction of (rows x cols) blocks of every 1x1 conv and FC weight.

    Uses the pruning toolkit's BSR projection; weights are treated as (out, in) matrices.
    """
    import torch

    from .prune import project_bsr

    for module in model.modules():
        is_1x1 = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
        if (is_1x1 and module.groups == 1) or isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            pruned = project_bsr(w.reshape(w.shape[0], -1), block, keep).reshape(w.shape)
            with torch.no_grad():
                module.weight.copy_(pruned)
    return model


def every_kernel_model(seed: int = 0):
    """A small net with a layer on each kind of tvm-sparse kernel (for 3x32x32 inputs): a dense
    7x7 stem conv (the few-channel dense kernel), a 3x3 max-pool, a 3x3 conv pruned per group
    of 16 filters (the filters-in-lanes kernel on AVX-512), a pattern-pruned stride-2 3x3 conv,
    a block-pruned 1x1 conv, a depthwise 3x3 conv, a block-pruned and a dense ``Linear``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def conv(*args, **kwargs) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(*args, **kwargs), nn.ReLU())

    return nn.Sequential(
        conv(3, 16, 7, 2, 3), nn.MaxPool2d(3, 2, 1),
        pattern_prune_model_(conv(16, 32, 3, padding=1), 8, 0.5, seed, filter_group=16),
        pattern_prune_model_(conv(32, 32, 3, 2, 1), 8, 0.3, seed + 1),
        block_prune_model_(conv(32, 64, 1), keep=0.2),
        conv(64, 64, 3, padding=1, groups=64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        block_prune_model_(nn.Sequential(nn.Linear(64, 64), nn.ReLU()), keep=0.2),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip


def pattern_conv_kernel(
    geom,
    weight: np.ndarray,
    epilogue=None,
    config=None,
    keep_zeros: bool = False,
    target="x86",
    staged_input=None,
    staged_output=None,
    lanes: int = 0,
    num_shares: int = 2,
):
    """Compile one layer's pattern conv kernel on its own (no Relax) for ``weight`` (OIHW).

    Returns ``(run, packed)``: ``run(x, bias=None, residual=None, out=None, index=...)`` calls
    the kernel (numpy or ``tvm.runtime.Tensor`` arguments; ``bias`` in the original filter
    order) and returns ``out``, a new ``tvm.runtime.Tensor`` unless given. ``index`` (default:
    the packed weight's): other (kernel_ptr, kernel_channel, kernel_values, filter_order)
    ``tvm.runtime.Tensor`` of the packed shapes, for diagnostic timings
    (``benchmarks/ab_kernel.py --diagnose``). ``staged_input`` / ``staged_output``: the kernel
    reads / writes that ``StagedLayout`` (``to_staged`` / ``from_staged`` convert).
    ``lanes``: the filters-in-lanes kernel (``schedules.pattern_conv2d_lanes``, ``config`` a
    ``LanesConfig``) with that many lanes, for weights whose filters share kernels in groups
    of it. ``num_shares``: the packing's filter shares (``PatternWeight.from_dense``).
    ``run.time(x, bias=None, residual=None, number=10, repeat=3)``: the seconds of each of
    ``repeat`` measurements of ``number`` calls, by TVM's ``time_evaluator``.
    """
    import tvm

    from schedules.pattern_conv2d import Epilogue, pattern_conv2d_primfunc
    from tvm_sparse.formats import PatternWeight
    from tvm_sparse.targets import resolve_target

    epilogue = epilogue or Epilogue()
    packed = PatternWeight.from_dense(weight, num_shares=num_shares, keep_zeros=keep_zeros)
    max_taps = packed.kernel_values.shape[1]
    if lanes:
        from schedules.pattern_conv2d_lanes import pattern_conv2d_lanes_primfunc

        func = pattern_conv2d_lanes_primfunc(
            geom, packed.patterns, packed.num_kernels, max_taps, lanes, epilogue, config
        )
    else:
        func = pattern_conv2d_primfunc(
            geom, packed.patterns, packed.num_kernels, max_taps, epilogue, config,
            filter_group=packed.filter_group, staged_input=staged_input,
            staged_output=staged_output,
        )  # fmt: skip
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=resolve_target(target)).jit()
    kernel = lib["main"]
    k = max(packed.num_kernels, 1)
    nonempty = packed.num_kernels > 0
    values = packed.kernel_values if nonempty else np.zeros((k, max_taps), "float32")
    if lanes:  # (lane_values pads an empty weight itself)
        values = packed.lane_values(lanes)
    index = [
        packed.kernel_ptr,
        packed.kernel_channel if nonempty else np.zeros(k, "int32"),
        values,
        packed.filter_order,
    ]
    index = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in index]
    out_shape = (geom.batch, geom.out_channels, geom.out_height, geom.out_width)
    if staged_output is not None:
        out_shape = staged_output.shape(geom.batch, geom.out_channels)

    def as_tensor(a):
        return (
            a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(a))
        )

    def arguments(x, bias, residual, out, index) -> list:
        args = [as_tensor(x), *index]
        if epilogue.bias:
            args.append(as_tensor(np.asarray(bias)[packed.filter_order]))
        if epilogue.residual:
            args.append(as_tensor(residual))
        out = out if out is not None else tvm.runtime.tensor(np.zeros(out_shape, "float32"))
        return [*args, out]

    def run(x, bias=None, residual=None, out=None, index=index):
        args = arguments(x, bias, residual, out, index)
        kernel(*args)
        return args[-1]

    def time(x, bias=None, residual=None, number: int = 10, repeat: int = 3) -> list[float]:
        args = arguments(x, bias, residual, None, index)
        timer = lib.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        return [float(t) for t in timer(*args).results]

    run.time = time
    return run, packed


def _staged_positions(layout) -> tuple[np.ndarray, np.ndarray]:
    """The positions of a staged row that hold data, and the data column each holds."""
    columns = np.array(layout.columns()) - layout.left
    at = np.nonzero((columns >= 0) & (columns < layout.width))[0]
    return at, columns[at]


def to_staged(x: np.ndarray, layout) -> np.ndarray:
    """An NCHW array in a ``StagedLayout`` (zero padding rows and columns)."""
    out = np.zeros(layout.shape(*x.shape[:2]), x.dtype)
    at, cols = _staged_positions(layout)
    rows = slice(layout.top, layout.top + x.shape[2])
    out[:, :, 0, rows][..., at] = x[..., cols]
    return out


def from_staged(y: np.ndarray, layout, height: int) -> np.ndarray:
    """The NCHW array a ``StagedLayout`` array holds."""
    at, cols = _staged_positions(layout)
    out = np.empty((*y.shape[:2], height, layout.width), y.dtype)
    out[..., cols] = y[:, :, 0, layout.top : layout.top + height][..., at]
    return out
