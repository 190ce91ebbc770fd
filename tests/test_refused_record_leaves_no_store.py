"""A recording refused before its first write leaves nothing behind: no store folder where there was none
(before, the store was created first, and a refusal left an empty store to puzzle over), and an existing store
as it was."""

from __future__ import annotations

import pytest
from hookpoints.store.catalog import Store

import hookpoints as hp
from hookpoints.errors import UserError

REFUSED = {
    "sampling a forward pass": ({"task": "forward", "sampling": hp.Sampling(temperature=0.7)}, "sampling applies to"),
    "frames on text": ({"frames": 300}, "frames applies to speech input"),
    "over max_bytes": ({"hooks": "blocks.*.attn.hook_pattern", "pooling": "none", "max_bytes": 1024}, "over"),
    "a bad if_exists": ({"if_exists": "replace"}, "if_exists must be error, resume or overwrite"),
    "a bad buffer size": ({"max_buffer_bytes": -1}, "max_buffer_bytes must be a whole number"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_python_record_creates_no_store(tiny_model_dir, texts_manifest, tmp_path, case):
    options, message = REFUSED[case]
    options = {"hooks": "blocks.0.hook_resid_post", **options}
    model, where = hp.load(tiny_model_dir("gpt2")), tmp_path / "new-store"
    with pytest.raises(UserError, match=message):
        hp.record(model, texts_manifest(4), where, "r", progress=False, **options)
    assert not where.exists()
    hp.record(model, texts_manifest(4), where, "r", hooks="blocks.0.hook_resid_post", progress=False)
    assert Store.open(where).run_info("r").status == "complete"  # created at the first write


def test_a_refused_cli_record_creates_no_store_and_keeps_an_existing_one(
    tiny_model_dir, texts_manifest, tmp_path, run_cli
):
    where = tmp_path / "new-store"
    common = ["record", "--model", str(tiny_model_dir("gpt2")), "--data", str(texts_manifest(4)), "--store", str(where)]
    code, _, err = run_cli(*common, "--run", "r", "--sample", "--temperature", "0.7")  # task forward: refused
    assert code == 2 and "sampling applies to" in err and len(err.strip().splitlines()) == 1
    assert not where.exists()
    code, out, err = run_cli(*common, "--run", "r", "--hooks", "blocks.0.hook_resid_post")
    assert code == 0, err
    assert str(where) in out.replace("\n", "")
    before = sorted(path.relative_to(where) for path in where.rglob("*"))
    code, _, err = run_cli(*common, "--run", "s", "--sample", "--temperature", "0.7")
    assert code == 2 and "sampling applies to" in err
    assert sorted(path.relative_to(where) for path in where.rglob("*")) == before  # not a file more
