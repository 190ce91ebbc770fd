"""A FLEURS folder as ``--data``: recordings, labels and parallel sentence ids; a wrong folder is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from hookpoints.store.catalog import Store

from hookpoints.errors import UserError
from hookpoints.manifest import read_data

SENTENCES = {  # FLEURS sentence id -> transcription per language
    "1001": {"de_de": "Das ist ein Test.", "ja_jp": "これはテストです。"},
    "1002": {"de_de": "Noch ein Satz.", "ja_jp": "もう一つの文です。"},
}


@pytest.fixture
def fleurs(tmp_path):
    """google/fleurs' layout: data/<language>/<split>.tsv and data/<language>/audio/<split>/<file>."""
    root = tmp_path / "fleurs"
    rng = np.random.default_rng(0)
    for language in ("de_de", "ja_jp"):
        folder = root / "data" / language
        (folder / "audio" / "test").mkdir(parents=True)
        lines = []
        for number, (sentence, texts) in enumerate(SENTENCES.items()):
            for speaker, gender in enumerate(("FEMALE", "MALE")):
                name = f"{sentence}{number}{speaker}.wav"
                samples = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
                soundfile.write(folder / "audio" / "test" / name, samples, 16_000)
                text = texts[language]
                lines.append("\t".join([sentence, name, text, text.lower(), "_", "16000", gender]))
        (folder / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_fleurs_folder_becomes_a_speech_manifest(fleurs):
    manifest = read_data(fleurs, required=("audio",))
    rows = manifest.table.to_pylist()
    assert len(rows) == 8
    first = next(row for row in rows if row["example_id"] == "de_de-100100")
    assert first["semantic_id"] == "1001" and first["language"] == "de" and first["fleurs_language"] == "de_de"
    assert first["text"] == "Das ist ein Test." and first["speaker_gender"] == "female"
    assert first["modality"] == "speech" and first["split"] == "test"
    assert soundfile.info(first["audio"]).samplerate == 16_000
    # translations share the FLEURS sentence id
    assert {row["language"] for row in rows if row["semantic_id"] == "1002"} == {"de", "ja"}


def test_fleurs_languages_and_limit(fleurs):
    manifest = read_data(fleurs, required=("audio",), languages=("ja",), limit=3)
    assert {row["language"] for row in manifest.table.to_pylist()} == {"ja"} and len(manifest) == 3


def test_record_from_fleurs(run_cli, tiny_model_dir, fleurs, tmp_path):
    store = tmp_path / "store"
    code, out, err = run_cli(
        "record", "--model", str(tiny_model_dir("seamless_m4t_v2")), "--data", str(fleurs), "--store", str(store),
        "--run", "fleurs", "--languages", "de_de", "--limit", "2", "--task", "asr", "--max-new-tokens", "3",
        "--hooks", "text_decoder.layers.*.ffn.fc1",
    )  # fmt: skip
    assert code == 0, err
    with Store.open(store).query() as session:
        rows = session.sql("SELECT example_id, language, tgt_lang, semantic_id FROM examples ORDER BY 1").to_pylist()
    assert rows == [
        {"example_id": "de_de-100100", "language": "de", "tgt_lang": "deu", "semantic_id": "1001"},
        {"example_id": "de_de-100101", "language": "de", "tgt_lang": "deu", "semantic_id": "1001"},
    ]


def test_bad_fleurs_input(fleurs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder but not in the FLEURS layout"):
        read_data(tmp_path / "empty")
    with pytest.raises(UserError, match="split must be one of train, dev, test"):
        read_data(fleurs, split="validation")
    with pytest.raises(UserError, match="FLEURS has no language 'fr' here; present: de_de, ja_jp"):
        read_data(fleurs, languages=("fr",))
    with pytest.raises(UserError, match="has no train recordings"):
        read_data(fleurs, split="train")
    (fleurs / "data" / "de_de" / "test.tsv").write_text("1001 no tabs here\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"test.tsv, line 1: expected tab-separated FLEURS columns"):
        read_data(fleurs)


def test_a_text_run_of_fleurs_is_labelled_text(run_cli, tiny_model_dir, fleurs, tmp_path):
    """FLEURS rows say modality = speech; a T2TT run reads their transcripts, and was stored as speech: ranking
    it with an S2TT run refused the modality presets ("only modality = 'speech'") and --preset unimodal mixed the
    text-conditioned decoder into unimodal/speech/* (and magnitudes --by modality merged the two)."""
    store = tmp_path / "store"
    model = str(tiny_model_dir("seamless_m4t_v2"))
    common = ["--data", str(fleurs), "--store", str(store), "--limit", "2", "--max-new-tokens", "2"]
    hooks = ["--hooks", "text_decoder.layers.*.ffn.fc1"]
    for run, task in (("s2tt", "s2tt"), ("t2tt", "t2tt")):
        code, _, err = run_cli("record", "--model", model, "--run", run, "--task", task, *common, *hooks)
        assert code == 0, err
    with Store.open(store).query() as session:
        rows = session.sql("SELECT run, modality, count(*) AS n FROM examples GROUP BY ALL ORDER BY ALL").to_pylist()
    assert rows == [{"run": "s2tt", "modality": "speech", "n": 4}, {"run": "t2tt", "modality": "text", "n": 4}]
    code, out, err = run_cli("ap", "--store", str(store), "--run", "s2tt", "--run", "t2tt", "--preset", "modality",
                             "--k", "2")  # fmt: skip
    assert code == 0, err
    with Store.open(store).query() as session:
        sets = session.sql("SELECT DISTINCT label_set, n_positive FROM scores ORDER BY 1").to_pylist()
    assert sets == [{"label_set": "modality/speech", "n_positive": 4}, {"label_set": "modality/text", "n_positive": 4}]


def test_the_python_api_labels_a_text_read_of_fleurs_text(fleurs):
    from hookpoints.record_api import as_manifest

    assert set(as_manifest(fleurs, "text").table["modality"].to_pylist()) == {"text"}
    assert set(as_manifest(fleurs, "audio").table["modality"].to_pylist()) == {"speech"}
