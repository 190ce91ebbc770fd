"""Hostile stores for ``hookpoints store verify``: real damage named by file, healthy stores passing."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
from hookpoints.store.catalog import Store
from hookpoints.store.location import StoreLocation
from hookpoints.store.verify import verify

from tests.hostile_helpers import fill


def errors(store: Store) -> list[str]:
    """verify's errors, from a Store object made without reading anything (its store_meta may be damaged)."""
    fresh = Store(StoreLocation.parse(store.location.uri))
    return [f"{f.table}: {f.message}" for f in verify(fresh).findings if f.level == "error"]


def data_file(root, table="activations"):
    return sorted(path for path in (root / table).rglob("*.parquet") if "_delta_log" not in path.parts)[0]


def test_a_healthy_store_with_input_hooks_passes(store):
    """Partition paths are URL-encoded in the log (hook=h%253Ainput): decoded, they are found."""
    fill(store, "r1", hook_names=("blocks.0.mlp:input", "blocks.0.attn:output"))
    assert errors(store) == []


def test_flipped_bytes_in_a_parquet_file_of_unchanged_size_are_found_by_page_checksum(store, tmp_path):
    fill(store, "r1")
    root = tmp_path / "store"
    path = data_file(root)
    data = bytearray(path.read_bytes())
    middle = len(data) // 3  # inside the first column chunk's pages
    for offset in (0, 7, 13):
        data[middle + offset] ^= 0xFF
    path.write_bytes(bytes(data))
    found = errors(store)
    assert any(path.name in message and "damaged" in message for message in found), found


@pytest.mark.parametrize("table", ["activations", "store_meta"])
@pytest.mark.parametrize("case", ["truncated", "garbage", "deleted", "outside"])
def test_a_damaged_delta_log_is_named_without_a_backtrace(store, tmp_path, case, table):
    fill(store, "r1")
    log = tmp_path / "store" / table / "_delta_log"
    assert '"path":"' in sorted(log.glob("*.json"))[-1].read_text()  # the last entry adds a file
    entry = sorted(log.glob("*.json"))[-1]
    if case == "truncated":
        entry.write_bytes(entry.read_bytes()[:50])
    elif case == "garbage":
        entry.write_bytes(b"\x00\xff not json\n")
    elif case == "deleted":
        shutil.rmtree(log)
    else:
        entry.write_text(entry.read_text().replace('"path":"', '"path":"../../../elsewhere/', 1))
    found = errors(store)
    assert len(found) == 1 and table in found[0], found
    named = "_delta_log is missing" if case == "deleted" else entry.name
    assert named in found[0] and "<unknown>" not in found[0] and "\n" not in found[0]
    if case == "outside":
        assert "outside" in found[0]


def test_a_table_registered_outside_the_store_is_not_read(store, tmp_path):
    other = Store.open(tmp_path / "other", create=True)
    fill(other, "theirs")
    fill(store, "mine")
    store._append_meta({"table:../other/activations": "{}"})
    assert "../other/activations" not in store.table_names()
    with store.query() as session:
        assert session.sql("SELECT DISTINCT run FROM activations")["run"].to_pylist() == ["mine"]
    found = errors(store)
    assert found == ["store_meta: registers a table named '../other/activations', which is not inside the store"]


@pytest.mark.parametrize(
    "where", ["activations/_delta_log/.tmp/evil.pkl", "activations/run=r1/x.pkl.parquet", "examples/notes.txt"]
)
def test_every_file_that_is_not_parquet_data_or_a_log_entry_is_flagged(store, tmp_path, where):
    fill(store, "r1")
    path = tmp_path / "store" / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.")  # a pickle's bytes, never loaded
    found = errors(store)
    assert len(found) == 1 and where.split("/", 1)[1] in found[0] and "unexpected file" in found[0], found


