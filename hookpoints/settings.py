"""A run's settings as one typed value, written into the store's ``runs`` table and parsed back in one place.

The recorder builds a :class:`RunSettings` from its arguments (bad values fail here, with a one-line
:class:`~hookpoints.errors.UserError`), writes :meth:`RunSettings.columns` and :meth:`RunSettings.config`
into the run's events, and every analysis reads it back with :meth:`RunSettings.from_row`. The CLI's click
choices come from :data:`POOLINGS`, :data:`STORAGE_DTYPES` and :data:`hookpoints.tasks.TASKS`.

Encoding of the ``pooling`` column: the pooling itself (``mean``, ``last``, ``max``, ``none``), with the suffix
``+steps`` for a per-step run (``mean+steps``): its decoder hook points hold one row per generation step
(``position`` = step) and every other hook point one pooled row per example (docs/recording-speech.md).

Example::

    s = RunSettings(pooling="mean", per_step=True, task="s2tt")
    s.columns()["pooling"]                       # 'mean+steps'
    RunSettings.from_row(s.columns()) == s       # True
    s.rows_per_example("decoder")                # 'steps'

Light on purpose: no torch, so the CLI's ``--help`` and the analyses import it freely.
"""

from __future__ import annotations

import json
import numbers
import operator
from dataclasses import dataclass
from enum import StrEnum

from hookpoints.errors import UserError
from hookpoints.tasks import TASKS

STEPS_SUFFIX = "+steps"


class Pooling(StrEnum):
    """How a hook's positions become what is stored: one vector per example, or every position (``none``).

    >>> Pooling("mean") is Pooling.MEAN
    True
    """

    MEAN = "mean"
    LAST = "last"
    MAX = "max"
    NONE = "none"


