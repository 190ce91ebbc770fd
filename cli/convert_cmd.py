"""``hookpoints convert ct2-whisper SRC DST``: checkpoints from other runtimes, as transformers folders."""

from __future__ import annotations

import click
from hookpoints.cli.console import err


@click.group("convert")
def command() -> None:
    """Convert a model from another runtime into a transformers folder hookpoints can load."""


@command.command("ct2-whisper")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("destination", type=click.Path(file_okay=False))
def ct2_whisper(source: str, destination: str) -> None:
    """A CTranslate2 Whisper folder SOURCE (model.bin, config.json, tokenizer.json; e.g. faster-whisper's)
    -> a WhisperForConditionalGeneration folder DESTINATION (float32; float16/int8 weights dequantised)."""
    from hookpoints.convert_ct2 import convert_ct2_whisper

    written = convert_ct2_whisper(source, destination)
    err.print(f"wrote {written}", highlight=False)
