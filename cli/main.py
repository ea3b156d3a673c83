"""The ``ostate`` command group. Each command lives in its own module and is added here."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
from typing import Any, Iterator

import click

import ostate
from ostate.analysis.native import library

# Every command: its name and the module that defines it (as the function of the same
# name). Modules are imported only when their command runs (or for `ostate --help`), so
# `ostate inspect` does not pay for matplotlib or the harness.
COMMANDS = {
    "inspect": "ostate_cli.inspect_cmd",
    "demo": "ostate_cli.demo_cmd",
    "convert": "ostate_cli.convert_cmd",
    "plot": "ostate_cli.plot_cmd",
    "compare": "ostate_cli.compare_cmd",
    "doctor": "ostate_cli.doctor_cmd",
    "reset": "ostate_cli.reset_cmd",
    "ablate": "ostate_cli.ablate_cmd",
}


# Each command's one-line summary, for `ostate --help` without importing the commands (and
# torch with them); tests/test_cli_flags.py checks each against its command's own help.
SUMMARIES = {
    "ablate": "Compare what to do with a checkpoint's optimizer state when fine-tuning.",
    "compare": "Compare the optimizer state of checkpoints A, B, ... parameter by parameter (matched by name).",
    "convert": "Write the optimizer state of checkpoint IN to OUT.",
    "demo": "Train a tiny character model on the Zen of Python, save a checkpoint, and inspect it.",
    "doctor": "Check the optimizer state in the checkpoint at PATH and say what to do about each finding.",
    "inspect": "Show the optimizer state in the checkpoint at PATH.",
    "plot": "Draw the optimizer state of the checkpoint(s) at PATH... into the figure OUT.",
    "reset": "Write checkpoint PATH to OUT with STRATEGY applied to its optimizer state.",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module the first time the command is asked for.

    ``ostate --help`` lists the commands from :data:`SUMMARIES`, importing none of them; a
    usage error (an unknown option, a bad value) is one line, like ostate's own errors, with
    click's exit code (2).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            self.add_command(getattr(importlib.import_module(COMMANDS[name]), name), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in SUMMARIES and name not in self.commands:
                rows.append((name, click.Command(name, help=SUMMARIES[name]).get_short_help_str(limit)))
            elif (command := self.get_command(ctx, name)) is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with one_line_usage_errors():
            return super().invoke(ctx)


class OneLineError(click.ClickException):
    """A click error shown as ``ostate: error: ...`` on one line, with the same exit code (2 for usage)."""

    def __init__(self, error: click.ClickException):
        super().__init__(usage_error_line(error))
        self.exit_code = error.exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"ostate: error: {self.message}", err=True)


# `ostate` alone shows the help (click's NoArgsIsHelpError, a UsageError): that stays as click shows it.
_HELP_ERRORS = tuple(getattr(click.exceptions, n) for n in ("NoArgsIsHelpError",) if hasattr(click.exceptions, n))


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Turn click's errors (an unknown option, a bad value) into :class:`OneLineError`."""
    try:
        yield
    except (OneLineError, *_HELP_ERRORS):
        raise
    except click.ClickException as e:
        raise OneLineError(e) from e


def usage_error_line(error: click.ClickException) -> str:
    """A click usage error as one line: its message, the command it concerns, and where to read more.

    Example:
        >>> usage_error_line(click.UsageError("No such option: --bye"))
        'No such option: --bye (see ostate --help)'
    """
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else "ostate"
    return f"{message} (see {command} --help)"


def version_line() -> str:
    """What ``ostate --version`` prints: the version, and whether the compiled loops are in use."""
    # Said without importing torch: the loops already loaded in this process (a test's build), else
    # whether the installed library would load.
    kernels = sys.modules.get("ostate.analysis.native.kernels")
    status = kernels.status() if kernels is not None else library.status()
    return f"ostate {ostate.__version__} (compiled loops: {status})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and whether the compiled loops are in use, and exit.",
)
def main() -> None:
    """What is in your optimizer state, and should you keep it when you fine-tune?

    Run `ostate demo` to make a small checkpoint and inspect it, or
    `ostate inspect PATH` on your own (a file or a checkpoint directory);
    `ostate plot PATH -o OUT.png` draws it (effective-lr histograms, layer
    profiles, moments); `ostate convert IN OUT` writes its optimizer state as
    safetensors or .pt; `ostate compare A B` shows how the state moved between
    checkpoints; `ostate doctor PATH` lists what is wrong with it (exit code for
    CI); `ostate reset PATH --strategy S -o OUT` writes it with a strategy
    applied; `ostate ablate` measures which handling of the optimizer state works best
    for fine-tuning.
    """


def run() -> None:
    """The ``ostate`` program: run the command, then leave without the interpreter's teardown.

    Once a command has finished, its files are closed and its output is flushed, tearing
    down the interpreter (every module of torch and pandas, one by one) takes about a
    third of a second and does nothing a user can see; ``atexit`` handlers still run.
    Only the installed program and ``python -m ostate_cli.main`` leave this way: calling
    :func:`main` from Python (click's test runner, a notebook) returns as usual.
    """
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:  # click never does this, but sys.exit("message") prints the message and means 1
            print(done.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away (`| head`), or a closed stream
            pass
        except OSError:  # output lost (a full disk): as Python's own exit does, say so with 120
            code = code or 120
    os._exit(code)


if __name__ == "__main__":
    run()
