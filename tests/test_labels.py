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
        ("language = 'de' -- comment", "comments"),
        ("language = 'de') OR (1 = 1", "no matching"),
        ("(language = 'de'", "not closed"),
        ("language = 'de", "not closed"),
    ],
)
def test_bad_predicates_are_refused(text, message):
    with pytest.raises(UserError, match=message):
        check_predicate(text, "--positive")


def test_custom_label_set_names():
    ls = custom_label_set("language = 'de' AND modality = 'speech'", "modality = 'speech'")
    assert ls.name == "language_de_and_modality_speech/among_modality_speech"
    assert custom_label_set("x = 1", name="x-is-1").name == "x-is-1"
    assert slug("  ") == "x"
    with pytest.raises(UserError, match="label set name"):
        custom_label_set("x = 1", name="bad name!")