class StorageDtype(StrEnum):
    """How vectors are stored (float16: each vector's IEEE halves as one blob in ``activation_f16_bytes``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


#: Every pooling a recording accepts (``--pooling``).
POOLINGS: tuple[str, ...] = tuple(p.value for p in Pooling)
#: The poolings that give one vector per example (what analyses compare; ``--pooling`` of ``clusters``).
VECTOR_POOLINGS: tuple[str, ...] = (Pooling.LAST.value, Pooling.MEAN.value, Pooling.MAX.value)
#: Storage precisions (``--dtype``).
STORAGE_DTYPES: tuple[str, ...] = tuple(d.value for d in StorageDtype)


def parse_pooling(value: str | Pooling, *, allowed: tuple[str, ...] = POOLINGS) -> Pooling:
    """``value`` as a :class:`Pooling`, or a one-line UserError naming the allowed ones."""
    if value not in allowed:
        raise UserError(f"pooling must be one of {', '.join(allowed)}, not {value!r}")
    return Pooling(value)


def check_template_text(template) -> None:
    """A UserError unless ``template`` (an audio LLM's prompt text) is a string with one ``{audio}``."""
    if not isinstance(template, str) or template.count("{audio}") != 1:
        raise UserError(f"a prompt template is text with one {{audio}} where the audio goes, not {template!r:.60}")


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding instead of greedy: the logits divided by ``temperature``, then only the ``top_k`` most
    likely tokens, then the fewest tokens holding ``top_p`` of the probability (transformers' own warpers, in
    that order), one token drawn per example and step from the example's own random stream (``seed`` and the
    example's key: its id when recording, its index in the batch otherwise; hookpoints.sampling). So an example
    draws the same tokens in any batch, on any device, given the same probabilities.

    >>> Sampling(temperature=0.7, top_p=0.9).config()
    {'temperature': 0.7, 'top_k': None, 'top_p': 0.9, 'seed': 0}
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # numpy / torch numbers too, as the other counts (np.int64(5) was refused as "not a whole number")
        if not _real(self.temperature) or not 0 < self.temperature < float("inf"):
            raise UserError(f"temperature must be a number above 0, not {self.temperature!r}")
        if self.top_k is not None and (_whole(self.top_k) is None or self.top_k < 1):
            raise UserError(f"top_k must be a whole number of at least 1, not {self.top_k!r}")
        if self.top_p is not None and (not _real(self.top_p) or not 0 < self.top_p <= 1):
            raise UserError(f"top_p must be a number above 0 and at most 1, not {self.top_p!r}")
        if _whole(self.seed) is None or self.seed < 0:
            raise UserError(f"the sampling seed must be a whole number of at least 0, not {self.seed!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", _whole(self.top_k))
        object.__setattr__(self, "seed", _whole(self.seed))

    def config(self) -> dict:
        """As the run's config keeps it (and :meth:`from_config` reads it back)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict | None) -> Sampling | None:
        """A run config's ``sampling`` value (None: greedy)."""
        if config is None:
            return None
        if not isinstance(config, dict) or set(config) - {"temperature", "top_k", "top_p", "seed"}:
            raise UserError(f"the run's config holds an unknown sampling {config!r:.80}: the run is damaged")
        return cls(**config)


def check_sampling(value) -> Sampling | None:
    """``value`` if it is a :class:`Sampling` or None (greedy); else a one-line UserError."""
    if value is not None and not isinstance(value, Sampling):
        raise UserError(f"sampling must be a hookpoints.Sampling (or None: greedy), not {value!r:.60}")
    return value


def _whole(value) -> int | None:
    """``value`` as an int if it is a whole number (numpy and torch integers too; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _real(value) -> bool:
    """Whether ``value`` is a real number (numpy floats too; not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunSettings:
    """What a run was recorded with (the ``runs`` table's model, task, pooling and dtype, and its config).

    ``per_step``: decoder hook points keep one row per generation step (needs a generating task).
    ``frames``: speech features fixed to that many frames. ``tgt_lang``: the target language given.

    >>> RunSettings(pooling=Pooling.LAST).pooling.value
    'last'
    """

    pooling: Pooling = Pooling.MEAN
    per_step: bool = False
    dtype: StorageDtype = StorageDtype.FLOAT32
    task: str = "forward"
    model: str | None = None
    tgt_lang: str | None = None
    frames: int | None = None
    max_new_tokens: int | None = None
    template: str | None = None  # an audio LLM's prompt text around the audio ({audio}); None: the audio alone
    sampling: Sampling | None = None  # sampled decoding of a generating task; None: greedy

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", parse_pooling(self.pooling))
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {self.dtype!r}")
        object.__setattr__(self, "dtype", StorageDtype(self.dtype))
        if self.task not in TASKS:
            raise UserError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.per_step and not TASKS[self.task].generates:
            raise UserError(f"per-step recording needs a generating task (asr, s2tt, t2tt, continue), not {self.task}")
        if self.per_step and self.pooling is Pooling.NONE:
            raise UserError("per-step recording pools the other hook points: give --pooling mean, last or max")
        if self.frames is not None and self.frames < 1:
            raise UserError(f"frames must be at least 1, not {self.frames}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.template is not None:
            check_template_text(self.template)
        if check_sampling(self.sampling) is not None and not TASKS[self.task].generates:
            raise UserError(f"sampling applies to generating tasks (asr, s2tt, t2tt, continue), not {self.task}")

    # --- written into the store -------------------------------------------------------------------------
    def stored_pooling(self) -> str:
        """The ``pooling`` column: ``mean``, or ``mean+steps`` for a per-step run."""
        return f"{self.pooling.value}{STEPS_SUFFIX}" if self.per_step else self.pooling.value

    def columns(self) -> dict[str, str | None]:
        """The run's columns of the ``run_events`` table (model, task, pooling, dtype)."""
        return {"model": self.model, "task": self.task, "pooling": self.stored_pooling(), "dtype": self.dtype.value}

    def config(self) -> dict:
        """The settings that live in the run's JSON ``config``."""
        config = {
            "tgt_lang": self.tgt_lang,
            "max_new_tokens": self.max_new_tokens,
            "per_step": self.per_step,
            "frames": self.frames,
        }
        if self.template is not None:
            config["template"] = self.template
        if self.sampling is not None:
            config["sampling"] = self.sampling.config()
        return config

    @classmethod
    def from_row(cls, row: dict) -> RunSettings:
        """Parse a ``runs`` row (``pooling``, ``dtype``, ``task``, ``model``; ``config`` JSON if there)."""
        stored = row.get("pooling") or ""
        per_step = stored.endswith(STEPS_SUFFIX)
        pooling = stored.removesuffix(STEPS_SUFFIX)
        if pooling not in POOLINGS:
            raise UserError(f"the store's runs table holds an unknown pooling {stored!r}: the run is damaged")
        config = row.get("config") or {}
        if isinstance(config, str):
            config = json.loads(config) if config else {}
        return cls(
            pooling=Pooling(pooling),
            per_step=per_step,
            dtype=row.get("dtype") or StorageDtype.FLOAT32,
            task=row.get("task") or "forward",
            model=row.get("model"),
            tgt_lang=config.get("tgt_lang"),
            frames=config.get("frames"),
            max_new_tokens=config.get("max_new_tokens"),
            template=config.get("template"),
            sampling=Sampling.from_config(config.get("sampling")),
        )

    # --- what the stored rows mean ----------------------------------------------------------------------
    def hook_pooling(self, space: str | None) -> Pooling:
        """How the recorder stores a hook point of this ``space``: per-step decoder hooks keep every step."""
        return Pooling.NONE if self.per_step and space == TASKS[self.task].step_space else self.pooling

    def rows_per_example(self, space: str | None) -> str:
        """``one`` (a pooled vector), ``positions`` (pooling none) or ``steps`` (a per-step decoder hook)."""
        if space is None:  # no time axis: one vector whatever the pooling
            return "one"
        if self.per_step and space == TASKS[self.task].step_space:
            return "steps"
        return "positions" if self.pooling is Pooling.NONE else "one"

    def analysis_pooling(self, requested: str | None, run: str) -> Pooling:
        """The pooling an analysis of one vector per example uses: the requested one if this run can give it.

        A run that kept every position gives any (default ``last``); a pooled run only its own. A per-step run
        gives its own pooling: decoder hooks are pooled over the steps here, as the recorder pools them when
        ``per_step`` is off, so a per-step run ranks like its pooled twin.
        """
        if requested is not None:
            parse_pooling(requested, allowed=VECTOR_POOLINGS)
        if self.pooling is Pooling.NONE:
            return Pooling(requested or Pooling.LAST)
        if requested in (None, self.pooling.value):
            return self.pooling
        raise UserError(
            f"run {run!r} was recorded with pooling {self.stored_pooling()}, which cannot give {requested}: "
            f"analyse it with --pooling {self.pooling.value}, or record it again with --pooling {requested} "
            "(or --pooling none, which keeps every position)"
        )
