"""``ostate demo``: make a small real checkpoint and inspect it (nothing of the user's needed)."""

from __future__ import annotations

import os

import click

import ostate
from ostate.analysis import VIEWS
from ostate.analysis.native.tuning import tuned_process
from ostate.demo import make_demo_checkpoint
from ostate.report import inspect as build_report
from ostate.report import render
from ostate_cli.common import handle_errors


@click.command()
@click.option(
    "--dir",
    "directory",
    default="ostate-demo",
    show_default=True,
    type=click.Path(readable=False, file_okay=False),
    help="Where to write the demo checkpoint.",
)
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="Training steps.")
@click.option("--by", type=click.Choice(VIEWS), default="param", show_default=True)
@handle_errors(tuned=False)  # the training runs with torch's own threads; only the inspection is tuned
def demo(directory, steps, by):
    """Train a tiny character model on the Zen of Python, save a checkpoint, and inspect it."""
    path = os.path.join(directory, "checkpoint.pt")
    click.echo(f"training a small model for {steps} steps and saving {path} ...", err=True)
    make_demo_checkpoint(path, steps=steps)
    with tuned_process():
        report = render(build_report(ostate.load(path), by=by))
    click.echo(report, nl=False)
    click.echo(
        f"\nnext: ostate inspect {path} --by layer   (or --format json, --sort eff_lr_p50 --top 5)\n"
        f"      ostate plot {path} -o lr.png     (or --kind layer-profile, --kind moments)",
        err=True,
    )
