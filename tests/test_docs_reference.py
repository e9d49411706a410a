"""The reference pages list what the code has: every setting (docs/settings.md) and every command
and option of the CLI (docs/cli.md); and the README's quick start is the command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import click
import typer

from dataport.cli import app
from dataport.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_setting_is_on_the_settings_page_and_nothing_else_is():
    page = (DOCS / "settings.md").read_text()
    fields = {f"DATAPORT_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(name for name in fields if f"`{name}`" not in page)
    assert not missing, f"docs/settings.md does not list {missing}"
    inside, _, outside = page.partition("## Read outside `Settings`")
    unknown = sorted(set(re.findall(r"`(DATAPORT_[A-Z0-9_]+)`", inside)) - fields)
    assert not unknown, f"docs/settings.md lists {unknown} as settings, but Settings has no such field"
    assert outside, "docs/settings.md has no section for the variables read outside Settings"


def test_every_command_and_option_is_on_the_cli_page():
    page = (DOCS / "cli.md").read_text()
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="dataport")
    missing = []
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if f"`dataport {name}" not in page:
            missing.append(f"dataport {name}")
        for parameter in command.params:
            for option in parameter.opts if isinstance(parameter, click.Option) else ():
                if option != "--help" and f"`{option}`" not in page:
                    missing.append(f"dataport {name} {option}")
    assert not missing, f"docs/cli.md does not describe {missing}"


def test_the_readme_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert commands == ['pip install -e ".[test]" && dataport dev', 'pip install -e ".[test]" && python -m pytest']
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install --quiet -e ".[test]"' in ci
    assert re.search(r"^python -m pytest\s*$", ci, re.MULTILINE), ".ci/run no longer runs the README's test command"
