"""``hp.Store``: the activation store with the calls a notebook makes (``sql``, ``runs``, ``info``).

A thin subclass of :class:`hookpoints.store.catalog.Store`: opening, writing and the SQL session are the
store's own (read-only SQL, one consistent version per query); these methods only open a session per call and
hand back Arrow tables (``.to_pandas()``, ``.to_pylist()``, ``.column(...).to_numpy()`` at hand).
"""

from __future__ import annotations

import pyarrow as pa

from hookpoints.store.catalog import Store as CatalogStore


class Store(CatalogStore):
    """An activation store (a folder or an ``s3://`` prefix). Open one with :meth:`Store.open`.

    >>> store = hp.Store.open("my-store", create=True)  # doctest: +SKIP
    >>> store.sql("SELECT hook, count(*) AS n FROM activations GROUP BY hook").to_pandas()  # doctest: +SKIP
    """

    def sql(self, query: str, params: dict | None = None, **options) -> pa.Table:
        """Run one read-only SELECT over the store's views (runs, hooks, examples, activations, neurons, ...).

        ``params`` fills ``$name`` placeholders; ``options`` go to the session's ``sql`` (``timeout=`` seconds:
        the query is stopped with a one-line error past it).

        >>> store.sql("SELECT * FROM examples WHERE run = $run", {"run": "r1"}).to_pandas()  # doctest: +SKIP
        """
        with self.query() as session:
            return session.sql(query, params, **options)

    def runs(self) -> pa.Table:
        """One row per run: model, task, pooling, dtype, status, examples and hook points held.

        >>> store.runs().to_pandas()[["run", "status", "examples"]]  # doctest: +SKIP
        """
        from hookpoints.store.summary import run_summary

        rows = run_summary(self)
        return pa.Table.from_pylist(rows) if rows else self.sql("SELECT * FROM runs")

    def info(self) -> dict:
        """Where the store is, its schema version, its runs and its tables' sizes (files, rows, MiB).

        >>> store.info()["tables"]  # doctest: +SKIP
        """
        from hookpoints.store.summary import table_sizes

        return {
            "uri": self.location.uri,
            "schema_version": self.schema_version(),
            "runs": self.runs().to_pylist(),
            "tables": table_sizes(self),
        }

    def __repr__(self) -> str:
        return f"Store({self.location.uri!r})"
