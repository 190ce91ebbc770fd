"""One self-contained HTML report of a store: its runs, and every figure of the SeamlessM4T v2 neuron paper
(seeds/seamless-m4t-v2-neurons.txt) and of "Demystifying Representation Spaces of Multilingual and Multimodal
Aspects in Large Audio Language Models" (seeds/lalm-representation-spaces.txt) for the analyses it holds
(docs/report.md). It reads only the store, through SQL aggregates: rankings from ``scores``, sweeps from
``intervention_scores``, clustering from ``clusters`` with its stored maps; magnitudes are one aggregate over
the activations. A store without some analysis says so and names the command that makes it.

Example::

    from hookpoints.store.catalog import Store
    from hookpoints.analyses.report import write_report
    path = write_report(Store.open("demo-store"), out="report.html")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from hookpoints.analyses.arguments import as_store, name_list
from hookpoints.analyses.report_html import Page, absent, esc, paragraph
from hookpoints.store.catalog import Store

from hookpoints.errors import UserError

#: The seed text of the SeamlessM4T v2 paper carries no title (it opens with its abstract), so it is named by
#: its subject; the LALM paper by its title.
SEAMLESS = "the SeamlessM4T v2 neuron paper"
LALM = "Demystifying Representation Spaces of Multilingual and Multimodal Aspects in Large Audio Language Models"


def write_report(
    store: Store,
    runs: list[str] | None = None,
    out: str | Path | None = None,
    *,
    magnitudes: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Write the report of ``store`` (only ``runs`` and the analyses over them, if given) to ``out``.

    ``out`` defaults to ``report.html`` next to a local store (``STORE-report.html``). Returns the path.

    >>> path = write_report(hp.Store.open("my-store"), runs=["s2tt", "t2tt"])  # doctest: +SKIP
    """
    from hookpoints.analyses.report_clusters import add_analysis, analyses_of
    from hookpoints.analyses.report_runs import add_runs
    from hookpoints.analyses.report_selectivity import add_ranking, add_sweep, rankings, sweeps

    started = time.perf_counter()
    step = on_step or (lambda _: None)
    store = as_store(store)
    runs = name_list(runs, "runs") if runs is not None else None
    path = _out_path(store, out)
    _check_writable(path)  # before the work: a bad --out fails in a second, not after the figures
    uri = store.location.uri
    page = Page(f"hookpoints report: {uri}")
    with store.query() as session:
        stored = session.sql("SELECT run FROM runs ORDER BY created_at")["run"].to_pylist()
        if runs:
            missing = [run for run in runs if run not in stored]
            if missing:
                raise UserError(f"run {missing[0]!r} is not in store {uri}; it has {', '.join(stored) or 'no runs'}")
        chosen = list(runs) if runs else stored
        step("runs")
        add_runs(page.section("Runs"), session, chosen, uri)

        step("AP rankings")
        section = page.section(f"Language- and modality-specific neurons ({SEAMLESS})")
        found = rankings(session, chosen if runs else None)
        if not found:
            command = f"hookpoints ap --store {uri} --run RUN [--run RUN2] --preset all"
            section.add(absent("AP ranking (scores table)", command))
        for ranking in found:
            step(f"ranking {ranking['ranking']}")
            add_ranking(section.section(f"AP ranking {ranking['ranking']}"), session, ranking, magnitudes=magnitudes)

        step("interventions")
        section = page.section(f"Interventions (Figure 5 of {SEAMLESS})")
        found = sweeps(session, chosen if runs else None)
        if not found:
            command = f"hookpoints intervene --store {uri} --run RUN --task s2tt --sweep NAME ..."
            section.add(absent("intervention sweep", command))
        for sweep in found:
            step(f"sweep {sweep}")
            add_sweep(section.section(f"Sweep {sweep}"), session, sweep)

        step("clusters")
        section = page.section(f"Representation spaces ({LALM})")
        found = analyses_of(session, chosen if runs else None)
        if not found:
            section.add(absent("clustering analysis", f"hookpoints clusters --store {uri} --run RUN --label language"))
        for info in found:
            step(f"clusters {info['analysis']}")
            add_analysis(
                section.section(f"Clusters of run {info['run']} by {', '.join(info['labels'] or [])}"), session, info
            )
    seconds = time.perf_counter() - started
    page.intro.append(
        paragraph(
            f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by hookpoints report in {seconds:.1f} s from the store "
            f"alone; runs: {', '.join(chosen) or 'none'}."
        )
    )
    page.intro.append(
        f'<p class="note">Figures follow {esc(SEAMLESS)} (language- and modality-selective neurons, AP ranking, '
        "median-replacement interventions, activation magnitudes; its seed text carries no title) and "
        f"<i>{esc(LALM)}</i>; figure and table numbers in the section titles are those papers'.</p>"
    )
    partial = _partial(path)
    try:
        partial.write_text(page.html(), encoding="utf-8")
        os.replace(partial, path)  # a failed write leaves no half report
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write the report to {path}: {error.strerror or error}") from None
    return path


def _out_path(store: Store, out: str | Path | None) -> Path:
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise UserError(f"--out {path} is a folder: give a file name such as {path / 'report.html'}")
        if path.suffix.lower() not in (".html", ".htm"):
            raise UserError(f"--out {path} must end in .html (the report is one HTML file)")
        if store.location.is_local and path.resolve().is_relative_to(Path(store.location.uri).resolve()):
            raise UserError(
                f"--out {path} is inside the store: write the report elsewhere (a store holds only its own tables; "
                "`hookpoints store verify` flags any other file)"
            )
        return path
    if store.location.is_local:
        root = Path(store.location.uri)
        return root.parent / f"{root.name}-report.html"
    return Path.cwd() / "hookpoints-report.html"


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _check_writable(path: Path) -> None:
    """Make ``path``'s folder and write a probe file there, or a one-line UserError."""
    probe = _partial(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write the report to {path}: {error.strerror or error}; pick another --out") from None


#: ``hookpoints.report(store, ...)``: the name the package root exports.
report = write_report
