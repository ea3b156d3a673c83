"""What every command shares: error handling, ``--debug``, warnings on stderr, and the process tuning."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Any, Callable

import click

from ostate.analysis import default_workers
from ostate.analysis.native.tuning import tuned_process
from ostate.distributed import EXECUTORS, RayExecutor, checked_executor
from ostate.errors import OstateError
from ostate.formats.registry import reader_names
from ostate.outputs import unattributed_refusal
from ostate_cli.flags import as_flags

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def debug_option(fn: Callable) -> Callable:
    return click.option(
        "--debug", is_flag=True, envvar="OSTATE_DEBUG", help="Show full tracebacks instead of one-line errors."
    )(fn)


def trust_pickle_option(fn: Callable) -> Callable:
    """``--trust-pickle``: allow pickled objects beyond tensors (docs/security.md says exactly what)."""
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow pickled Python objects beyond tensors (runs code from the file: only for files you trust).",
    )(fn)


def workers_option(fn: Callable) -> Callable:
    """``--workers N``: threads of the analysis working on different parameters."""
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=default_workers(),
        show_default=True,
        metavar="N",
        help="Threads working on different parameters.",
    )(fn)


def base_config_option(fn: Callable) -> Callable:
    """``--base-config DIR``: the base model's folder, to name a PEFT adapter checkpoint's parameters."""
    return click.option(
        "--base-config",
        type=click.Path(exists=True),
        metavar="DIR",
        help="For a PEFT (LoRA) Trainer checkpoint: the base model's folder (its config.json), to name the "
        "adapter's parameters. Never downloaded.",
    )(fn)


def executor_options(fn: Callable) -> Callable:
    """``--executor local|ray`` and ``--address ADDR``: where the analysis runs (docs/performance.md)."""
    fn = click.option(
        "--address",
        metavar="ADDR",
        help="With --executor ray: the Ray cluster to join (auto, host:6379, ray://host:10001); "
        "default: a local Ray on this machine.",
    )(fn)
    return click.option(
        "--executor",
        type=click.Choice(EXECUTORS),
        default="local",
        show_default=True,
        help="Where the parameters are analysed: threads here, or Ray tasks (each reads its share of "
        "the checkpoint's files; the result is the same). Ray: pip install 'ostate[ray]'.",
    )(fn)


def ray_executor(
    executor: str,
    address: str | None,
    *,
    trust_pickle: bool = False,
    optimizer: str | None = None,
    format_hint: str | None = None,
    base_config: str | None = None,
) -> RayExecutor | None:
    """The :class:`RayExecutor` that ``--executor``/``--address`` ask for (None: run here), loading as the driver does."""
    checked_executor(executor, address)
    if executor != "ray":
        return None
    return RayExecutor(
        address=address,
        trust_pickle=trust_pickle,
        optimizer=optimizer,
        format_hint=format_hint,
        base_config=base_config,
    )


def format_hint_option(fn: Callable) -> Callable:
    """``--format-hint NAME``: read PATH with this reader instead of recognising its layout."""
    names = reader_names()
    return click.option(
        "--format-hint",
        type=click.Choice(names),
        metavar="NAME",
        help=f"Read the checkpoint as this layout instead of recognising it: {', '.join(names)}.",
    )(fn)


def handle_errors(fn: Callable | None = None, *, tuned: bool = True) -> Callable:
    """Run a command: an OstateError prints one line and exits 2; tracebacks only with --debug.

    An output the environment refuses (no space, read-only, no permission) arrives here as an
    OstateError from :mod:`ostate.outputs` (:class:`~ostate.outputs.WriteRefused`); a refusal
    from a write outside that module that only a write can cause (no space, a quota, read-only)
    is still one line and exit 2 (:func:`~ostate.outputs.unattributed_refusal`), not an internal error.

    Every command goes through here once, so this is where the ``ostate`` program tunes its
    process: the command runs inside :func:`~ostate.analysis.native.tuning.tuned_process` (one
    torch intra-op thread, since ostate runs its own worker threads; glibc keeping freed memory;
    the cyclic garbage collector paused), restored when it returns or fails. The library never
    does this itself. ``@handle_errors(tuned=False)``: a command that trains models (``demo``,
    ``ablate``) runs in the process as found, so its training uses torch's own threads and
    gives the numbers it gave before; it may tune the parts that only read and analyse.
    """
    if fn is None:
        return functools.partial(handle_errors, tuned=tuned)

    @functools.wraps(fn)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _show_warning
            try:
                with tuned_process() if tuned else contextlib.nullcontext():
                    return fn(*args, **kwargs)
            except OstateError as e:
                if debug:
                    raise
                fail(as_flags(str(e)), EXIT_BAD_INPUT)
            except KeyboardInterrupt:
                if debug:
                    raise
                fail("interrupted; no output was written", EXIT_INTERRUPTED)
            except click.exceptions.Exit:
                raise
            except click.ClickException:
                raise
            except Exception as e:  # a bug in ostate: still one line, and how to get the details
                if debug:
                    raise
                refused = unattributed_refusal(e)  # a full or read-only disk met outside ostate.outputs
                if refused is not None:
                    fail(as_flags(str(refused)), EXIT_BAD_INPUT)
                fail(
                    f"internal error: {type(e).__name__}: {e} (this is a bug in ostate; rerun with --debug "
                    "for the traceback)",
                    EXIT_INTERNAL,
                )

    return debug_option(wrapper)


def fail(message: str, code: int) -> None:
    click.echo(f"ostate: error: {message}", err=True)
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"ostate: warning: {message}", err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__module__.startswith("ostate") or category is UserWarning:
        text = str(message)
        if "Failed to initialize NumPy" in text:
            return
        warn(text)


def progress_enabled() -> bool:
    """Progress bars go to stderr, and only when a person is watching it."""
    return sys.stderr.isatty() and not os.environ.get("CI")
