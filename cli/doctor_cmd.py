"""``ostate doctor``: findings about a checkpoint's optimizer state, with an exit code for CI pipelines."""

from __future__ import annotations

import sys

import click

import ostate
from ostate.doctor.checks import FAIL_ON, check_codes, diagnose, exit_code
from ostate.doctor.output import FORMATS, render
from ostate.formats.naming.weights import name_unnamed_by, read_model
from ostate.optimizers import families
from ostate_cli.common import (
    base_config_option,
    executor_options,
    format_hint_option,
    handle_errors,
    progress_enabled,
    ray_executor,
    trust_pickle_option,
    workers_option,
)


@click.command()
@click.argument("path", type=click.Path(readable=False, dir_okay=True, path_type=str))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option(
    "--model",
    "model_path",
    type=click.Path(readable=False, dir_okay=True, path_type=str),
    metavar="MODEL",
    help="Check the optimizer against this model instead of the checkpoint's own weights: a "
    ".safetensors file, a torch.save file with a model state dict, or a directory with "
    "model.safetensors / pytorch_model.bin.",
)
@click.option(
    "--fail-on",
    type=click.Choice(FAIL_ON),
    default="warning",
    show_default=True,
    help="The least severe finding that makes the exit code non-zero (3 for a warning, 4 for an error).",
)
@click.option("--ignore", "ignored", metavar="CODE,...", help="Leave out findings with these codes.")
@click.option(
    "--optimizer",
    "kind",
    type=click.Choice(sorted(families())),
    metavar="KIND",
    help="Treat the state as this optimizer family instead of detecting it.",
)
@workers_option
@executor_options
@trust_pickle_option
@format_hint_option
@base_config_option
@handle_errors
def doctor(
    path, fmt, model_path, fail_on, ignored, kind, workers, executor, address, trust_pickle, format_hint, base_config
):
    """Check the optimizer state in the checkpoint at PATH and say what to do about each finding.

    Each finding has a severity (info, warning, error), a code, the parameters and
    coordinates concerned, and advice; docs/doctor.md describes every check. The exit
    code reflects the worst finding: 0 (none at or above --fail-on), 3 (a warning),
    4 (an error); 2 means PATH could not be read.
    """
    ignore = sorted(check_codes(c.strip() for c in ignored.split(",") if c.strip())) if ignored else []
    # --executor and --address are checked before any reading
    on_ray = ray_executor(
        executor, address, trust_pickle=trust_pickle, optimizer=kind, format_hint=format_hint, base_config=base_config
    )
    checkpoint = ostate.load(
        path, trust_pickle=trust_pickle, optimizer=kind, format_hint=format_hint, base_config=base_config
    )
    model = read_model(model_path, trust_pickle=trust_pickle) if model_path else None
    if model is not None:  # a bare optimizer file gets its names from the model it is checked against
        name_unnamed_by(checkpoint, model)
    diagnosis = diagnose(
        checkpoint,
        model=model.tensors if model is not None else None,
        model_location=f"{model_path} ({model.location})" if model is not None else None,
        ignore=ignore,
        workers=workers,
        progress=progress_enabled(),
        executor=on_ray,
    )
    click.echo(render(diagnosis, fmt, fail_on=fail_on), nl=False)
    sys.exit(exit_code(diagnosis, fail_on))
