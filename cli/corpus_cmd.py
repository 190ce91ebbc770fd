"""``hookpoints corpus``: write the bundled corpus' text and speech manifests (speech synthesised once, cached)."""

from __future__ import annotations

import click
from hookpoints.cli.console import out, progress


@click.command("corpus")
@click.option("--out", "directory", type=click.Path(), help="Folder for the manifests and audio (default: the cache).")
@click.option("--limit", type=int, help="Only the first N sentences per language.")
@click.option("--text-only", is_flag=True, help="Write the text manifest only (no espeak-ng needed).")
def command(directory: str | None, limit: int | None, text_only: bool) -> None:
    """Write text.jsonl and speech.jsonl of the bundled corpus (en, de, es, fr, zh, ja; espeak-ng speech);
    text-limitN.jsonl and speech-limitN.jsonl with --limit N."""
    from hookpoints.corpus import VARIANTS, corpus_manifests, corpus_rows

    if text_only:  # no speech, no bar (an empty "speech 0/0" bar was printed)
        manifests = corpus_manifests(directory, limit=limit, speech=False)
    else:
        with progress() as bar:
            task = bar.add_task("speech (espeak-ng)", total=len(corpus_rows(limit=limit)) * len(VARIANTS))
            manifests = corpus_manifests(directory, limit=limit, on_file=lambda n: bar.advance(task, n))
    out.print(f"text:   {manifests.text}  ({manifests.text_rows} rows)")
    if manifests.speech:
        out.print(f"speech: {manifests.speech}  ({manifests.speech_rows} rows, voices {', '.join(VARIANTS)})")
