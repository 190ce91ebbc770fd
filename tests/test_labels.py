"""Label sets: predicate checks, the paper's four presets, names."""

import pytest
from hookpoints.analyses.labels import check_predicate, custom_label_set, preset_label_sets, slug

from hookpoints.errors import UserError

LANGUAGES = ["de", "en", "es", "fr", "ja", "zh"]


def test_the_four_presets_give_the_papers_32_label_sets():
    sets = {
        preset: preset_label_sets(preset, LANGUAGES, ["speech", "text"])
        for preset in ("unimodal", "multimodal", "modality", "language-modality")
    }
    assert [len(s) for s in sets.values()] == [12, 6, 2, 12]
    uni = {s.name: s for s in sets["unimodal"]}
    de_speech = uni["unimodal/speech/de"]
    assert de_speech.positive == "\"language\" = 'de' AND \"modality\" = 'speech'"
    assert de_speech.among == "\"modality\" = 'speech'"  # language vs other languages within the modality
    assert all(s.among is None for p in ("multimodal", "modality", "language-modality") for s in sets[p])
    assert sets["multimodal"][0].positive == "\"language\" = 'de'"
    assert [s.name for s in sets["modality"]] == ["modality/speech", "modality/text"]
    lm = {s.name: s for s in sets["language-modality"]}
    assert lm["language-modality/text/zh"].positive == "\"language\" = 'zh' AND \"modality\" = 'text'"
    names = [s.name for group in sets.values() for s in group]
    assert len(set(names)) == 32


def test_unimodal_without_a_modality_column_compares_languages_over_all_examples():
    sets = preset_label_sets("unimodal", ["de", "en"], None, language_column="lang")
    assert [(s.name, s.positive, s.among) for s in sets] == [
        ("unimodal/de", "\"lang\" = 'de'", None),
        ("unimodal/en", "\"lang\" = 'en'", None),
    ]


@pytest.mark.parametrize("preset", ["multimodal", "modality", "language-modality"])
@pytest.mark.parametrize("modalities", [None, ["speech"]])
def test_modality_presets_need_both_modalities(preset, modalities):
    with pytest.raises(UserError, match="shared decoder"):
        preset_label_sets(preset, LANGUAGES, modalities)


def test_values_are_quoted_as_sql_literals():
    sets = preset_label_sets("multimodal", ["o'zbek", 7], ["a", "b"])
    assert sets[0].positive == "\"language\" = 'o''zbek'"
    assert sets[1].positive == '"language" = 7'
    assert sets[0].name == "multimodal/o_zbek"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("language = 'de'; DROP TABLE x", "without ';'"),
        ("language = 'de') OR (1 = 1", "does not parse"),
        ("(language = 'de'", "does not parse"),
        ("language = 'de", "does not parse"),
        # quoting forms a hand-written checker did not know: each reached past the parentheses
        ("$$'$$) OR run IS NOT NULL OR ($$'$$ = ''", "does not parse"),
        ("E'\\'') OR (true", "does not parse"),
        ("example_id IN (SELECT example_id FROM examples)", "subquery"),
        ("count(*) > 1", "not a per-example function"),
        ("row_number() OVER () < 5", "window function"),
        ("examples.run = 'x'", "without a table name"),
        ("language = $run", "parameter"),
        ("true AS x", "one boolean expression"),
        ("1 FROM examples WHERE true", "one boolean expression"),
        ("1 ORDER BY 1", "one boolean expression"),
        ("(" * 3000 + "1" + ")" * 3000, "cannot be read|does not parse"),
    ],
)
def test_bad_predicates_are_refused(text, message):
    with pytest.raises(UserError, match=message) as caught:
        check_predicate(text, "--positive")
    assert "\n" not in str(caught.value)


def test_a_predicate_is_rendered_by_duckdb_and_may_only_use_the_given_columns():
    assert check_predicate("language = 'de' -- a comment", "--positive") == "((\"language\" = 'de'))"
    assert check_predicate("$$it's$$ = text", "--positive") == "$$it's$$ = text"  # same parse in parentheses
    assert check_predicate("LANGUAGE = 'de'", "--positive", ["language"]) == "LANGUAGE = 'de'"
    with pytest.raises(UserError, match="no column 'lang'"):
        check_predicate("lang = 'de'", "--positive", ["language", "text"])


def test_a_cast_is_allowed_but_not_a_subquery_inside_it():
    """DuckDB 2 parses a cast's type as a node of class TYPE, and every cast was refused as "type is not allowed
    in a predicate" although casts are documented as allowed."""
    for text in ("score::DOUBLE > 0.5", "CAST(language AS VARCHAR) = 'de'", "TRY_CAST(x AS DECIMAL(10, 2)) < 1"):
        assert check_predicate(text, "--positive") == text
    with pytest.raises(UserError, match="subquery"):
        check_predicate("CAST((SELECT 1) AS INTEGER) = 1", "--positive")


def test_custom_label_set_names():
    ls = custom_label_set("language = 'de' AND modality = 'speech'", "modality = 'speech'")
    assert ls.name == "language_de_and_modality_speech/among_modality_speech"
    assert custom_label_set("x = 1", name="x-is-1").name == "x-is-1"
    assert slug("  ") == "x"
    with pytest.raises(UserError, match="label set name"):
        custom_label_set("x = 1", name="bad name!")
