"""Tasks: what the model is asked to do with an example while it is recorded.

- ``forward``: one forward pass over the input (decoders see only their start token).
- ``asr``: speech -> text in the speech's own language (the example's ``language``, or ``--tgt-lang``).
- ``s2tt``: speech -> text in ``--tgt-lang`` (default ``eng``: X -> En, as in the SeamlessM4T paper).
- ``t2tt``: text in the example's ``language`` -> text in ``--tgt-lang``.
- ``continue``: a decoder-only LM's greedy continuation of its input (no target language): the text, or an
  audio LLM's speech prompt (Qwen2-Audio, Ultravox).

Generating tasks decode greedily, save the generated text with the example, and record the decoder over
the generated tokens (hookpoints.generation).
"""

from __future__ import annotations

from dataclasses import dataclass

from hookpoints.errors import UserError
from hookpoints.languages import model_code


@dataclass(frozen=True)
class Task:
    name: str
    modality: str | None  # the input it reads; None: whichever the model is loaded for
    generates: bool
    target: str | None  # "source": the example's own language; "given": --tgt-lang (default eng)
    needs_source_language: bool = False
    #: the position space of a generating task's steps: an encoder-decoder's ``decoder``, or the ``input`` a
    #: decoder-only LM continues (its hook points are pooled over the generated tokens' positions there)
    step_space: str = "decoder"


#: The task of a decoder-only LM's continuation (its name, where code tests for it).
CONTINUE = "continue"

TASKS = {
    "forward": Task("forward", None, False, None),
    "asr": Task("asr", "speech", True, "source"),
    "s2tt": Task("s2tt", "speech", True, "given"),
    "t2tt": Task("t2tt", "text", True, "given", needs_source_language=True),
    CONTINUE: Task(CONTINUE, None, True, None, step_space="input"),
}
DEFAULT_TARGET = "eng"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]


def input_modality(task: Task, given: str | None, has_audio: bool, modalities: tuple[str, ...]) -> str:
    """The modality to load the model for: the task's, else ``given``, else speech when the data has audio."""
    if task.modality is not None:
        if given is not None and given != task.modality:
            raise UserError(f"task {task.name} reads {task.modality} input; drop --modality {given}")
        if task.modality not in modalities:  # before the manifest is asked for a column of that input
            raise UserError(
                f"the model takes {' or '.join(modalities)} input, not {task.modality}, which task {task.name} "
                "reads: pick a task the model can do"
            )
        return task.modality
    if given is not None:
        return given
    return "speech" if has_audio and "speech" in modalities else modalities[0]


def target_languages(task: Task, languages: list | None, tgt_lang: str | None, ids: list[str]) -> list[str] | None:
    """Model codes of the language each example is generated into (None for tasks that do not generate)."""
    if task.target is None:
        if tgt_lang is not None:
            raise UserError(
                f"--tgt-lang applies to generating tasks into a language (asr, s2tt, t2tt), not to task {task.name}"
            )
        return None
    if tgt_lang is not None or task.target == "given":
        return [model_code(tgt_lang or DEFAULT_TARGET)] * len(ids)
    return source_languages(task, languages, ids)


def source_languages(task: Task, languages: list | None, ids: list[str]) -> list[str]:
    """Model codes of each example's own language, from the manifest's ``language`` column."""
    if languages is None:
        hint = " or give --tgt-lang" if task.target == "source" else ""
        raise UserError(f"task {task.name} needs a 'language' column in the manifest{hint}")
    missing = [example for example, language in zip(ids, languages, strict=True) if not language]
    if missing:
        raise UserError(f"example {missing[0]!r} has no language; task {task.name} needs one per example")
    return [model_code(str(language)) for language in languages]
