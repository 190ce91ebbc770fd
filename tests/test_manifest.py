"""Manifests in JSONL, CSV and Parquet, and the one-line errors for bad ones."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hookpoints.errors import UserError
from hookpoints.manifest import read_manifest

ROWS = [{"id": "001", "text": "Hello.", "language": "en"}, {"id": "002", "text": "Hallo.", "language": "de"}]


def test_the_three_formats_give_the_same_table(tmp_path, write_manifest):
    jsonl = write_manifest(ROWS)
    csv = tmp_path / "m.csv"
    csv.write_text("id,text,language\n001,Hello.,en\n002,Hallo.,de\n", encoding="utf-8")
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    tables = [read_manifest(path).table for path in (jsonl, csv, parquet)]
    for table in tables:
        assert table.column_names == ["example_id", "text", "language"]
        assert table["example_id"].to_pylist() == ["001", "002"]  # CSV keeps leading zeros
    assert tables[0].equals(tables[2])


def test_csv_inputs_that_look_like_numbers_stay_text(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,text,language,speaker\n001,1984,1,007\n002,2001,2,008\n", encoding="utf-8")
    table = read_manifest(path).table
    assert table["text"].to_pylist() == ["1984", "2001"]
    assert table["language"].to_pylist() == ["1", "2"]
    assert table["speaker"].to_pylist() == ["007", "008"]  # a label that would lose its leading zeros stays text


def test_csv_labels_keep_a_number_type_only_when_no_text_changes(tmp_path):
    path = tmp_path / "m.csv"
    rows = ["1,+1,1,7,0.5,2024-01-01,true,1,", "2,2,1.0,12,2.25,2024-01-02,false,,"]
    path.write_text("id,sign,mixed,age,score,day,flag,gap,empty\n" + "\n".join(rows) + "\n", encoding="utf-8")
    table = read_manifest(path, required=()).table
    assert table["sign"].to_pylist() == ["+1", "2"]
    assert table["mixed"].to_pylist() == ["1", "1.0"]  # 1 and 1.0 would both read as 1.0
    assert table["day"].to_pylist() == ["2024-01-01", "2024-01-02"]
    assert table["age"].to_pylist() == [7, 12] and table["age"].type == pa.int64()
    assert table["score"].to_pylist() == [0.5, 2.25]
    assert table["flag"].to_pylist() == [True, False]
    assert table["gap"].to_pylist() == [1, None]  # an empty cell of a number column is null
    assert table["empty"].null_count == 2


def test_numeric_ids_become_strings(write_manifest):
    manifest = read_manifest(write_manifest([{"id": 7, "text": "a"}, {"id": 8, "text": "b"}]))
    assert manifest.ids == ["7", "8"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("", "m.jsonl", "has no rows"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "m.jsonl", "duplicate ids \\('a'\\)"),
        ('{"id": "a"}\n', "m.jsonl", "has no 'text' column \\(it has: id\\): add it"),
        ('{"text": "x"}\n', "m.jsonl", "has no 'id' column"),
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": "   "}\n', "m.jsonl", "example 'b' has empty text"),
        ('{"id": "a", "text": 1984}\n', "m.jsonl", "example 'a' has text 1984 \\(int\\), not a string; .* quote it"),
        ('{"id": "a", "text": "x"}\n{"id": "b", "text": }\n', "m.jsonl", "line 2: not valid JSON"),
        ('["a", "x"]\n', "m.jsonl", "line 1: expected a JSON object per line"),
        ('{"id": "a", "text": "x", "n": 1}\n{"id": "b", "text": "y", "n": "two"}\n', "m.jsonl", "mixes types"),
        ('{"id": "", "text": "x"}\n', "m.jsonl", "row 1 has no id"),
        ('{"id": "a", "text": "x"}\n{"id": " \\t", "text": "y"}\n', "m.jsonl", "row 2 has an id of only whitespace"),
        ("id,text\na,x\n  ,y\n", "m.csv", "row 2 has an id of only whitespace \\('  '\\)"),
        ('{"id": "a", "example_id": "b", "text": "x"}\n', "m.jsonl", "has an 'example_id' column"),
        ("id,text\n", "m.csv", "has no rows"),
        ("id,text\na,1,2\n", "m.csv", "is not a readable CSV file"),
        ("not parquet", "m.parquet", "is not a readable Parquet file"),
        ("id\ta", "m.tsv", "unknown format '.tsv'"),
    ],
)
def test_bad_manifests(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as caught:
        read_manifest(path)
    assert "\n" not in str(caught.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("name", "content"), [("m.jsonl", '{"id": "a", "text": "x"}\n'), ("m.csv", "id,text\na,x\n")])
def test_a_byte_order_mark_is_skipped(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + content.encode())
    assert read_manifest(path).table.to_pylist() == [{"example_id": "a", "text": "x"}]
