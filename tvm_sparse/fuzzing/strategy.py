"""The hypothesis strategy of ``ModelSpec`` (``model_specs``).

Draws shrink towards the first option of each ``sampled_from`` and towards small integers: the
plain cases come first, so hypothesis' shrunk failures read simply.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from .spec import Conv, Linear, ModelSpec, Pool, Residual, Sparsity, layer_output

ACTIVATIONS = ("none", "relu", "relu6", "leaky")
CHANNELS = (1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 24, 32, 48, 64)
FEATURES = (1, 2, 3, 5, 8, 10, 16, 17, 32)
BLOCKS = ((16, 1), (8, 1), (4, 1), (4, 4), (1, 1), (8, 8), (16, 16))
KINDS = ("conv", "conv", "pool", "residual", "chain")  # feature layers (wide maps: chains first)
MAX_FLATTEN = 2048  # flatten only maps of at most this many values (else mean)


def _sparsity(draw, kernel: int, groups: int) -> Sparsity:
    """A pruning fit for a conv (``kernel`` > 0) or a linear layer (``kernel`` 0)."""
    kinds = ["dense", "unstructured", "zero"]
    if groups == 1:
        kinds += ["filters"]
        kinds += ["pattern"] * (kernel > 0)
        kinds += ["bsr", "bcr"] * (kernel in (0, 1))
        kinds = ["pattern"] * (kernel == 3) + kinds  # the main case first
    kind = draw(st.sampled_from(kinds))
    if kind == "pattern":
        return Sparsity(
            kind,
            keep=draw(st.sampled_from((0.28, 0.05, 0.5, 0.75, 1.0))),
            patterns=draw(st.sampled_from((8, 1, 2, 4, 12, 40))),
            taps=draw(st.sampled_from((4, 1, 2, 3, 5, 9))) if kernel == 3 else
            draw(st.sampled_from((1, 2, 4))),
            group=draw(st.sampled_from((1, 2, 4, 8, 16))),
        )  # fmt: skip
    if kind in ("bsr", "bcr"):
        block = draw(st.sampled_from(BLOCKS))
        return Sparsity(kind, keep=draw(st.sampled_from((0.1, 0.05, 0.3, 0.6))), block=block)
    if kind in ("unstructured", "filters"):
        return Sparsity(kind, keep=draw(st.sampled_from((0.3, 0.05, 0.7, 0.95))))
    return Sparsity(kind)


def _padding(draw, size: int, span: int) -> int:
    """A padding with ``size + 2 * padding >= span``, at most ``span // 2 + 2`` (or what it
    needs)."""
    least = max(0, -(-(span - size) // 2))
    return draw(st.integers(least, max(least, span // 2 + 2)))


def _conv(
    draw,
    shape: tuple[int, int, int],
    same: bool = False,
    stride: int | None = None,
    plain: bool = False,
) -> Conv:
    """A conv on a (channels, height, width) map; ``same``: size-preserving padding (at stride
    1) and no dilation (residual bodies); ``stride``: fixed, else drawn; ``plain``: groups 1."""
    c, h, w = shape
    kernel = draw(st.sampled_from((3, 1) if same else (3, 1, 7, 5, 2)))
    grouping = "1" if plain else draw(st.sampled_from(("1", "1", "1", "depthwise", "grouped")))
    divisors = [g for g in range(2, c) if c % g == 0]
    if grouping == "depthwise" and c > 1:
        groups, out = c, c * draw(st.sampled_from((1, 2)))
    elif grouping == "grouped" and divisors:
        groups = draw(st.sampled_from(divisors))
        out = groups * draw(st.integers(1, 3))
    else:
        groups, out = 1, draw(st.sampled_from(CHANNELS))
    dilation = 1 if same or kernel == 1 else draw(st.sampled_from((1, 1, 1, 2)))
    span = dilation * (kernel - 1) + 1
    if same:
        padding = (kernel // 2, kernel // 2)
    else:
        padding = (_padding(draw, h, span), _padding(draw, w, span))
    return Conv(
        out=out,
        kernel=kernel,
        stride=stride or draw(st.sampled_from((1, 2, 1, 2, 3))),
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        bn=draw(st.booleans()),
        act=draw(st.sampled_from(ACTIVATIONS)),
        sparsity=_sparsity(draw, kernel, groups),
    )


def _pool(draw, shape: tuple[int, int, int]) -> Pool:
    kind = draw(st.sampled_from(("max", "avg")))
    kernel = draw(st.sampled_from((2, 3, 1)))
    if min(shape[1:]) < kernel:
        kernel = 1
    return Pool(
        kind,
        kernel,
        stride=draw(st.sampled_from((2, 1))),
        padding=draw(st.integers(0, kernel // 2)),
        ceil_mode=draw(st.sampled_from((False, False, True))),
        count_include_pad=draw(st.sampled_from((True, False))),
    )


def _residual(draw, shape: tuple[int, int, int]) -> Residual:
    """A residual block; one in four a global-context one (``Residual.pooled``)."""
    pooled = draw(st.integers(1, 4)) == 4
    body_in = (shape[0], 1, 1) if pooled else shape
    body = [_conv(draw, body_in, same=True)]
    if draw(st.booleans()):
        body.append(_conv(draw, layer_output(body_in, body[0]), same=True, stride=1))
    out = layer_output(shape, Residual(tuple(body), pooled=pooled))
    stride = 1 if pooled else body[0].stride
    shortcut = None
    if out != shape or draw(st.booleans()):
        shortcut = Conv(out=out[0], kernel=1, stride=stride, padding=(0, 0),
                        bias=draw(st.booleans()), bn=draw(st.booleans()),
                        sparsity=_sparsity(draw, 1, 1))  # fmt: skip
    act = draw(st.sampled_from(ACTIVATIONS))
    return Residual(tuple(body), shortcut, act, pooled)


def _chain(draw, shape: tuple[int, int, int]) -> list[Conv]:
    """2-3 stride-1 convs of groups 1 in a row (staged-layout pairs on wide maps)."""
    chain = []
    for _ in range(draw(st.integers(2, 3))):
        chain.append(_conv(draw, shape, stride=1, plain=True))
        shape = layer_output(shape, chain[-1])
    return chain


def _linear(draw, in_features: int) -> Linear:
    out = draw(st.sampled_from(FEATURES))
    return Linear(
        out,
        bias=draw(st.booleans()),
        act=draw(st.sampled_from(ACTIVATIONS)),
        residual=out == in_features and draw(st.booleans()),
        sparsity=_sparsity(draw, 0, 1),
    )


def model_specs(
    max_layers: int = 4, max_head: int = 2, wide_every: int = 10, kinds: tuple[str, ...] = KINDS
):
    """The hypothesis strategy of ``ModelSpec``: 1..``max_layers`` feature layers (``kinds``:
    conv, pool, residual block, chain of stride-1 convs) on a map of 1..17 x 1..17 (one draw
    in ``wide_every``: 40..80 wide, where the staged-layout pairs and the max-pool kernel
    apply; chains are drawn first there), then a reduction and 0..``max_head`` linear layers,
    through PyTorch or ONNX."""
    wide_kinds = tuple(sorted(set(kinds), key=lambda k: (k != "chain", kinds.index(k))))

    @st.composite
    def specs(draw) -> ModelSpec:
        wide = draw(st.integers(1, wide_every)) == wide_every
        height = draw(st.integers(1, 17))
        width = draw(st.integers(40, 80)) if wide else draw(st.integers(1, 17))
        channels = draw(st.sampled_from((3, 1, 2, 4, 5, 8, 16)))
        shape, layers = (channels, height, width), []
        for _ in range(draw(st.integers(1, max_layers))):
            kind = draw(st.sampled_from(wide_kinds if wide else kinds))
            if kind == "chain":
                drawn = _chain(draw, shape)
            else:
                maker = {"conv": _conv, "pool": _pool, "residual": _residual}[kind]
                drawn = [maker(draw, shape)]
            for layer in drawn:
                layers.append(layer)
                shape = layer_output(shape, layer)
        reduce = draw(st.sampled_from(("mean", "none", "flatten", "adaptive")))
        if reduce == "flatten" and math.prod(shape) > MAX_FLATTEN:
            reduce = "mean"
        n, head = (math.prod(shape) if reduce == "flatten" else shape[0]), []
        for _ in range(draw(st.integers(0, max_head)) if reduce != "none" else 0):
            head.append(_linear(draw, n))
            n = head[-1].out
        return ModelSpec(
            batch=draw(st.integers(1, 3)),
            channels=channels,
            height=height,
            width=width,
            features=tuple(layers),
            reduce=reduce,
            head=tuple(head),
            seed=draw(st.integers(0, 2**16)),
            frontend=draw(st.sampled_from(("torch", "onnx"))),
            input_offset=draw(st.sampled_from((0.0, -2.0, 2.0))),
            sparse=draw(st.sampled_from((True, True, True, False))),
        )

    return specs()
