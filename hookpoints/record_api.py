"""``hp.record``: record a model's activations on a manifest, a DataFrame or a list of dicts into a store.

In-memory data goes through the same checks as a manifest file (hookpoints.manifest: an ``id`` per example,
unique; the input column present and non-empty), then through the recorder the CLI uses. A progress bar shows
in a terminal and in Jupyter (rich).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from hookpoints.errors import UserError
from hookpoints.manifest import Manifest, checked, read_data
from hookpoints.model import HookedModel
from hookpoints.pooling import POOLINGS
from hookpoints.recorder import RecordSummary
from hookpoints.recorder import record as record_manifest
from hookpoints.store.catalog import Store as CatalogStore
from hookpoints.store.catalog import validate_run_name
from hookpoints.store_handle import Store


def record(
    model: HookedModel,
    data,
    store,
    run: str,
    *,
    hooks: str | list[str] | None = None,
    pooling: str = "mean",
    task: str = "forward",
    progress: bool = True,
    split: str | None = None,
    languages: list[str] | None = None,
    limit: int | None = None,
    **options,
) -> RecordSummary:
    """Record ``model``'s activations at ``hooks`` (globs; default: the listed hook points) into run ``run``.

    ``data``: a manifest path (JSONL / CSV / Parquet) or a FLEURS folder, a pandas DataFrame, a pyarrow
    Table, or a list of dicts, each with an ``id``, the input (``text``, or ``audio`` paths for a speech
    model) and any label columns. ``store``: a :class:`Store` or a folder / ``s3://`` URI (created if
    missing). ``split``, ``languages`` (``["de_de", "ja"]``) and ``limit`` (per language) choose recordings of a
    FLEURS folder. ``options`` are the recorder's (batch_size, dtype, tgt_lang, max_new_tokens, per_step, frames,
    template, sampling, if_exists, shard, max_bytes; see :func:`hookpoints.recorder.record`).

    >>> hp.record(model, [{"id": "a", "text": "Hallo", "language": "de"}], "my-store", run="r1",
    ...           hooks="blocks.*.hook_resid_post", pooling="mean")  # doctest: +SKIP
    """
    if not isinstance(model, HookedModel):
        raise UserError(f"record needs a model loaded with hp.load, not {type(model).__name__}")
    model.check_no_added_hooks()  # before a store is opened (or made)
    if not isinstance(run, str):
        raise UserError(f"run must be a name (a string), not {type(run).__name__}")
    validate_run_name(run)
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    patterns = [hooks] if isinstance(hooks, str) else list(hooks) if isinstance(hooks, (list, tuple)) else hooks
    if patterns is not None and not (isinstance(patterns, list) and all(isinstance(h, str) for h in patterns)):
        shown = (
            "a function (for a names predicate, pass the names it picks: "
            "[p.name for p in model.hook_points if p.unavailable is None and predicate(p.name)])"
        )
        raise UserError(f"hooks must be a glob or a list of globs, not {shown if callable(hooks) else repr(hooks)}")
    if patterns == []:  # recording every hook point of the model instead was a surprise (run_with_cache refuses it)
        raise UserError("hooks is empty: give a glob or a list of globs (None: the listed hook points)")
    model.select(patterns)  # unknown globs fail here, before the store is touched
    languages = [languages] if isinstance(languages, str) else languages
    if languages is not None and not languages:  # [] recorded every language of the folder
        raise UserError("languages is empty: name the FLEURS languages (['de_de']), or leave it out for all")
    fleurs = {"split": split, "languages": None if languages is None else tuple(languages), "limit": limit}
    manifest = as_manifest(data, "audio" if model.modality == "speech" else "text", **fleurs)
    store = open_store(store)
    with _progress(f"recording {run} ({task})", progress) as (on_start, on_batch):
        return record_manifest(
            model, manifest, store, run, hooks=patterns, pooling=pooling, task=task,
            on_start=on_start, on_batch=on_batch, **options,
        )  # fmt: skip


def as_manifest(data, input_column: str, **fleurs) -> Manifest:
    """``data`` (a path, a DataFrame, a pyarrow Table or a list of dicts) as a checked :class:`Manifest`;
    ``fleurs`` (split, languages, limit) choose recordings of a FLEURS folder."""
    if isinstance(data, (str, Path)):
        manifest = read_data(data, required=(), **fleurs)
        manifest.read_as(input_column)
        return manifest
    if any(value is not None for value in fleurs.values()):
        raise UserError("split, languages and limit choose recordings of a FLEURS folder, not of in-memory data")
    if type(data).__module__.split(".")[0] == "pandas" and type(data).__name__ == "DataFrame":
        source = "DataFrame"
        twice = list(data.columns[data.columns.duplicated()])
        if twice:
            raise UserError(f"the DataFrame has two columns named {twice[0]!r}: rename or drop one")
        try:
            table = pa.Table.from_pandas(data, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            message = f"the DataFrame has a column of mixed types ({_one_line(error)}): make each one type"
            raise UserError(message) from None
    elif isinstance(data, pa.Table):
        source, table = "Arrow table", data
    elif isinstance(data, (list, tuple)):
        source = "list of examples"
        if not data or not all(isinstance(row, dict) for row in data):
            raise UserError("data as a list needs one dict per example, e.g. {'id': 'a', 'text': 'Hallo'}")
        try:
            table = pa.Table.from_pylist(list(data))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise UserError(f"the examples mix types in a column ({_one_line(error)}): make each one type") from None
    else:
        raise UserError(
            f"data must be a manifest path, a FLEURS folder, a pandas DataFrame, a pyarrow Table or a list of "
            f"dicts, not {type(data).__name__}"
        )
    table = checked(table, f"the {source}", required=(input_column,), id_column="id")
    return Manifest(Path(f"<{source}>"), table)  # relative audio paths start at the working folder


def open_store(store) -> Store | Callable[[], Store]:
    """A :class:`Store` as given, the store at a folder / URI, or where there is none yet, a function that
    creates it there: the recorder calls it just before its first write, so a refused recording leaves no
    empty store folder behind."""
    if isinstance(store, CatalogStore):
        return store
    if not isinstance(store, (str, Path)):
        raise UserError(f"store must be a Store, a folder or an s3:// URI, not {type(store).__name__}")
    if Store.exists(store):
        return Store.open(store, create=True)
    return lambda: Store.open(store, create=True)


@contextmanager
def _progress(label: str, show: bool) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """``(on_start, on_batch)`` driving a rich progress bar (terminal or Jupyter); no-ops when not shown."""
    if not show:
        yield (lambda total: None), (lambda n: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hookpoints.progress_bar import bar_callbacks

    # on stderr, as the CLI's: a script's stdout (`python export.py > rows.csv`) stays its own; Jupyter shows it too
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True))
    with bar_callbacks(bar, label) as callbacks:
        yield callbacks


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
