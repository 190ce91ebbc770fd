"""The ``hookpoints`` command: record activations at named hook points, query them with SQL.

Errors in what the user gave (paths, names, manifests, SQL) print as one line and exit with status 2;
``hookpoints --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
from hookpoints.cli.console import err
from rich.markup import escape

from hookpoints.errors import UserError

# name -> (module under hookpoints.cli, one-line help). Modules are imported only when their command runs, so
# `hookpoints --help`, `sql` and `store` never import torch, transformers or nnsight.
COMMANDS: dict[str, tuple[str, str]] = {
    "hooks": ("hooks_cmd", "List a model's hook points."),
    "record": ("record_cmd", "Record activations of a manifest at hook points into a store."),
    "sql": ("sql_cmd", "Run a read-only SQL query over a store."),
    "store": ("store_cmd", "Inspect and maintain a store (info, verify, compact, vacuum, delete, migrate)."),
    "ap": ("ap_cmd", "Rank neurons by average precision against label sets (language/modality selectivity)."),
    "selection": ("selection_cmd", "Top-k neuron selections of ranked label sets, with Gini and overlaps."),
    "magnitudes": ("magnitudes_cmd", "Mean activation magnitude per layer and group, and its deviation."),
    "intervene": ("intervene_cmd", "Replace selected neurons during generation and score what happens."),
    "clusters": ("clusters_cmd", "Per-layer clustering of examples by labels (silhouette, DB, t-SNE)."),
    "corpus": ("corpus_cmd", "Write the bundled 6-language corpus (text and espeak-ng speech)."),
    "report": ("report_cmd", "One self-contained HTML report of a store's runs and analyses, figures inline."),
    "demo": ("demo_cmd", "Record the bundled corpus into a local store and run every analysis on it."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is run (or its --help shown)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"hookpoints.cli.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="hookpoints")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Named hook points over HuggingFace models, and an activation store you can query with SQL."""
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and turn errors into one line (unless --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HOOKPOINTS_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="hookpoints", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("[red]aborted[/red]")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except UserError as error:
        if debug:
            raise
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as error:  # noqa: BLE001 - one line for users, the traceback with --debug
        if debug:
            raise
        err.print(
            f"[bold red]error:[/bold red] {type(error).__name__}: {escape(' '.join(str(error).split())[:300])} "
            "(run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
