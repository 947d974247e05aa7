"""Model descriptions for the fuzzer: frozen dataclasses with a JSON round trip, a one-line
``describe`` and the shape arithmetic the strategy and the model builder share."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sparsity:
    """How a weight is pruned. ``kind``: dense | pattern | unstructured | zero | filters | bsr |
    bcr. ``keep``: kept kernels (pattern), nonzeros (unstructured), filters, blocks (bsr), rows
    per block (bcr); ``patterns`` / ``taps`` / ``group``: pattern library size, taps per
    pattern, filters sharing kernels; ``block``: (rows, cols) for bsr / bcr."""

    kind: str = "dense"
    keep: float = 1.0
    patterns: int = 8
    taps: int = 4
    group: int = 1
    block: tuple[int, int] = (8, 1)

    def describe(self) -> str:
        if self.kind == "pattern":
            return f"pattern {self.patterns}p{self.taps}t keep {self.keep:g} g{self.group}"
        if self.kind in ("bsr", "bcr"):
            return f"{self.kind} {self.block[0]}x{self.block[1]} keep {self.keep:g}"
        if self.kind in ("unstructured", "filters"):
            return f"{self.kind} {self.keep:g}"
        return self.kind


@dataclass(frozen=True)
class Conv:
    """Conv2d (+ BatchNorm) (+ activation). ``padding`` is (rows, columns)."""

    out: int
    kernel: int = 3
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    bn: bool = False
    act: str = "none"
    sparsity: Sparsity = field(default_factory=Sparsity)

    def describe(self) -> str:
        parts = [f"conv{self.kernel}x{self.kernel} o{self.out}"]
        parts += [f"s{self.stride}"] if self.stride != 1 else []
        parts += [f"p{self.padding[0]},{self.padding[1]}"] if any(self.padding) else []
        parts += [f"d{self.dilation}"] if self.dilation != 1 else []
        parts += [f"g{self.groups}"] if self.groups != 1 else []
        parts += ["bias"] * self.bias + ["bn"] * self.bn
        parts += [self.act] if self.act != "none" else []
        return " ".join(parts) + f" [{self.sparsity.describe()}]"


@dataclass(frozen=True)
class Pool:
    """Max / average pool; ``count_include_pad`` for average pools only."""

    kind: str = "max"
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def describe(self) -> str:
        extra = " ceil" * self.ceil_mode
        extra += " excl-pad" * (self.kind == "avg" and not self.count_include_pad)
        return f"{self.kind}pool{self.kernel} s{self.stride} p{self.padding}{extra}"


@dataclass(frozen=True)
class Residual:
    """``act(body(x) + shortcut(x))``; shortcut None is the identity. ``pooled``: the body
    reads ``x.mean((2, 3), keepdim=True)`` and its 1x1 output is broadcast in the add (a
    global-context block)."""

    body: tuple[Conv, ...]
    shortcut: Conv | None = None
    act: str = "relu"
    pooled: bool = False

    def describe(self) -> str:
        short = self.shortcut.describe() if self.shortcut else "id"
        body = "; ".join(c.describe() for c in self.body)
        return f"{'ctx' if self.pooled else 'res'}({body} | {short}) {self.act}"


@dataclass(frozen=True)
class Linear:
    """Linear (+ identity residual when in == out) (+ activation)."""

    out: int
    bias: bool = True
    act: str = "none"
    residual: bool = False
    sparsity: Sparsity = field(default_factory=Sparsity)

    def describe(self) -> str:
        parts = [f"fc{self.out}"] + ["bias"] * self.bias + ["+x"] * self.residual
        parts += [self.act] if self.act != "none" else []
        return " ".join(parts) + f" [{self.sparsity.describe()}]"


Layer = Conv | Pool | Residual


@dataclass(frozen=True)
class ModelSpec:
    """Input (batch, channels, height, width), feature layers, reduction, FC head, seed, and
    how the model reaches ``tvm_sparse.compile``: the ``nn.Module`` ("torch") or its ONNX
    export ("onnx"), sparse or as the dense baseline."""

    batch: int
    channels: int
    height: int
    width: int
    features: tuple[Layer, ...]
    reduce: str = "none"  # none | flatten | mean | adaptive
    head: tuple[Linear, ...] = ()
    seed: int = 0
    frontend: str = "torch"
    input_offset: float = 0.0  # added to the standard-normal input
    sparse: bool = True  # False: ``compile(..., sparse=False)``, the dense baseline

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    def depth(self) -> int:
        """Conv / linear layers on the longest path."""
        conv = sum(len(f.body) if isinstance(f, Residual) else isinstance(f, Conv)
                   for f in self.features)  # fmt: skip
        return conv + len(self.head)

    def describe(self) -> str:
        offset = f"{self.input_offset:+g}" if self.input_offset else ""
        parts = ["x{}x{}x{}x{}".format(*self.input_shape) + offset]
        parts += [f.describe() for f in self.features]
        parts += [self.reduce] if self.reduce != "none" else []
        parts += [h.describe() for h in self.head]
        parts += [f"seed {self.seed}"] + ["onnx"] * (self.frontend == "onnx")
        return " | ".join(parts + ["sparse=False"] * (not self.sparse))

    def to_json(self) -> str:
        return json.dumps(tagged(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return untagged(json.loads(text))


_TYPES = {t.__name__: t for t in (Sparsity, Conv, Pool, Residual, Linear, ModelSpec)}


def tagged(obj: Any) -> Any:
    """A spec as JSON-able dicts with a "type" key per dataclass."""
    if type(obj).__name__ in _TYPES:
        return {"type": type(obj).__name__, **{k: tagged(getattr(obj, k)) for k in
                                               asdict(obj)}}  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return [tagged(v) for v in obj]
    return obj


def untagged(obj: Any) -> Any:
    if isinstance(obj, dict) and "type" in obj:
        kwargs = {k: untagged(v) for k, v in obj.items() if k != "type"}
        return _TYPES[obj["type"]](**kwargs)
    if isinstance(obj, list):
        return tuple(untagged(v) for v in obj)
    return obj


# ------------------------------------------------------------------------------ shapes


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output size of a conv along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output size of a pool along one axis (PyTorch's rule: with ``ceil_mode`` the last
    window must start inside the input or its left padding)."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def layer_output(shape: tuple[int, int, int], layer: Layer) -> tuple[int, int, int]:
    """(channels, height, width) after ``layer``."""
    _, h, w = shape
    if isinstance(layer, Conv):
        (ph, pw), args = layer.padding, (layer.kernel, layer.stride)
        return (layer.out, conv_out(h, *args, ph, layer.dilation),
                conv_out(w, *args, pw, layer.dilation))  # fmt: skip
    if isinstance(layer, Pool):
        args = (layer.kernel, layer.stride, layer.padding, layer.ceil_mode)
        return (shape[0], pool_out(h, *args), pool_out(w, *args))
    if layer.pooled:
        return (layer.body[-1].out, h, w)
    for conv in layer.body:
        shape = layer_output(shape, conv)
    return shape


def feature_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """(channels, height, width) after the feature layers."""
    shape = (spec.channels, spec.height, spec.width)
    for layer in spec.features:
        shape = layer_output(shape, layer)
    return shape
