"""Every `ostate` command in the README and docs parses as written, and the README's sample is the demo's output.

Cheap on purpose: each command line is parsed by the real command (click's parser, every
option and value checked) without running it, since most name the reader's own paths;
the README's sample output is compared with what `ostate inspect` prints for the demo
checkpoint, made once (300 steps, as `ostate demo` makes it).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from ostate_cli.main import main
from tests.helpers.common import REPO, run_cli

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```(?:bash|console|sh)\n(.*?)```", re.S)


def commands(path: Path) -> list[str]:
    """The `ostate ...` command lines in a document's bash and console blocks (comments dropped)."""
    found = []
    for block in _BLOCK.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"&&|;|\||>", line):  # the command itself, not what the shell does with it
                part = part.strip()
                if part.startswith("ostate "):
                    found.append(part.split("  #")[0].split(" # ")[0].strip())
    return found


def parse(line: str) -> None:
    """Parse one command line exactly as the program would, without running the command."""
    name, *rest = shlex.split(line)[1:]
    if name.startswith("-"):  # ostate --version, ostate --help
        main.make_context("ostate", [name, *rest])
        return
    ctx = click.Context(main, info_name="ostate")
    command = main.get_command(ctx, name)
    assert command is not None, f"no command '{name}' in: {line}"
    command.make_context(name, rest, parent=ctx)


ALL = [(path.name, line) for path in DOCUMENTS for line in commands(path)]


def test_the_documents_have_commands_to_check():
    assert len([1 for doc, _ in ALL if doc == "README.md"]) >= 10


@pytest.mark.parametrize("doc, line", ALL, ids=[f"{d}:{i}" for i, (d, _) in enumerate(ALL)])
def test_every_documented_command_parses_as_written(doc, line):
    try:
        parse(line)
    except click.exceptions.Exit:  # --help, --version
        pass
    except click.ClickException as e:
        pytest.fail(f"{doc}: `{line}`: {e.format_message()}")


@pytest.mark.slow
def test_the_readme_sample_is_what_inspect_prints_for_the_demo(tmp_path, monkeypatch):
    from ostate.demo import make_demo_checkpoint

    monkeypatch.chdir(tmp_path)
    make_demo_checkpoint(tmp_path / "ostate-demo" / "checkpoint.pt")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sample = re.search(r"```console\n\$ (ostate inspect ostate-demo/checkpoint.pt --by layer)\n(.*?)```", readme, re.S)
    assert sample is not None
    result = run_cli(*shlex.split(sample.group(1))[1:])
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    shown = [line for line in sample.group(2).splitlines() if line != "..."]
    # Header lines exactly; table rows by their label and counts (the last digits of floats may differ
    # between the compiled loops and torch ops).
    for line in shown:
        if line.startswith(("optimizer", "  ", "layer", "---")) or not line:
            assert line in printed, line
        else:
            row = next((p for p in printed if p.split()[:1] == line.split()[:1]), None)
            assert row is not None and row.split()[:5] == line.split()[:5], (line, row)
