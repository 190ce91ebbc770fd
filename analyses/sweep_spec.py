"""What an intervention sweep sweeps (:class:`SweepSpec`, the CLI's options) and the checks it passes first.

Kept apart from hookpoints.analyses.intervention_sweep (planning and running), which re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hookpoints.analyses.arguments import name_list
from hookpoints.analyses.interventions import KINDS, NEURON_TYPES
from hookpoints.analyses.labels import check_name
from hookpoints.analyses.selection import PAPER_KS, SIDE_CHOICES, check_ks, check_side

from hookpoints.errors import UserError
from hookpoints.settings import Sampling, check_sampling

PAPER_SEED = 1234  # "a fixed random seed of 1234" (Appendix G)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep (the CLI's options).

    >>> spec = SweepSpec("sw1", runs=("s2tt", "t2tt"), tasks=("s2tt",), ks=(500,), limit=10)
    """

    sweep: str
    runs: tuple[str, ...]  # the ranking's runs (the scores' key), and default statistics runs
    tasks: tuple[str, ...]
    neuron_types: tuple[str, ...] = ()  # () = unimodal + random, or random alone beside label_sets / neurons
    ks: tuple[int, ...] = PAPER_KS
    side: str = "top"
    kind: str = "median"
    value: float | None = None
    seed: int = PAPER_SEED
    random_like: str | None = None  # the neuron type random draws match (default: the first ranked one)
    neurons: tuple[str, ...] = ()  # explicit HOOK:INDICES
    label_sets: tuple[str, ...] = ()  # any label sets ranked in scores (custom ap --name too); may name {language}
    languages: tuple[str, ...] = ()  # manifest labels (default: every language of the data but the target)
    limit: int = 100  # generations per language
    stats_runs: tuple[str, ...] = ()
    stats_where: str | None = None  # may name {language}
    data: str | None = None
    model: str | None = None
    tgt_lang: str | None = None
    max_new_tokens: int = 128
    batch_size: int = 8
    frames: int | None = None
    reference_column: str | None = None
    pair_column: str = "semantic_id"
    if_exists: str = "error"
    sampling: Sampling | None = None  # sampled decoding, every condition with the same draws; None: greedy

    def __post_init__(self):  # a string here was read letter by letter (runs="r1": the ranking of runs "1+r")
        for name in ("runs", "tasks", "neuron_types", "neurons", "label_sets", "languages", "stats_runs"):
            object.__setattr__(self, name, tuple(name_list(getattr(self, name), name)))
        if isinstance(self.ks, int):
            object.__setattr__(self, "ks", (self.ks,))


def neuron_types(spec: SweepSpec) -> tuple[str, ...]:
    """The swept neuron types; none given: unimodal and random, or random alone beside label sets / neurons."""
    if spec.neuron_types:
        return spec.neuron_types
    return ("random",) if spec.label_sets or spec.neurons else ("unimodal", "random")


def check_spec(spec: SweepSpec) -> None:
    """A one-line UserError for the first option that cannot work (before anything is loaded or written)."""
    check_name(spec.sweep, "sweep name (--sweep)")  # it said 'label set name', naming no option given
    if not spec.tasks:
        raise UserError("give at least one --task (asr, s2tt, t2tt, continue)")
    for neuron_type in neuron_types(spec):
        if neuron_type not in NEURON_TYPES:
            raise UserError(f"--type must be one of {', '.join(NEURON_TYPES)}, not {neuron_type!r}")
    if spec.kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    check_side(spec.side, SIDE_CHOICES)
    check_ks(spec.ks)
    if spec.value is not None and not math.isfinite(spec.value):
        raise UserError(f"--value must be a finite number, not {spec.value}: it becomes the neurons' value or shift")
    if spec.value is not None and spec.kind not in ("constant", "steer"):
        raise UserError(
            f"--value is for --kind constant or steer; --kind {spec.kind} does not use it (it was ignored, and "
            "stored with the sweep's rows)"
        )
    if spec.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, not {spec.seed}")
    if spec.limit < 1 or spec.batch_size < 1 or spec.max_new_tokens < 1:
        raise UserError("--limit, --batch-size and --max-new-tokens must be at least 1")
    if spec.frames is not None and spec.frames < 1:
        raise UserError(f"--frames must be at least 1, not {spec.frames}")
    ranked = [t for t in neuron_types(spec) if t not in ("random", "none")] + list(spec.label_sets)
    if "random" in neuron_types(spec) and not ranked and not spec.neurons:
        raise UserError(
            "random neurons match the counts of ranked or explicit neurons: add --type unimodal, --label-set NAME "
            "or --neurons"
        )
    if spec.random_like and spec.random_like not in ranked:
        raise UserError(
            f"--random-like {spec.random_like!r} is not one of the swept types or label sets ({', '.join(ranked)})"
        )
    check_sampling(spec.sampling)
    if spec.if_exists not in ("error", "overwrite"):
        raise UserError(f"if_exists must be error or overwrite, not {spec.if_exists!r}")
