"""``hookpoints record``: a manifest through a model, pooled activations into a store."""

from __future__ import annotations

import click

from cli.console import counting, err, out


@click.command("record")
@click.option("--model", required=True, help="Folder written by save_pretrained, or a hub id.")
@click.option("--data", required=True, type=click.Path(), help="Manifest: .jsonl, .csv or .parquet with id, text.")
@click.option("--store", "store_path", required=True, help="Store folder or s3:// URI (created if missing).")
@click.option("--run", required=True, help="Name of this recording in the store.")
@click.option(
    "--hooks",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Hook points to record (repeatable; default: every canonical hook point).",
)
@click.option(
    "--pooling",
    type=click.Choice(["mean", "last", "max", "none"]),
    default="mean",
    show_default=True,
    help="Per example over valid positions; none keeps every position.",
)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage precision of the activations.",
)
@click.option("--modality", type=click.Choice(["text", "speech"]), help="Input the model is loaded for.")
@click.option(
    "--model-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Precision the model runs in.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an existing run: record only missing examples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run of that name.")
def command(
    model,
    data,
    store_path,
    run,
    patterns,
    pooling,
    batch_size,
    dtype,
    modality,
    model_dtype,
    device,
    resume,
    overwrite,
) -> None:
    """Record pooled activations of MODEL on the examples of --data into --store."""
    from hookpoints.loading import load
    from hookpoints.manifest import read_manifest
    from hookpoints.recorder import record
    from store.catalog import Store, validate_run_name
    from store.errors import UserError

    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    validate_run_name(run)
    manifest = read_manifest(data)
    with err.status(f"loading {model}"):
        hooked = load(model, modality=modality, dtype=model_dtype, device=device)
        hooked.select(list(patterns) or None)  # bad hook patterns fail here, before the store is touched
    store = Store.open(store_path, create=True)
    with counting(f"recording {run}") as (on_start, on_batch):
        summary = record(
            hooked,
            manifest,
            store,
            run,
            hooks=list(patterns) or None,
            pooling=pooling,
            batch_size=batch_size,
            dtype=dtype,
            if_exists="resume" if resume else "overwrite" if overwrite else "error",
            on_start=on_start,
            on_batch=on_batch,
        )
    out.print(
        f"recorded {summary.recorded} examples ({summary.skipped} already there) at {summary.hooks} hook points "
        f"into run [bold]{run}[/bold] of {store.location.uri} in {summary.seconds:.1f} s"
    )
