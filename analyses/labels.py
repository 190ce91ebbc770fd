"""Label sets: which examples are positive, and which are compared, as SQL predicates over ``examples``.

A label set is a positive predicate (``language = 'de' AND modality = 'speech'``) and an optional "among"
predicate (``modality = 'speech'``) restricting the examples its AP is computed over (the others drop out).
Both are DuckDB boolean expressions over the examples view's columns (run, example_id and every manifest
column), a float NaN read as NULL; an example whose positive predicate is NULL is in no group (left out and
counted, analyses/examples.py label_masks), one whose among predicate is NULL is not among.

Presets build the paper's four specialization settings (seeds/seamless-m4t-v2-neurons.txt, section 3.2) over
every language (and modality) present among the examples:

=====================  ===============================================  =====================
preset                 positive                                         among
=====================  ===============================================  =====================
``unimodal``           language = L AND modality = M (per modality M)   modality = M
``multimodal``         language = L                                     all examples
``modality``           modality = M                                     all examples
``language-modality``  language = L AND modality = M                    all examples
=====================  ===============================================  =====================

The last three compare speech with text, so they need both modalities among the examples: in
SeamlessM4T only the shared text decoder sees both (rank it over a speech run and a text run together).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hookpoints.store.quoting import sql_string

from hookpoints.errors import UserError

PRESETS = ("unimodal", "multimodal", "modality", "language-modality")
#: The presets that compare modalities (defined only where both modalities pass: the shared decoder).
MODALITY_PRESETS = ("multimodal", "modality", "language-modality")
LABEL_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/=+-]{0,127}$")


@dataclass(frozen=True)
class LabelSet:
    """A named binary labelling of the examples: ``positive`` among ``among`` (None: all examples)."""

    name: str
    positive: str
    among: str | None = None
    preset: str | None = None  # the preset it came from (None: given with --positive)

    def describe(self) -> str:
        return self.positive + ("" if self.among is None else f"  among  {self.among}")


def check_predicate(text: str | None, option: str, columns: list[str] | None = None) -> str:
    """One safe boolean expression, checked by DuckDB's parser (analyses/predicates.py), or a UserError."""
    from hookpoints.analyses import predicates  # DuckDB only when a predicate is checked (CLI start-up)

    return predicates.check_predicate(text, option, columns)


def check_name(name: str, what: str = "label set name") -> str:
    if not isinstance(name, str) or not LABEL_SET_NAME.match(name):
        raise UserError(
            f"{what} {name!r} is not allowed: use letters, digits and _ . : / = + - (at most 128 "
            "characters, starting with a letter or digit)"
        )
    return name


def slug(text: str, limit: int = 100) -> str:
    """A label-set-name-safe version of ``text`` (``language = 'de'`` -> ``language_de``)."""
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.lower()).strip("_.+-")
    return (cleaned or "x")[:limit].rstrip("_")


def custom_label_set(positive: str, among: str | None = None, name: str | None = None) -> LabelSet:
    """A label set from ``--positive`` / ``--among`` predicates (named after them unless ``name`` is given).

    >>> custom_label_set("language = 'de'", among="modality = 'speech'", name="de-speech")
    """
    positive = check_predicate(positive, "--positive")
    among = None if among is None else check_predicate(among, "--among")
    if name is None:
        name = (slug(positive) + ("" if among is None else "/among_" + slug(among, 60)))[:128]
    return LabelSet(check_name(name), positive, among)


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    return sql_string(str(value))


def preset_label_sets(
    preset: str,
    languages: list,
    modalities: list | None,
    *,
    language_column: str = "language",
    modality_column: str = "modality",
    pairs: set[tuple] | None = None,
) -> list[LabelSet]:
    """The label sets of one of the paper's four settings over the ``languages`` and ``modalities`` present.

    ``modalities`` None: the examples have no modality column (unimodal then compares languages over all
    examples). The modality-involving presets need at least two modalities. ``pairs``: the (language,
    modality) pairs the examples hold (None: every pair); a language missing from a modality (no English text
    in an X -> English translation run) gets no unimodal or language-modality set there.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)} (or all)")
    lang, mod = quote_name(language_column), quote_name(modality_column)
    if preset != "modality" and not languages:
        raise UserError(f"preset {preset} needs languages, but column {language_column!r} holds none here")
    if preset in MODALITY_PRESETS and (modalities is None or len(modalities) < 2):
        held = "no modality column" if modalities is None else f"only {modality_column} = {modalities[0]!r}"
        raise UserError(
            f"preset {preset} compares modalities, but the examples have {held}: it is defined only where "
            "both speech and text pass (the shared decoder; paper section 3.2). Rank the decoder over a speech "
            "run and a text run together (--run S2TT_RUN --run T2TT_RUN), or use --preset unimodal"
        )

    def is_lang(value) -> str:
        return f"{lang} = {sql_literal(value)}"

    def is_mod(value) -> str:
        return f"{mod} = {sql_literal(value)}"

    def present(value, m) -> bool:
        return pairs is None or m is None or (value, m) in pairs

    sets = []
    if preset == "unimodal":
        for m in modalities or [None]:
            for value in (v for v in languages if present(v, m)):
                if m is None:
                    sets.append(LabelSet(f"unimodal/{slug(str(value))}", is_lang(value), None, preset))
                else:
                    sets.append(
                        LabelSet(
                            f"unimodal/{slug(str(m))}/{slug(str(value))}",
                            f"{is_lang(value)} AND {is_mod(m)}",
                            is_mod(m),
                            preset,
                        )
                    )
    elif preset == "multimodal":
        sets = [LabelSet(f"multimodal/{slug(str(v))}", is_lang(v), None, preset) for v in languages]
    elif preset == "modality":
        sets = [LabelSet(f"modality/{slug(str(m))}", is_mod(m), None, preset) for m in modalities]
    else:
        sets = [
            LabelSet(f"language-modality/{slug(str(m))}/{slug(str(v))}", f"{is_lang(v)} AND {is_mod(m)}", None, preset)
            for m in modalities
            for v in languages
            if present(v, m)
        ]
    return sets
