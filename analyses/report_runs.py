"""The report's runs section: each run's settings, examples per language x modality, hook points per
component, and samples of generated text. Aggregates only (SQL over ``runs``, ``examples``, ``hooks``)."""

from __future__ import annotations

from hookpoints.analyses.labels import quote_name
from hookpoints.analyses.report_html import Section, absent, esc, table
from hookpoints.store.query import QuerySession
from hookpoints.store.quoting import sql_string

SAMPLES_PER_RUN = 6


def literals(values: list[str]) -> str:
    """SQL string literals (constants push down to the Delta partitions)."""
    return ", ".join(sql_string(value) for value in values)


def columns_of(session: QuerySession, view: str) -> list[str]:
    return session.sql(f"SELECT * FROM {view} LIMIT 0").column_names


def add_runs(section: Section, session: QuerySession, runs: list[str], store_uri: str) -> None:
    """Fill ``section`` with one subsection per run (``runs`` in the order of the store)."""
    if not runs:
        section.add(absent("runs", f"hookpoints record --store {store_uri} --model MODEL --data MANIFEST --run RUN"))
        return
    names = literals(runs)
    overview = session.sql(
        f"""SELECT r.run, r.model, r.task, r.pooling, r.dtype, r.status,
                   (SELECT count(*) FROM examples e WHERE e.run = r.run) AS examples,
                   (SELECT count(*) FROM hooks h WHERE h.run = r.run) AS hook_points,
                   strftime(r.created_at, '%Y-%m-%d %H:%M') AS created
            FROM runs r WHERE r.run IN ({names}) ORDER BY r.created_at"""
    ).to_pylist()
    section.add(table(overview))
    example_columns = columns_of(session, "examples")
    cells = [c for c in ("language", "modality") if c in example_columns]
    generated = "generated_text" in example_columns
    hooks = session.sql(
        f"""SELECT run, coalesce(component, '(none)') AS component, count(*) AS hook_points,
                   count(DISTINCT layer) AS layers, count(DISTINCT submodule) AS submodules, sum(width) AS neurons,
                   count(*) FILTER (WHERE layer_output) AS layer_outputs
            FROM hooks WHERE run IN ({names}) GROUP BY ALL ORDER BY run, component"""
    ).to_pylist()
    by_cell = []
    if cells:
        keys = ", ".join(quote_name(c) for c in cells)
        by_cell = session.sql(
            f"SELECT run, {keys}, count(*) AS examples FROM examples WHERE run IN ({names}) GROUP BY ALL ORDER BY ALL"
        ).to_pylist()
    for run in [row["run"] for row in overview]:
        sub = section.section(f"Run {run}")
        info = next(row for row in overview if row["run"] == run)
        sub.add(
            f"<p>Model <b>{esc(info['model'])}</b>, task <b>{esc(info['task'])}</b>, pooling "
            f"<b>{esc(info['pooling'])}</b>, {esc(info['dtype'])}; {info['examples']:,} examples, "
            f"{info['hook_points']:,} hook points; status {esc(info['status'])}.</p>"
        )
        mine = [{k: v for k, v in row.items() if k != "run"} for row in by_cell if row["run"] == run]
        if any(row[c] is not None for row in mine for c in cells):
            sub.add(table(_pivot(mine, cells), caption=f"examples per {' x '.join(cells)}"))
        sub.add(
            table(
                [{k: v for k, v in r.items() if k != "run"} for r in hooks if r["run"] == run],
                caption="hook points per component",
            )
        )
        if generated:
            sample = session.sql(
                f"""SELECT example_id, {", ".join(quote_name(c) for c in cells) + "," if cells else ""}
                           generated_tokens, generated_text
                    FROM examples WHERE run IN ({literals([run])}) AND generated_text IS NOT NULL
                    ORDER BY example_id LIMIT {SAMPLES_PER_RUN}"""
            ).to_pylist()
            if sample:
                sub.add(table(sample, caption=f"generated text (first {len(sample)} examples)"))


def _pivot(rows: list[dict], cells: list[str]) -> list[dict]:
    """Examples per language (rows) x modality (columns) when both exist; else the rows as they are."""
    if len(cells) != 2:
        return rows
    first, second = cells
    columns = sorted({str(r[second]) for r in rows})  # a null shows as "None"
    table_rows: dict[str, dict] = {}
    for r in rows:
        entry = table_rows.setdefault(str(r[first]), {first: r[first], **{c: 0 for c in columns}})
        entry[str(r[second])] = r["examples"]
    return list(table_rows.values())
