"""The ``ostate`` command group. Each command lives in its own module and is added here."""

from __future__ import annotations

import atexit
import importlib
import os
import sys

import click

import ostate
from ostate.analysis.native import kernels

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


class LazyGroup(click.Group):
    """A click group that imports a command's module the first time the command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            self.add_command(getattr(importlib.import_module(COMMANDS[name]), name), name)
        return super().get_command(ctx, name)


def version_line() -> str:
    """What ``ostate --version`` prints: the version, and whether the compiled loops are in use."""
    return f"ostate {ostate.__version__} (compiled loops: {kernels.status()})"


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
