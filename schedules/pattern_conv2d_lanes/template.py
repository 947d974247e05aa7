"""The filters-in-lanes kernel as a MetaSchedule template (see ``schedules/tunable.py``) and
its search space."""

from __future__ import annotations

from dataclasses import asdict

from tvm import tirx

from ..buffers import STACK_BYTES
from ..epilogue import Epilogue
from ..geometry import ConvGeometry
from ..pattern_conv2d import layer_params, params_geometry
from ..tunable import Knobs, TunableKernel, register, template
from .config import LanesConfig
from .emit import pattern_conv2d_lanes_primfunc
from .heuristics import most_accumulators


def _build(params: dict, knobs: Knobs, vectorize: bool = True) -> tirx.PrimFunc:
    return pattern_conv2d_lanes_primfunc(
        params_geometry(params),
        tuple(tuple(p) for p in params["patterns"]),
        params["num_kernels"],
        params["max_taps"],
        params["lanes"],
        Epilogue(**params["epilogue"]),
        LanesConfig(**knobs),
        params["name"],
        vectorize,
    )


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Tiles of 1-8 rows x 4-16 columns (1 KiB of stack per accumulator row; tiles past ~28
    accumulators spill: slow, still right), fewer where ``most_accumulators`` caps them (a
    7x7 kernel: 1-2 rows x 4-8 columns), prefetch 0 / 2 / 4 / 8 kernels ahead; ``shares``
    stays at its default (one per core)."""
    geom = params_geometry(params)
    most = most_accumulators(geom)
    cols = min(STACK_BYTES // (4 * params["lanes"]), most, geom.out_width)
    return {
        "rows": list(range(1, max(1, min(geom.out_height, 8, most // 4)) + 1)),
        "cols": list(range(4, max(4, cols) + 1)),
        "shares": [default["shares"]],
        "prefetch": sorted({0, 2, 4, 8, default.get("prefetch", 0)}),
    }


PATTERN_CONV2D_LANES = register(TunableKernel("pattern_conv2d_lanes", _build, _space))


def pattern_conv2d_lanes_template(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    lanes: int,
    epilogue: Epilogue,
    config: LanesConfig,
    name: str,
) -> tirx.PrimFunc:
    """The kernel at ``config`` as a MetaSchedule template (``config`` is its default point)."""
    # (The pattern kernel's parameters; its filter group here: the lanes.)
    params = layer_params(geom, patterns, num_kernels, max_taps, epilogue, name, lanes, lanes)
    knobs = asdict(config)
    analysed = _build(params, knobs, vectorize=False)  # (never built: realize regenerates it)
    return template(analysed, PATTERN_CONV2D_LANES.name, params, knobs)
