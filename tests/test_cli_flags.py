"""Library errors name Python parameters; the command line shows the same advice with its flags."""

from __future__ import annotations

import importlib

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
