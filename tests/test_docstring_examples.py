"""The examples in the docstrings of ``hookpoints.__all__`` (what ``help(hp.X)`` shows in Jupyter) run as written,
in the order of ``__all__``, on a tiny GPT-2 and a store of its runs, with hub ids and paths replaced by local
ones; an example with an expected output must print it. Examples marked ``+SKIP`` and the intervention sweep's
(which need a trained speech model's runs) are not run; everything else is."""

from __future__ import annotations

import doctest
import inspect
import json

import numpy as np
import pytest

import hookpoints as hp

#: Names whose examples need recorded speech generations (SeamlessM4T s2tt/t2tt runs): not run here.
NOT_RUN = {"plan_sweep", "run_sweep", "figure5"}
LANGUAGES = ("de", "en", "fr")


def rows(n: int, modality: str) -> list[dict]:
    words = "the weather is nice today das wetter ist schön il fait beau".split()
    return [
        {"id": f"{modality}{i:03d}", "text": " ".join(words[(i + j) % len(words)] for j in range(2 + i % 5)),
         "language": LANGUAGES[i % 3], "modality": modality}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def context(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("docstrings")
    gpt2 = hp.load(tiny_model_dir("gpt2"))
    store = hp.Store.open(folder / "store", create=True)
    hp.record(gpt2, rows(40, "text"), store, run="r1", progress=False)
    hp.record(gpt2, rows(12, "speech"), store, run="s2tt", progress=False)
    hp.record(gpt2, rows(12, "text"), store, run="t2tt", progress=False)
    job = hp.plan_ranking(store, ["r1"], custom=[hp.custom_label_set("language = 'de'", name="de")], ks=(10,))
    hp.write_scores(store, hp.rank(store, job))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows(3, "text")))
    paths = {
        "path/to/seamless": str(tiny_model_dir("seamless_m4t_v2")),
        "facebook/seamless-m4t-v2-large": str(tiny_model_dir("seamless_m4t_v2")),
        "/tmp/tiny-gpt2": str(folder / "tiny-gpt2"),
        # SeamlessM4T's shared decoder is GPT-2's one module group (overlap ran over a group that does not exist
        # and gave a matrix of zeros without a word, until it checked its component)
        '"text_decoder"': '"lm"',
    }
    return folder, gpt2, store, paths


def test_every_docstring_example_of_the_public_names_runs(context, monkeypatch, capsys):
    folder, gpt2, store, paths = context
    monkeypatch.chdir(folder)
    namespace = {"hp": hp, "np": np, "store": store, "direction": np.ones(64)}
    namespace.update({name: getattr(hp, name) for name in hp.__all__})
    ran, failures = [], []
    for name in hp.__all__:
        docstring = inspect.getdoc(getattr(hp, name)) or ""
        examples = [e for e in doctest.DocTestParser().get_examples(docstring) if not e.options.get(doctest.SKIP)]
        if name in NOT_RUN or not examples:
            continue
        namespace["model"] = gpt2  # each page of help() starts from the GPT-2 it speaks of
        for example in examples:
            source = example.source
            for placeholder, local in paths.items():
                source = source.replace(placeholder, local)
            capsys.readouterr()
            try:
                try:
                    shown = repr(eval(compile(source, name, "eval"), namespace))  # noqa: S307 - our own docstrings
                except SyntaxError:
                    exec(compile(source, name, "exec"), namespace)  # noqa: S102
                    shown = capsys.readouterr().out.strip()
            except Exception as error:  # noqa: BLE001 - every failure is collected and reported
                failures.append(f"{name}: {source.strip()!r} raised {type(error).__name__}: {error}")
                continue
            if example.want.strip() and shown != example.want.strip():
                failures.append(f"{name}: {source.strip()!r} shows {shown!r}, its docstring says {example.want!r}")
        ran.append(name)
    assert not failures, "\n".join(failures)
    assert {"overlap", "overlap_figure", "dendrogram_figure", "magnitude_figure", "UserError", "act_name"} <= set(ran)
