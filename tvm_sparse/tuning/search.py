"""MetaSchedule pieces for the knob-sampled sparse kernels: a mutator, features, the space."""

from __future__ import annotations

import math
import random

import numpy as np
import tvm
from tvm import s_tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from schedules.tunable import knobs_of, tunable_block

# PerStoreFeature's row length with its default arguments; knob rows are padded to it so one
# XGBoost model serves sparse templates and TVM's own kernels alike.
FEATURE_LENGTH = 164


@derived_object
class MutateKnob(ms.mutator.PyMutator):
    """Re-sample one ``sample_categorical`` decision (a knob) to a different candidate."""

    def _initialize_with_tune_context(self, context: ms.TuneContext) -> None:
        pass

    def apply(self, trace: s_tir.schedule.Trace, rand_state: int) -> s_tir.schedule.Trace | None:
        rng = random.Random(int(rand_state))
        sampled = [
            (inst, int(dec))
            for inst, dec in trace.decisions.items()
            if inst.kind.name == "SampleCategorical" and len(inst.attrs[0]) > 1
        ]
        if not sampled:
            return None
        inst, decision = rng.choice(sampled)
        other = rng.choice([i for i in range(len(inst.attrs[0])) if i != decision])
        return trace.with_decision(inst, other, remove_postproc=True)

    def clone(self) -> ms.Mutator:
        return MutateKnob()


@derived_object
class KnobFeatures(ms.feature_extractor.PyFeatureExtractor):
    """Features for the cost model: a template's knobs (and the tile they imply), TVM's
    per-store features for any other kernel."""

    def __init__(self) -> None:
        self.per_store = ms.feature_extractor.PerStoreFeature()

    def extract_from(self, context: ms.TuneContext, candidates: list) -> list:
        out = []
        for cand in candidates:
            func = next(iter(cand.sch.mod.functions.values()))
            if tunable_block(func) is None:
                out.extend(self.per_store.extract_from(context, [cand]))
                continue
            block = cand.sch.get(cand.sch.get_sblock(tunable_block(func).name_hint))
            out.append(tvm.runtime.tensor(knob_row(knobs_of(block))))
        return out


def knob_row(knobs: dict[str, int]) -> np.ndarray:
    """One feature row: a marker, the knobs by name, the register tile they imply."""
    values = [float(knobs[k]) for k in sorted(knobs)]
    tile = math.prod(knobs.get(k, 1) or 1 for k in ("rows", "filters", "col_vectors", "vectors"))
    row = np.zeros((1, FEATURE_LENGTH), dtype=np.float32)
    feats = [1.0, *values, float(tile), math.log2(max(1, tile))]
    row[0, : len(feats)] = feats
    return row


def space_for(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> ms.SpaceGenerator:
    """The space of one task: a template is sampled by its own rule (no postprocessing: the
    kernel's loops are data-dependent on purpose), anything else gets TVM's default rules."""
    if tunable_block(func) is not None:
        return ms.space_generator.PostOrderApply(
            sch_rules=[ms.schedule_rule.ApplyCustomRule()],
            postprocs=[],
            mutator_probs={MutateKnob(): 1.0},
        )
    return ms.space_generator.PostOrderApply()


def strategy_for(func: tvm.tirx.PrimFunc) -> ms.SearchStrategy:
    """Evolutionary search; a template's space is a few hundred knob points, so a small
    population finds its best as surely as the default 512 and costs far less per round."""
    if tunable_block(func) is not None:
        return ms.search_strategy.EvolutionarySearch(
            population_size=96, init_min_unmeasured=16, genetic_num_iters=2
        )
    return ms.search_strategy.EvolutionarySearch(population_size=256)
