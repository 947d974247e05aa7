"""The pattern conv kernel as a MetaSchedule template (see ``schedules/tunable.py``): its
parameters and knobs as JSON-able dicts, the search space, and the staged-layout variants
``relay_passes.staged_layout`` asks for."""

from __future__ import annotations

import json
from dataclasses import asdict

from tvm import tirx

from ..epilogue import Epilogue
from ..geometry import ConvGeometry
from ..tunable import PARAMS_ATTR, Knobs, TunableKernel, default_knobs, register, template
from .config import PatternConvConfig
from .emit import pattern_conv2d_primfunc
from .tiling import StagedLayout, folded_rows, staged_layout


def config_knobs(cfg: PatternConvConfig) -> Knobs:
    """A config as the integer knobs a tuning record stores."""
    return {
        "rows": cfg.rows,
        "vector": cfg.vector,
        "filters": cfg.filters,
        "col_vectors": cfg.cols // cfg.vector,
        "shifted": int(cfg.shifted),
        "segmented": int(cfg.segmented),
        "channel_block": cfg.channel_block,
        "shares": cfg.shares,
        "prefetch": cfg.prefetch,
        "fold": cfg.fold,
    }


def knobs_config(knobs: Knobs) -> PatternConvConfig:
    """The config a tuning record's knobs stand for (``config_knobs`` inverted)."""
    return PatternConvConfig(
        rows=knobs["rows"],
        vector=knobs["vector"],
        filters=knobs["filters"],
        cols=knobs["col_vectors"] * knobs["vector"],
        shifted=bool(knobs["shifted"]),
        segmented=bool(knobs.get("segmented", 0)),
        # Records written before the loop-order knob existed hold neither key.
        channel_block=knobs.get("channel_block", 0),
        shares=knobs.get("shares", 2),
        prefetch=knobs.get("prefetch", 0),
        fold=knobs.get("fold", 1),
    )


def layer_params(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    epilogue: Epilogue,
    name: str,
    filter_group: int,
    lanes: int,
) -> dict:
    """A layer's kernel parameters as a template stores them (JSON; also the filters-in-lanes
    kernel's, its filter group the lanes). ``staged_input`` / ``staged_output``: see
    ``with_staged_layouts``."""
    return {
        "geom": asdict(geom),
        "patterns": [list(p) for p in patterns],
        "num_kernels": num_kernels,
        "max_taps": max_taps,
        "epilogue": asdict(epilogue),
        "name": name,
        "filter_group": filter_group,
        "lanes": lanes,
    }


def _build(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    return pattern_conv2d_primfunc(
        params_geometry(params),
        tuple(tuple(p) for p in params["patterns"]),
        params["num_kernels"],
        params["max_taps"],
        Epilogue(**params["epilogue"]),
        knobs_config(knobs),
        params["name"],
        params["filter_group"],
        *(_layout(params.get(key)) for key in ("staged_input", "staged_output")),
    )


def _layout(value: dict | None) -> StagedLayout | None:
    return StagedLayout(**value) if value else None


def _space(params: dict, default: Knobs) -> dict[str, list[int]]:
    """Rows per tile 1-8, vector = the target's lanes or half, 0 (whole row) to 4 vectors per
    tile, 1/2/4 filters together (divisors of the packing's filter group), either staging
    layout, the loop order: reduction in registers, or input channels outermost in blocks
    of 16 / 32 / 64 (ungrouped packings only; ``shares``, the parallel split, stays at its
    default: one per core), the prefetch distance (0 / 3 / 6 / 12 kernels), and the folds that apply
    (output rows per vector on narrow maps)."""
    out_channels, out_h = params["geom"]["out_channels"], params_geometry(params).out_height
    in_channels = params["geom"]["in_channels"]
    lanes = params["lanes"]
    group = params["filter_group"]
    space = {
        "rows": list(range(1, min(out_h, 8) + 1)),
        "vector": sorted({lanes, max(4, lanes // 2)}),
        "filters": [f for f in (1, 2, 4) if group % f == 0 and out_channels % f == 0],
        "col_vectors": [0, 1, 2, 3, 4],
        "shifted": [0, 1],
        "segmented": [0, 1],
        "channel_block": [0] + [b for b in (16, 32, 64) if b < in_channels and group == 1],
        "shares": [default["shares"]],
        "prefetch": sorted({0, 3, 6, 12, default.get("prefetch", 0)}),
        "fold": sorted({1, default.get("fold", 1)} | set(_folds(params_geometry(params), lanes))),
    }
    staged_in = _layout(params.get("staged_input"))
    if staged_in:  # whole rows the tiles cover exactly (the layout's rows), no fold
        space.update(
            rows=[r for r in space["rows"] if out_h % r == 0],
            vector=[staged_in.vector], col_vectors=[0], fold=[1],
        )  # fmt: skip
    return space


def _folds(geom: ConvGeometry, lanes: int) -> list[int]:
    """Folds that apply to ``geom`` with ``lanes``-wide vectors."""
    return [f for f in (2, 4, 8) if folded_rows(geom, PatternConvConfig(vector=lanes, fold=f)) == f]


def params_geometry(params: dict) -> ConvGeometry:
    """The layer's geometry from its kernel parameters (``layer_params``)."""
    return ConvGeometry.from_json(params["geom"])


PATTERN_CONV2D = register(TunableKernel("pattern_conv2d", _build, _space))


def pattern_conv2d_template(
    geom: ConvGeometry,
    patterns: tuple[tuple[int, ...], ...],
    num_kernels: int,
    max_taps: int,
    epilogue: Epilogue,
    config: PatternConvConfig,
    name: str,
    filter_group: int,
    lanes: int,
) -> tirx.PrimFunc:
    """The kernel at ``config`` as a MetaSchedule template (``config`` is its default point)."""
    params = layer_params(
        geom, patterns, num_kernels, max_taps, epilogue, name, filter_group, lanes
    )
    return _template(params, config_knobs(config))


def _template(params: dict, knobs: Knobs) -> tirx.PrimFunc:
    # The body is what MetaSchedule analyses (never built: ``tunable.realize`` regenerates the
    # kernel from the knobs). Its FLOP estimator has no rule for the vector shuffles and
    # broadcasts of the segmented layout (nor of the staged output's whole-row stores), so a
    # segmented default gets the phase layout's body (same FLOPs, same result).
    analysed = {**knobs, "segmented": 0}
    if params.get("staged_output"):
        analysed["col_vectors"] = 1
    return template(_build(params, analysed), PATTERN_CONV2D.name, params, knobs)


def template_input_layout(func: tirx.PrimFunc) -> StagedLayout | None:
    """The staged layout a pattern conv template would read its input from in place at its
    default knobs (None: it stages its input, or already reads a staged one)."""
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    if params.get("staged_input"):
        return None
    return staged_layout(params_geometry(params), knobs_config(default_knobs(func)))


def with_staged_layouts(
    func: tirx.PrimFunc, staged_input: StagedLayout | None, staged_output: StagedLayout | None
) -> tirx.PrimFunc:
    """A pattern conv template reading its input from / writing its output in staged layouts
    (``StagedLayout``; None: NCHW), at the same default knobs."""
    params = json.loads(str(func.attrs[PARAMS_ATTR]))
    params["staged_input"] = asdict(staged_input) if staged_input else None
    params["staged_output"] = asdict(staged_output) if staged_output else None
    return _template(params, default_knobs(func))
