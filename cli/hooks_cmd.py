"""``hookpoints hooks MODEL``: list a model's hook points."""

from __future__ import annotations

import click
from hookpoints.cli.console import render


@click.command("hooks")
@click.argument("model")
@click.option(
    "--filter",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Only hook points whose name, alias or module path matches (repeatable).",
)
@click.option("--all", "show_all", is_flag=True, help="Also list every module path, not just canonical names.")
@click.option("--modality", type=click.Choice(["text", "speech"]), help="Input the model is loaded for.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(model: str, patterns: tuple[str, ...], show_all: bool, modality: str | None, fmt: str) -> None:
    """List MODEL's hook points (MODEL: a folder written by save_pretrained, or a hub id)."""
    from hookpoints.loading import load

    hooked = load(model, modality=modality)
    if patterns:
        points = hooked.hook_points.select(list(patterns))
    elif show_all:
        points = [p for p in hooked.hook_points if p.unavailable is None]
    else:
        points = hooked.hook_points.listed()
    rows = [
        {
            "name": p.name,
            "component": p.component,
            "layer": p.layer,
            "submodule": p.submodule,
            "width": p.width,
            **(
                {}
                if fmt == "json"
                else {
                    "positions": p.space or "-",
                    "module": p.module + ("" if p.io == "output" else " (input)"),
                }
            ),
        }
        for p in points
    ]
    render(rows, fmt, title=f"{len(rows)} hook points of {model}")
