"""The project's shape: every package is installed, and the library never imports click."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import tomllib

from tests.helpers.common import REPO


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ostate").rglob("__init__.py")}
    assert on_disk <= listed, on_disk - listed
    assert "ostate_cli" in listed and config["package-dir"]["ostate_cli"] == "cli"


def test_the_library_never_imports_click():
    offenders = []
    for path in (REPO / "ostate").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "click" or n.startswith("click.") or n.startswith("ostate_cli") for n in names):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_torch_is_pinned_for_installs_here():
    assert "torch==2.13.0" in (REPO / "constraints.txt").read_text()


def test_a_command_imports_only_its_own_module_so_inspect_starts_without_matplotlib():
    probe = (
        "import sys, click\n"
        "from ostate_cli.main import COMMANDS, main\n"
        "ctx = click.Context(main)\n"
        "assert main.get_command(ctx, 'inspect').name == 'inspect'\n"
        "print(sorted(m for m in ('matplotlib', 'ostate.harness', 'ostate.plots') if m in sys.modules))\n"
        "print(all(main.get_command(ctx, name).name == name for name in COMMANDS))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_program_skips_the_teardown_but_loses_no_output_exit_code_or_atexit_handler(adamw_checkpoint, tmp_path):
    """`ostate` leaves with os._exit after the command (ostate_cli.main.run): nothing may be lost."""
    path = adamw_checkpoint[0]
    program = [sys.executable, "-m", "ostate_cli.main"]
    piped = subprocess.run(
        [*program, "inspect", str(path), "--format", "json"], capture_output=True, text=True, timeout=300
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert json.loads(piped.stdout)["optimizers"][0]["params"]  # the whole document arrived through the pipe
    into_file = tmp_path / "report.json"
    with into_file.open("w") as out:
        done = subprocess.run([*program, "inspect", str(path), "--format", "json"], stdout=out, timeout=300)
    assert done.returncode == 0 and json.loads(into_file.read_text()) == json.loads(piped.stdout)
    bad = subprocess.run(
        [*program, "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.startswith("ostate: error:")
    # An atexit handler runs, and what it writes to a block-buffered stdout still arrives.
    probe = (
        "import atexit, sys\n"
        "from ostate_cli import main\n"
        "atexit.register(lambda: sys.stdout.write('atexit ran\\n'))\n"
        "sys.argv = ['ostate', '--version']\n"
        "main.run()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    handled = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert handled.returncode == 0 and "ostate" in handled.stdout and handled.stdout.endswith("atexit ran\n")