@pytest.mark.parametrize(
    ("contents", "level"),
    [
        (b"", "warning"),  # killed right after the file was opened
        (b"PAR1\x15\x00\x15\x8c\x01", "warning"),  # killed mid-file: the header magic and a page, no footer
        (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", "error"),  # a pickle under the writer's name
    ],
)
def test_a_file_cut_short_by_a_killed_writer_is_a_warning_and_anything_else_an_error(store, tmp_path, contents, level):
    """A recording killed while Arrow writes a flush's files leaves them unreferenced and without a footer; verify
    says so (the store is fine: no commit refers to them). A file under the same name that is not the start of a
    Parquet file stays an error."""
    fill(store, "r1")
    name = "activations/run=r1/hook=h0/part-" + "ab" * 16 + "-0.zstd.parquet"
    (tmp_path / "store" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "store" / name).write_bytes(contents)
    report = verify(Store.open(tmp_path / "store"))
    found = [(f.level, f.message) for f in report.findings if name.split("/", 1)[1] in f.message]
    assert len(found) == 1 and found[0][0] == level, report.findings
    assert ("cut short by an interrupted write" in found[0][1]) == (level == "warning")
    assert report.ok == (level == "warning")


@pytest.mark.parametrize("table", ["activations", "examples"])
@pytest.mark.parametrize("prefix", ["../../", "%2E%2E/%2E%2E/"])
def test_a_log_entry_adding_a_file_outside_the_store_is_not_read(store, tmp_path, run_cli, table, prefix):
    """A hostile log entry ``{"add": {"path": "../../secret.parquet"}}``: delta-rs and Arrow followed it, so SQL
    returned the rows of a Parquet file outside the store (any file the reader can read). Now every reader
    refuses the table with one line naming verify; verify names the entry."""
    import json

    import pyarrow.parquet as pq

    fill(store, "r1")
    root = tmp_path / "store"
    secret = pq.read_table(data_file(root, table))
    secret = secret.set_column(secret.schema.get_field_index("example_id"), "example_id", pa.array(["SECRET"] * 3))
    pq.write_table(secret, tmp_path / "secret.parquet")  # beside the store, where its log entry will point
    log = root / table / "_delta_log"
    number = len(list(log.glob("*.json")))
    partition = {"run": "evil", "hook": "h0"} if table == "activations" else {"run": "evil"}
    add = {"path": prefix + "secret.parquet", "partitionValues": partition, "dataChange": True, "modificationTime": 0,
           "size": (tmp_path / "secret.parquet").stat().st_size, "stats": json.dumps({"numRecords": 3})}  # fmt: skip
    entry = log / f"{number:020d}.json"
    entry.write_text(json.dumps({"commitInfo": {"operation": "WRITE"}}) + "\n" + json.dumps({"add": add}) + "\n")
    code, out, err = run_cli("sql", "--store", str(root), "--format", "csv", f"SELECT example_id FROM {table}")
    assert code == 2 and "SECRET" not in out, out
    assert err.startswith("error: table") and "outside the table's folder" in err and "store verify" in err, err
    assert len(err.strip().splitlines()) == 1
    found = errors(store)
    assert len(found) == 1 and entry.name in found[0] and "outside" in found[0], found


def test_a_log_entry_that_changes_a_column_type_is_one_line_for_sql(store, tmp_path, run_cli):
    """A log entry whose metaData makes ``activation`` a string: `hookpoints sql` printed DuckDB's Binder Error
    over several lines (exit 1); now one line naming verify, which names the column."""
    import json

    import numpy as np
    from hookpoints.store.writer import HookRows, open_run

    from tests.hostile_helpers import SETTINGS, hooks

    fill(store, "r1")
    examples = pa.table({"example_id": ["a"]})
    settings = {**SETTINGS, "dtype": "float16"}  # a float16 run: the view decodes it (coalesce with activation)
    writer = open_run(store, "r2", settings=settings, config={}, hooks=hooks(), examples_schema=examples.schema)
    writer.add(examples, {point["hook"]: HookRows(["a"], np.ones((1, 4), np.float32)) for point in hooks()})
    writer.finish()
    log = tmp_path / "store" / "activations" / "_delta_log"
    first = [json.loads(line) for line in (log / f"{0:020d}.json").read_text().splitlines() if line.strip()]
    meta = next(action["metaData"] for action in first if "metaData" in action)
    schema = json.loads(meta["schemaString"])
    for field in schema["fields"]:
        if field["name"] == "activation":
            field["type"] = "string"
    entry = log / f"{len(list(log.glob('*.json'))):020d}.json"
    entry.write_text(json.dumps({"metaData": {**meta, "schemaString": json.dumps(schema)}}) + "\n")
    code, out, err = run_cli("sql", "--store", str(tmp_path / "store"), "SELECT count(*) FROM activations")
    assert code == 2 and err.startswith("error: the activations view cannot be defined"), err
    assert "store verify" in err and len(err.strip().splitlines()) == 1, err
    assert "column 'activation' is string" in " ".join(errors(store))


def test_a_registered_table_whose_folder_was_deleted(store, tmp_path, run_cli):
    """`rm -rf STORE/scores` (dropping the analyses) left `table:scores` in store_meta: every `hookpoints sql`,
    even over `runs`, failed with FileNotFoundError, and `store verify` crashed with TableNotFoundError. Now SQL
    reads the other tables and verify names the table."""
    from hookpoints.analyses.ranking import SCORES_SCHEMA, SCORES_TABLE

    fill(store, "r1")
    store.append(SCORES_TABLE, pa.Table.from_pylist([{"run": "r1", "label_set": "x", "ap": 0.5}], schema=SCORES_SCHEMA))
    shutil.rmtree(tmp_path / "store" / "scores")
    code, out, err = run_cli("sql", "--store", str(tmp_path / "store"), "--format", "csv", "SELECT run FROM runs")
    assert code == 0 and out.split() == ["run", "r1"], err
    code, _, err = run_cli("sql", "--store", str(tmp_path / "store"), "SELECT * FROM scores")
    assert code == 2 and "scores does not exist" in err
    assert errors(store) == ["scores: scores/_delta_log is missing: the table cannot be read"]
    code, out, err = run_cli("store", "verify", str(tmp_path / "store"))
    assert code == 1 and "scores/_delta_log is missing" in out and "Error" not in err, err


def test_a_store_meta_entry_outside_the_store_added_while_a_store_is_open_is_refused(store, tmp_path):
    """A Store object follows store_meta's log incrementally: an entry adding `../../x.parquet` committed after
    its first read made it read that file's keys (a table registered by a file outside the store)."""
    import json

    import pyarrow.parquet as pq

    from hookpoints.errors import UserError

    fill(store, "r1")
    assert "table:evil" not in store.meta()
    pq.write_table(pa.table({"key": ["table:evil"], "value": ["{}"]}), tmp_path / "secret.parquet")
    log = tmp_path / "store" / "store_meta" / "_delta_log"
    add = {"path": "../../secret.parquet", "partitionValues": {}, "dataChange": True, "modificationTime": 0,
           "size": (tmp_path / "secret.parquet").stat().st_size}  # fmt: skip
    (log / f"{len(list(log.glob('*.json'))):020d}.json").write_text(json.dumps({"add": add}) + "\n")
    with pytest.raises(UserError, match="outside the table's folder"):
        store.meta()


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_symbolic_link_in_a_local_store_is_named(store, tmp_path, what):
    """A teammate's store can hold a link in place of a data file (or of a partition folder): readers follow
    it, so a table reads whatever file it points to on the reader's machine. The Parquet read through it is
    whole, so verify passed. Now verify names every link (readers do not check: docs/team-store.md)."""
    fill(store, "r1")
    path = data_file(tmp_path / "store")
    if what == "folder":
        path = path.parent
    elsewhere = tmp_path / "elsewhere" / path.name
    elsewhere.parent.mkdir()
    shutil.move(path, elsewhere)
    path.symlink_to(elsewhere)
    relative = path.relative_to(tmp_path / "store").as_posix()
    assert errors(store) == [
        f"store: {relative} is a symbolic link (to {elsewhere}): readers would read what it points to; a store "
        "holds plain files and folders only: replace it with the file itself or record the run again"
    ]
