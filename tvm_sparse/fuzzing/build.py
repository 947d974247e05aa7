"""The ``torch.nn.Module`` a ``ModelSpec`` describes, with seeded (pruned) weights."""

from __future__ import annotations

import math

import numpy as np

from .spec import Conv, Linear, ModelSpec, Pool, Residual, Sparsity, layer_output


def make_weight(shape: tuple[int, ...], sparsity: Sparsity, rng: np.random.Generator) -> np.ndarray:
    """A float32 weight (OIHW or (out, in)) pruned as ``sparsity`` says, He-scaled by the
    weights each output keeps."""
    import torch

    from ..prune import project_bcr, project_bsr
    from ..testing import random_pattern_weight

    kind, out = sparsity.kind, shape[0]
    if kind == "pattern":
        o, c, k, _ = shape
        taps = min(sparsity.taps, k * k)
        return random_pattern_weight(
            o, c, k, sparsity.patterns, sparsity.keep, taps, seed=int(rng.integers(2**31)),
            filter_group=sparsity.group,
        )  # fmt: skip
    w = rng.standard_normal(shape).astype(np.float32)
    if kind == "zero":
        return np.zeros(shape, np.float32)
    if kind == "unstructured":
        w *= rng.random(shape) < sparsity.keep
    elif kind == "filters":
        w *= (rng.random(out) < sparsity.keep).reshape((out,) + (1,) * (len(shape) - 1))
    elif kind in ("bsr", "bcr"):
        mat = torch.from_numpy(w.reshape(out, -1))
        if kind == "bsr":
            mat = project_bsr(mat, sparsity.block, sparsity.keep)
        else:
            mat = project_bcr(mat, sparsity.block, sparsity.keep, 0.5)
        w = mat.numpy().reshape(shape)
    kept = max(1.0, float((w != 0).sum()) / out)
    return (w * math.sqrt(2.0 / kept)).astype(np.float32)


# ------------------------------------------------------------------------------ torch model


def _activation(name: str):
    from torch import nn

    makers = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6,
              "leaky": lambda: nn.LeakyReLU(0.1)}  # fmt: skip
    return makers[name]()


def _conv_unit(in_channels: int, spec: Conv, rng: np.random.Generator):
    """nn.Sequential(conv, bn?, act) with seeded weights and BatchNorm statistics."""
    import torch
    from torch import nn

    conv = nn.Conv2d(in_channels, spec.out, spec.kernel, spec.stride, spec.padding,
                     spec.dilation, spec.groups, spec.bias)  # fmt: skip
    shape = (spec.out, in_channels // spec.groups, spec.kernel, spec.kernel)
    layers = [conv]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(make_weight(shape, spec.sparsity, rng)))
        if spec.bias:
            conv.bias.copy_(torch.from_numpy(rng.standard_normal(spec.out).astype("f") * 0.1))
        if spec.bn:
            bn = nn.BatchNorm2d(spec.out)
            bn.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, spec.out).astype("f")))
            bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, spec.out).astype("f")))
            bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, spec.out).astype("f")))
            bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, spec.out).astype("f")))
            layers.append(bn)
    return nn.Sequential(*layers, _activation(spec.act))


def _linear_unit(in_features: int, spec: Linear, rng: np.random.Generator):
    import torch
    from torch import nn

    fc = nn.Linear(in_features, spec.out, spec.bias)
    with torch.no_grad():
        w = make_weight((spec.out, in_features), spec.sparsity, rng)
        fc.weight.copy_(torch.from_numpy(w))
        if spec.bias:
            fc.bias.copy_(torch.from_numpy(rng.standard_normal(spec.out).astype("f") * 0.1))
    return fc


def _pool_module(spec: Pool):
    from torch import nn

    if spec.kind == "max":
        return nn.MaxPool2d(spec.kernel, spec.stride, spec.padding, ceil_mode=spec.ceil_mode)
    return nn.AvgPool2d(spec.kernel, spec.stride, spec.padding, spec.ceil_mode,
                        spec.count_include_pad)  # fmt: skip


def build_model(spec: ModelSpec):
    """The ``torch.nn.Module`` (eval mode) a spec describes, weights seeded by ``spec.seed``."""
    import torch
    from torch import nn

    rng = np.random.default_rng(spec.seed)

    class _Residual(nn.Module):
        def __init__(self, in_channels: int, layer: Residual) -> None:
            super().__init__()
            units, c = [], in_channels
            for conv in layer.body:
                units.append(_conv_unit(c, conv, rng))
                c = conv.out
            self.body = nn.Sequential(*units)
            self.shortcut = (_conv_unit(in_channels, layer.shortcut, rng) if layer.shortcut
                             else nn.Identity())  # fmt: skip
            self.act, self.pooled = _activation(layer.act), layer.pooled

        def forward(self, x):
            y = self.body(x.mean((2, 3), keepdim=True) if self.pooled else x)
            return self.act(y + self.shortcut(x))

    class _Head(nn.Module):
        def __init__(self, in_features: int, layer: Linear) -> None:
            super().__init__()
            self.fc, self.residual = _linear_unit(in_features, layer, rng), layer.residual
            self.act = _activation(layer.act)

        def forward(self, x):
            y = self.fc(x)
            return self.act(y + x if self.residual else y)

    class FuzzNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shape, feats = (spec.channels, spec.height, spec.width), []
            for layer in spec.features:
                if isinstance(layer, Conv):
                    feats.append(_conv_unit(shape[0], layer, rng))
                elif isinstance(layer, Pool):
                    feats.append(_pool_module(layer))
                else:
                    feats.append(_Residual(shape[0], layer))
                shape = layer_output(shape, layer)
            self.features = nn.Sequential(*feats)
            if spec.reduce == "adaptive":
                self.pool = nn.AdaptiveAvgPool2d(1)
            n = math.prod(shape) if spec.reduce == "flatten" else shape[0]
            head = []
            for layer in spec.head:
                head.append(_Head(n, layer))
                n = layer.out
            self.head = nn.Sequential(*head)

        def forward(self, x):
            x = self.features(x)
            if spec.reduce == "flatten":
                x = torch.flatten(x, 1)
            elif spec.reduce == "mean":
                x = x.mean((2, 3))
            elif spec.reduce == "adaptive":
                x = torch.flatten(self.pool(x), 1)
            return self.head(x)

    return FuzzNet().eval()


def spec_input(spec: ModelSpec) -> np.ndarray:
    """The seeded input the check feeds both runtimes."""
    rng = np.random.default_rng(spec.seed + 1)
    return (rng.standard_normal(spec.input_shape) + spec.input_offset).astype(np.float32)
