"""What a new run must not find (rows left of a deleted run), and what a resumed run, or another shard of a run,
must repeat: its shard count, settings, config and hook points.

Called by :func:`hookpoints.store.writer.open_run` before anything is written.
"""

from __future__ import annotations

from hookpoints.store import tables
from hookpoints.store.catalog import RUN_SETTINGS, Store

from hookpoints.errors import UserError


def check_open_options(if_exists: str, max_buffer_bytes: int, max_buffer_seconds: float = 0.0) -> None:
    """A UserError unless open_run's options are valid: the recorder checks them before it creates a new store
    (a recording refused for them left an empty store behind)."""
    bytes_ok = isinstance(max_buffer_bytes, int) and not isinstance(max_buffer_bytes, bool)
    if not (bytes_ok and 0 <= max_buffer_bytes <= 2**31):  # a flush's vectors are one Arrow list (int32 offsets)
        raise UserError(
            f"max_buffer_bytes must be a whole number of bytes from 0 (a commit per batch) to 2**31 (2 GiB), "
            f"not {max_buffer_bytes!r}"
        )
    seconds_ok = isinstance(max_buffer_seconds, int | float) and not isinstance(max_buffer_seconds, bool)
    if not (seconds_ok and max_buffer_seconds >= 0):  # NaN fails >= too
        raise UserError(f"max_buffer_seconds must be a number of seconds, 0 or more, not {max_buffer_seconds!r}")
    if if_exists not in ("error", "resume", "overwrite"):
        raise UserError(f"if_exists must be error, resume or overwrite, not {if_exists!r}")


def check_shards(run: str, info, count: int) -> None:
    """A UserError unless a run of ``info.shards`` shards is continued with as many (``--shard I/N``)."""
    if info.shards == count:
        return
    if info.shards == 1:
        raise UserError(
            f"run {run!r} is recorded without --shard: resume it without --shard (or --overwrite it, or "
            "choose another run name)"
        )
    raise UserError(
        f"run {run!r} is recorded in {info.shards} shards: pass --shard I/{info.shards} "
        f"(0 <= I < {info.shards}) to record or resume one of them"
    )


#: Values of a run's config that change what its rows hold: a resumed run, or another shard of it, repeats them
#: (a shard recorded with other --max-new-tokens or --prepend-bos was mixed into the run without a word).
RESUMED_CONFIG = ("tgt_lang", "max_new_tokens", "frames", "prepend_bos", "modality")
#: Config values a run holds only where they were given (an audio LLM's prompt template): absent means none.
OPTIONAL_CONFIG = ("template", "sampling")


def check_resumable(
    store: Store, run: str, info, settings: dict[str, str], hooks: list[dict], config: dict | None = None
) -> None:
    """A UserError unless a resumed run, or another shard of it, repeats the run's settings, config values and
    hook points: else its rows would mix two recordings without a word. The model is compared by its weights
    where both configs hold their digest (another path to the same checkpoint is the same model), else by name."""
    stored, given = info.config or {}, config or {}
    same_weights = _check_weights(run, info.model, settings["model"], stored, given)
    for key in RUN_SETTINGS:
        if key == "model" and same_weights:
            continue
        if getattr(info, key) != settings[key]:
            raise UserError(
                f"cannot resume run {run!r} with {key}={settings[key]}: it was recorded with "
                f"{key}={getattr(info, key)} (use --overwrite to start it again)"
            )
    for key in (*RESUMED_CONFIG, *OPTIONAL_CONFIG):  # RESUMED_CONFIG where both say (older configs may lack one)
        if (key in OPTIONAL_CONFIG or (key in stored and key in given)) and stored.get(key) != given.get(key):
            raise UserError(
                f"cannot resume run {run!r} with {key}={given.get(key)}: it was recorded with "
                f"{key}={stored.get(key)} (use --overwrite to start it again)"
            )
    stored = sorted(store.run_hooks(run)["hook"].to_pylist())
    if stored and stored != sorted(hook["hook"] for hook in hooks):
        raise UserError(
            f"cannot resume run {run!r} with other hook points ({len(hooks)} asked, {len(stored)} recorded): "
            "pass the same --hooks, or --overwrite"
        )


def _check_weights(run: str, recorded_from: str, model: str, stored: dict, given: dict) -> bool:
    """Whether ``model`` has the weights ``run`` was recorded with, by dtype and digest (hookpoints.model_digest);
    False where either config lacks the digest (a run recorded before it was kept); a UserError if they differ."""
    if stored.get("model_dtype") and given.get("model_dtype") and stored["model_dtype"] != given["model_dtype"]:
        raise UserError(
            f"cannot resume run {run!r} with the model's weights in {given['model_dtype']}: it was recorded with "
            f"them in {stored['model_dtype']} (pass --model-dtype {stored['model_dtype']}, or --overwrite)"
        )
    differ = config_differences(stored.get("model_config") or {}, given.get("model_config") or {})
    if differ:
        raise UserError(
            f"cannot resume run {run!r} with model {model}: it is not configured as the model the run was recorded "
            f"with (from {recorded_from}; {differ[0]}); give that checkpoint, or --overwrite"
        )
    dtype = stored.get("model_dtype")
    recorded, here = (config.get("model_digest") or {} for config in (stored, given))
    if not isinstance(recorded, dict) or dtype not in recorded or dtype not in here:
        return False
    if recorded[dtype] != here[dtype]:
        raise UserError(
            f"cannot resume run {run!r} with model {model}: its weights are not those the run was recorded with "
            f"(from {recorded_from}; digest {here[dtype][:12]} != {recorded[dtype][:12]}); give that checkpoint, "
            "or --overwrite"
        )
    return True


def config_differences(recorded: dict, here: dict, prefix: str = "") -> list[str]:
    """``key: value here != value recorded`` for each config key (sub-configs as ``text_config.key``) that both
    dicts hold with other values; keys only one holds are not compared (a newer transformers writes more).

    >>> config_differences({"rope_theta": 10000.0, "a": 1}, {"rope_theta": 500000.0, "b": 2})
    ['rope_theta: 500000.0 here != 10000.0 recorded']
    """
    found = []
    for key in sorted(set(recorded) & set(here)):
        mine, theirs = here[key], recorded[key]
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += config_differences(theirs, mine, f"{prefix}{key}.")
        elif mine != theirs:
            found.append(f"{prefix}{key}: {mine!r:.40} here != {theirs!r:.40} recorded")
    return found


def check_no_rows_left(store: Store, run: str) -> None:
    """A new run must not find rows under its name: rows left of a deleted run (a writer that raced the delete;
    ``store verify`` names them) would mix with it, its hooks taken for the new run's, its examples doubled."""
    for name in ("hooks", "examples", "activations"):
        actions = tables.open_table(store.location, name).get_add_actions(flatten=True)
        if run in actions.column("partition.run").to_pylist():
            if store.run_info(run) is not None:
                return  # another process has just started the run (a shard of it): its rows, not leftovers
            uri = store.location.uri
            raise UserError(
                f"store {uri} still holds {name} rows of an earlier run {run!r} that was deleted: remove them with "
                f"`hookpoints store delete {uri} --run {run}`, then record again"
            )
