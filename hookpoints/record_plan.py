"""Checking a recording before anything is written: the task against the model, every example's input, and
the decoder prompts and lengths a generating task will need (hookpoints.recorder calls it first)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from hookpoints.audio import check_window, inspect_audio, load_audio
from hookpoints.errors import UserError
from hookpoints.languages import model_code
from hookpoints.manifest import Manifest
from hookpoints.model import HookedModel
from hookpoints.tasks import Task, source_languages, target_languages

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class ExamplePlan:
    """What every example needs, checked before anything is written."""

    task: Task
    sizes: list[float]  # per manifest row: characters or seconds (batches group similar sizes)


def plan_examples(
    model: HookedModel,
    manifest: Manifest,
    task: Task,
    tgt_lang: str | None,
    max_new_tokens: int | None = None,
    template: str | None = None,
    frames: int | None = None,
) -> ExamplePlan:
    """Check the task against the model and every example's input (and for a generating task, its decoder prompt
    and ``max_new_tokens``; an audio LLM's speech prompt, with its ``template``); nothing is written before this
    passes."""
    if task.name not in model.tasks:
        raise UserError(
            f"model {model.source} ({model.adapter.name}, {model.modality} input) cannot do task {task.name}; "
            f"it can do: {', '.join(model.tasks)}"
            + ("" if model.modality != "text" or task.modality != "speech" else " (task needs speech input)")
        )
    if task.generates:
        model._check_generates()  # a model on NDIF (--remote) records forward passes only
    ids = manifest.ids
    columns = manifest.table.column_names
    kind, missing = (
        ("feature extractor", model.processor) if model.modality == "speech" else ("tokenizer", model.tokenizer)
    )
    if missing is None:  # found at the first batch, the run was opened already and left failed
        raise UserError(
            f"model {model.source} has no {kind}: save one next to it ({kind.replace(' ', '_')}.save_pretrained)"
        )
    if model.modality == "speech":
        if "audio" not in columns:
            raise UserError(f"{manifest.path} has no 'audio' column: speech input needs a WAV/FLAC path per example")
        values = manifest.column("audio")
        audio = []
        for example, value in zip(ids, values, strict=True):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"example {example!r} has no audio file; give one or remove the example")
            audio.append(manifest.audio_path(value))
        window = getattr(model.processor, "n_samples", None)  # Whisper-style extractors: one fixed window
        sizes = []
        for path, example in zip(audio, ids, strict=True):
            info = inspect_audio(path, example)
            check_window(info, example, window)
            sizes.append(info.seconds)
        # the longest utterance's inputs: --frames and --template refused here, not at the first batch (the run
        # opened); an audio LLM that continues needs room for its longest prompt
        longest = max(range(len(sizes)), key=sizes.__getitem__, default=None)
        wave = None if longest is None else load_audio(audio[longest], ids[longest])
        inputs = None if wave is None else model.speech_inputs([wave], frames=frames, template=template)
        if inputs is not None and task.generates and task.step_space == "input":
            length = inputs.kwargs["input_ids"].shape[1]
            try:
                model.check_room(length, max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
            except UserError as error:
                raise UserError(f"example {ids[longest]!r}: {error}") from None
    else:
        if "text" not in columns:
            raise UserError(f"{manifest.path} has no 'text' column: text input needs one")
        texts = manifest.column("text")
        for example, text in zip(ids, texts, strict=True):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"example {example!r} has empty text; give it text or remove it")
        room = (max_new_tokens or DEFAULT_MAX_NEW_TOKENS) if task.generates and task.step_space == "input" else 0
        names = [f"example {example!r}" for example in ids]
        model.check_text_lengths(texts, names, marked=task.needs_source_language, room=room)
        sizes = [len(text) for text in texts]
    languages = manifest.column("language") if "language" in columns else None
    sources = source_languages(task, languages, ids) if task.needs_source_language else None
    targets = target_languages(task, languages, tgt_lang, ids)
    for kind, codes in (("source", sources), ("target", targets)):
        for example, code in zip(ids, codes or [], strict=False):
            if not model.knows_language(code):
                known = model.languages
                listed = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
                raise UserError(
                    f"example {example!r}: unknown {kind} language {code!r} for model {model.source}"
                    + (f"; it knows: {listed}" if known else "")
                )
    if task.generates and task.target is not None:  # the prompts the batches start from (Whisper: s2tt into English)
        prompt = model.decoder_prompt(targets, task=task.name, sources=known_sources(manifest.table))
        model.check_room(prompt.shape[1], max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    return ExamplePlan(task, sizes)


def known_sources(examples: pa.Table) -> list[str] | None:
    """Model codes of the examples' own languages, where every example has one (else None)."""
    if "language" not in examples.column_names:
        return None
    languages = examples["language"].to_pylist()
    return [model_code(str(language)) for language in languages] if all(languages) else None
