"""Every ``hookpoints COMMAND ... --option [VALUE]`` written in the README's and docs/' code (fenced blocks and
inline code) names an option COMMAND has, and a value written for a choice option (``--pooling mean|last``) is
one of its choices: a renamed option or a dropped choice cannot leave the docs behind."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from hookpoints.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.S)
CALL = re.compile(r"hookpoints((?:\s+[a-z][\w-]*){1,2})([^\n]*)")
OPTION = re.compile(r"(--[a-z][a-z0-9-]*)(?:[ =]\[?([\w.|-]+))?")


def command(words: list[str]) -> tuple[click.Command | None, int]:
    """The (sub)command the first words name, and how many words it took."""
    ctx, found, used = click.Context(cli), cli, 0
    for word in words:
        if not isinstance(found, click.Group) or found.get_command(ctx, word) is None:
            break
        found, used = found.get_command(ctx, word), used + 1
    return (None if isinstance(found, click.Group) else found), used


def calls(page: Path) -> list[tuple[click.Command, str, str]]:
    found = []
    for fenced, inline in CODE.findall(page.read_text()):
        code = (fenced or inline).replace("\\\n", " ")
        for match in CALL.finditer(code):
            words = match.group(1).split()
            cmd, used = command(words)
            if cmd is not None:
                found.append((cmd, " ".join(words[:used]), " ".join(words[used:]) + match.group(2)))
    return found


def problems(page: Path) -> list[str]:
    wrong = []
    for cmd, name, rest in calls(page):
        params = {opt: param for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}
        for option, value in OPTION.findall(rest.split("#")[0]):
            param = params.get(option)
            if option in ("--help", "-h"):
                continue
            if param is None:
                wrong.append(f"hookpoints {name} has no {option}")
            elif isinstance(param.type, click.Choice) and value and not value.isupper():
                unknown = [v for v in value.split("|") if v not in param.type.choices]
                if unknown:
                    wrong.append(f"hookpoints {name} {option}: {unknown} not in {list(param.type.choices)}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_documented_commands_name_real_options_and_choices(page):
    assert not problems(page), f"{page.relative_to(ROOT)}: {problems(page)}"


def test_the_check_finds_a_wrong_option_and_choice(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nhookpoints record --model M --poolin mean\nhookpoints record --pooling mean|median\n```\n"
    )
    assert problems(page) == ["hookpoints record has no --poolin", "hookpoints record --pooling: ['median'] not in "
                              "['mean', 'last', 'max', 'none']"]  # fmt: skip
    assert len(calls(ROOT / "README.md")) >= 15
