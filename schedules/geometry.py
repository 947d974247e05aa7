"""Static shapes of the conv layers the kernels are generated for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape facts of an NCHW conv2d with an OIHW weight (symmetric padding allowed)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right

    @classmethod
    def from_json(cls, fields: dict) -> ConvGeometry:
        """The geometry from its fields as JSON holds them (``dataclasses.asdict``: lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @property
    def out_height(self) -> int:
        top, _, bottom, _ = self.padding
        return (self.height + top + bottom - self.kernel[0]) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        _, left, _, right = self.padding
        return (self.width + left + right - self.kernel[1]) // self.stride[1] + 1
