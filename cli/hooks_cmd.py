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
    from hookpoints.errors import UserError
    from hookpoints.loading import load

    if patterns and show_all:
        raise UserError("give --filter or --all, not both (--filter matches module paths too)")
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
            **sizes(hooked, p, fmt),
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


def sizes(hooked, point, fmt: str) -> dict:
    """Float32 bytes one example writes at ``point``: pooled (one row), and with pooling none at the longest
    input (a row per position; an attention map's row is [head, key_pos], so it grows with length squared)."""
    from hookpoints.sizes import human, row_bytes

    longest = hooked.adapter.key_positions(hooked.model, point.space) if point.time_axis is not None else 1
    per_example = row_bytes(point) * longest if longest else None
    if fmt == "json":
        return {"bytes_pooled": row_bytes(point), "bytes_none_max": per_example}
    return {"pooled": human(row_bytes(point)), "none (longest)": human(per_example) if per_example else "?"}
