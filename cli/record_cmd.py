"""``hookpoints record``: a manifest through a model, pooled activations into a store."""

from __future__ import annotations

import click
from hookpoints.cli.console import counting, err, out
from hookpoints.cli.params import FiniteFloat
from hookpoints.cli.placement_options import load_options, placement_options
from hookpoints.cli.sampling_options import sampling_from, sampling_options

from hookpoints.settings import POOLINGS, STORAGE_DTYPES
from hookpoints.tasks import TASKS


@click.command("record")
@click.option("--model", required=True, help="Folder written by save_pretrained, or a hub id.")
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="Manifest (.jsonl, .csv or .parquet with id, text and/or audio) or a FLEURS folder.",
)
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
    type=click.Choice(POOLINGS),
    default="mean",
    show_default=True,
    help="Per example over valid positions; none keeps every position.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(STORAGE_DTYPES),
    default="float32",
    show_default=True,
    help="Storage precision of the activations.",
)
@click.option(
    "--task",
    type=click.Choice(list(TASKS)),
    default="forward",
    show_default=True,
    help="forward pass; ASR / speech-to-text / text-to-text translation (decoder recorded over the output); "
    "continue: a decoder-only LM's continuation (recorded over the generated tokens). Greedy unless --sample.",
)
@click.option("--tgt-lang", help="Target language: s2tt/t2tt default eng; asr default each example's language.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Generation length limit.")
@click.option("--per-step", is_flag=True, help="Keep the generated steps' hooks per step (position = step).")
@click.option("--frames", type=int, help="Fix speech features to N frames by truncation / zero-padding (paper: 300).")
@click.option(
    "--template",
    metavar="TEXT",
    help="Audio LLMs: the prompt's text around the audio, which goes at {audio} (e.g. '{audio}Describe it:').",
)
@sampling_options
@click.option("--split", help="FLEURS split (train, dev, test; default test).")
@click.option("--languages", help="FLEURS languages, comma-separated (de_de or de).")
@click.option("--limit", type=int, help="FLEURS recordings per language at most.")
@click.option(
    "--modality",
    type=click.Choice(["text", "speech"]),
    help="Input for task forward (default: speech if the data has audio).",
)
@placement_options
@click.option("--resume", is_flag=True, help="Continue an existing run: record only missing examples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run of that name.")
@click.option(
    "--shard",
    metavar="I/N",
    help="Record only shard I of N of the examples (0-based); run one process per shard, on any machines.",
)
@click.option(
    "--buffer-mb",
    type=FiniteFloat(0),
    default=None,
    help="Commit at least every this many MB of activations, and at least once a minute (what a crash can lose). "
    "[default: 512, or a 32nd of this machine's memory where that is less]",
)
@click.option("--ray", "use_ray", is_flag=True, help="Run the model in a Ray actor pool (RAY_ADDRESS: a cluster).")
@click.option("--workers", type=int, help="With --ray: actors, one model each.  [default: 1]")
@click.option("--remote", is_flag=True, help="Run MODEL (a hub id) on NDIF through nnsight (needs NDIF_API_KEY).")
@click.option(
    "--prepend-bos", is_flag=True, help="Put the BOS token first in every text, as TransformerLens does by default."
)
@click.option(
    "--max-bytes",
    metavar="SIZE",
    help="Refuse the recording if its estimated size exceeds SIZE (2G, 500M, bytes); see `hookpoints hooks`.",
)
def command(
    model,
    data,
    store_path,
    run,
    patterns,
    pooling,
    batch_size,
    dtype,
    task,
    tgt_lang,
    max_new_tokens,
    per_step,
    frames,
    template,
    sample,
    temperature,
    top_k,
    top_p,
    sample_seed,
    split,
    languages,
    limit,
    modality,
    device,
    model_dtype,
    device_map,
    offload_folder,
    resume,
    overwrite,
    shard,
    buffer_mb,
    use_ray,
    workers,
    remote,
    prepend_bos,
    max_bytes,
) -> None:
    """Record pooled activations of MODEL on the examples of --data into --store."""
    from hookpoints.store.catalog import Store, validate_run_name
    from hookpoints.store.runs import parse_shard
    from hookpoints.store.writer import DEFAULT_BUFFER_BYTES

    from hookpoints.errors import UserError
    from hookpoints.loading import load, model_modalities
    from hookpoints.manifest import read_data
    from hookpoints.record_api import open_store
    from hookpoints.recorder import record
    from hookpoints.sizes import parse_size
    from hookpoints.tasks import get_task, input_modality

    if resume and overwrite:
        raise UserError("give --resume or --overwrite, not both")
    if use_ray and remote:
        raise UserError("give --ray or --remote, not both (NDIF runs the model for you)")
    if workers is not None and not use_ray:
        raise UserError("--workers is for --ray (actors, one model each); add --ray or leave --workers out")
    if buffer_mb is not None and buffer_mb < 0:
        raise UserError(f"--buffer-mb must be 0 or more, not {buffer_mb}")
    sampling = sampling_from(sample, temperature, top_k, top_p, sample_seed)
    shard_of = parse_shard(shard)
    placement = load_options(device, model_dtype, device_map, offload_folder)
    budget = parse_size(max_bytes) if max_bytes is not None else None
    validate_run_name(run)
    spec = get_task(task)
    chosen = None if languages is None else tuple(code.strip() for code in languages.split(",") if code.strip())
    if chosen == ():  # an empty --languages "$LANGS" recorded every language of the folder
        raise UserError("--languages is empty: name the FLEURS languages (de_de,ja_jp), or leave it out for all")
    manifest = read_data(data, required=(), split=split, languages=chosen, limit=limit)
    has_audio = "audio" in manifest.table.column_names
    modality = input_modality(spec, modality, has_audio, model_modalities(model))
    manifest.read_as("audio" if modality == "speech" else "text")
    run_batches = None
    if use_ray:  # "auto" resolved here, for the actors' device: Ray gives an actor a GPU only when the device
        # names CUDA, and the model loaded here (on the CPU, which tells the hook points apart and whose weights'
        # digest and dtype the run keeps) is loaded in the dtype the actors run, not the CPU's float32
        from hookpoints.placement import resolve_device, resolve_dtype

        there = resolve_device(device)
        device_here, dtype_there = str(there), str(resolve_dtype(model_dtype, there)).removeprefix("torch.")
        placement = {**placement, "dtype": dtype_there}
    with err.status(f"loading {model}"):
        if remote:
            from hookpoints.remote import load_remote

            # NDIF places the model; the local stand-in's precision is the one asked for (auto: float32).
            hooked = load_remote(model, modality=modality, dtype="float32" if model_dtype == "auto" else model_dtype)
        else:
            # With --ray the model runs in the actors; here it tells the hook points apart and gives the digest.
            local = {**placement, "device": "cpu", "device_map": None} if use_ray else placement
            hooked = load(model, modality=modality, prepend_bos=prepend_bos, **local)
        hooked.select(list(patterns) or None)  # bad hook patterns fail here, before the store is touched
    if use_ray:
        from hookpoints.scale_out import ray_runner

        options = {"modality": hooked.modality, **placement, "device": device_here, "prepend_bos": prepend_bos}
        run_batches = ray_runner(
            model, load_options=options, workers=1 if workers is None else workers, batch_size=batch_size
        )
    store = open_store(store_path)  # or created at the first write: a refused recording leaves no folder
    label = f"recording {run} ({task})" + (f" shard {shard}" if shard else "")
    with counting(label) as (on_start, on_batch):
        summary = record(
            hooked,
            manifest,
            store,
            run,
            hooks=list(patterns) or None,
            pooling=pooling,
            batch_size=batch_size,
            dtype=dtype,
            task=task,
            tgt_lang=tgt_lang,
            max_new_tokens=max_new_tokens,
            per_step=per_step,
            frames=frames,
            template=template,
            sampling=sampling,
            if_exists="resume" if resume else "overwrite" if overwrite else "error",
            on_start=on_start,
            on_batch=on_batch,
            shard=shard_of,
            max_buffer_bytes=DEFAULT_BUFFER_BYTES if buffer_mb is None else int(buffer_mb * 2**20),
            run_batches=run_batches,
            max_bytes=budget,
        )
    store = Store.open(store_path)  # there now: the recorder created it at its first write
    others = f", {summary.other_shards} left to other shards" if summary.other_shards else ""
    out.print(
        f"recorded {summary.recorded} examples ({summary.skipped} already there{others}) at {summary.hooks} hook "
        f"points into run [bold]{run}[/bold] of {store.location.uri} in {summary.seconds:.1f} s"
    )
    written = summary.store
    if written.flushes:
        out.print(
            f"the store wrote {written.bytes / 1e6:,.1f} MB of vectors in {written.flushes} flush(es) at "
            f"{written.mb_per_second:,.0f} MB/s; recording waited {written.waited_seconds:.1f} s of "
            f"{summary.seconds:.1f} s for it"
        )
    _say_nonfinite(store, run, dtype)


def _say_nonfinite(store, run: str, dtype: str) -> None:
    """A note naming the hook points whose stored vectors hold NaN or inf (``finite`` false): a float16 run
    stores a value beyond ±65,504 as inf, and the analyses refuse such a hook later."""
    from hookpoints.store.summary import nonfinite_hooks
    from rich.text import Text

    hooks = nonfinite_hooks(store, run)
    if not hooks:
        return
    shown = ", ".join(hooks[:3]) + (" ..." if len(hooks) > 3 else "")
    why = (
        "values beyond float16's range (±65,504) are stored as inf: record those hook points with --dtype float32"
        if dtype == "float16"
        else "the model produced them"
    )
    message = (
        f" {len(hooks)} hook point(s) of run {run} store vectors holding NaN or inf (finite = false): {shown}; "
        f"{why}. ap, magnitudes and clusters refuse those hook points"
    )
    err.print(Text.assemble(("note:", "yellow"), message), highlight=False)  # hook names print as written
