"""Library errors name Python parameters; the command line shows the same advice with its flags."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import ostate
from ostate.errors import OstateError
from ostate_cli.flags import FLAGS, SWITCHES, as_flags
from ostate_cli.main import COMMANDS
from tests.helpers.common import run_cli


def _options() -> set[str]:
    """Every option of every command."""
    return {
        opt
        for name, module in COMMANDS.items()
        for param in getattr(importlib.import_module(module), name).params
        for opt in param.opts
    }


def test_every_mapped_parameter_is_a_flag_of_some_command():
    options = _options()
    for python_name, flag in {**FLAGS, **SWITCHES}.items():
        assert flag in options, f"{flag} (for {python_name}=) is no option of any command"


def test_an_unrecognised_folder_names_the_parameter_in_python_and_the_flag_on_the_command_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(OstateError) as e:
        ostate.load(tmp_path)
    assert "format_hint=NAME forces one" in str(e.value) and "--format-hint" not in str(e.value)
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert "--format-hint NAME forces one" in result.stderr and "format_hint=" not in result.stderr


def test_values_and_switches_become_flags_and_other_assignments_stay():
    assert (
        as_flags("choose one with optimizer_index=K (0: g, 1: d)") == "choose one with --optimizer-index K (0: g, 1: d)"
    )
    assert as_flags("pass overwrite=True to replace it") == "pass --overwrite to replace it"
    assert as_flags("group 0 (weight_decay=0.01, lr=0.1)") == "group 0 (weight_decay=0.01, lr=0.1)"


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_version_and_help_import_neither_torch_nor_pandas(args):
    # What a user waits for before anything is read: the program's own start-up, not torch's import.
    code = (
        "import sys\n"
        "from ostate_cli.main import main\n"
        f"try:\n    main({args!r}, prog_name='ostate')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr
    assert done.stdout.startswith("ostate 0." if args == ["--version"] else "Usage: ostate")


def test_the_help_lists_each_command_with_its_own_summary():
    import click

    from ostate_cli.main import SUMMARIES

    assert set(SUMMARIES) == set(COMMANDS)
    for name, module in COMMANDS.items():
        command = getattr(importlib.import_module(module), name)
        summary = click.Command(name, help=SUMMARIES[name]).get_short_help_str(1000)
        assert summary == command.get_short_help_str(1000), name
    assert "inspect  Show the optimizer state in the checkpoint at PATH." in run_cli("--help").stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["inspect", "--bogus", "x.pt"], "No such option '--bogus'"),
        (["inspect", "--by", "nonsense", "x.pt"], "Invalid value for '--by'"),
        (["inspct", "x.pt"], "No such command 'inspct'"),
        (["inspect"], "Missing argument 'PATH'"),
    ],
)
def test_a_usage_error_is_one_line_like_ostates_own_and_exits_2(args, says):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ostate: error: ") and says in result.stderr
    assert "--help)" in result.stderr and result.stdout == ""
