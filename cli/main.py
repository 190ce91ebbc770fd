"""The ``hookpoints`` command: record activations at named hook points, query them with SQL.

Errors in what the user gave (paths, names, manifests, SQL) print as one line and exit with status 2;
``hookpoints --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click
from rich.markup import escape

from cli.console import err
from store.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="hookpoints")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Named hook points over HuggingFace models, and an activation store you can query with SQL."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    from cli import (
        ap_cmd,
        clusters_cmd,
        corpus_cmd,
        demo_cmd,
        hooks_cmd,
        intervene_cmd,
        magnitudes_cmd,
        record_cmd,
        selection_cmd,
        sql_cmd,
        store_cmd,
    )

    for module in (
        hooks_cmd,
        record_cmd,
        sql_cmd,
        store_cmd,
        ap_cmd,
        selection_cmd,
        magnitudes_cmd,
        intervene_cmd,
        clusters_cmd,
        corpus_cmd,
        demo_cmd,
    ):
        cli.add_command(module.command)


_register()


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
