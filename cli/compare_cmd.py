"""``ostate compare``: how the optimizer state moved between checkpoints, parameter by parameter."""

from __future__ import annotations

import click

from ostate.compare.compute import AGAINST
from ostate.compare.compute import compare as compare_checkpoints
from ostate.compare.output import render
from ostate.outputs import check_output
from ostate.render import FORMATS
from ostate_cli.common import (
    EXIT_BAD_INPUT,
    executor_options,
    fail,
    format_hint_option,
    handle_errors,
    progress_enabled,
    ray_executor,
    trust_pickle_option,
    workers_option,
)


@click.command()
@click.argument(
    "paths",
    nargs=-1,
    required=True,
    type=click.Path(readable=False, dir_okay=True, path_type=str),
    metavar="A B [C ...]",
)
@click.option(
    "--against",
    type=click.Choice(AGAINST),
    default="consecutive",
    show_default=True,
    help="With more than two checkpoints: compare consecutive pairs (A->B, B->C) or each with the first.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    metavar="N",
    help="How many of the largest movers to list (ranked by eff_lr_log10_rms).",
)
@click.option("--sort", metavar="COLUMN", help="Order the parameter rows by this column, largest first.")
@click.option("--ascending", is_flag=True, help="With --sort: smallest first.")
@click.option("--columns", metavar="A,B,...", help="Columns for table/markdown output ('all' for every column).")
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    metavar="K",
    help="Compare only the K-th optimizer (0-based) of checkpoints that hold several.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    metavar="OUT.png",
    help="Also draw the comparison (PNG, SVG or PDF, from the extension).",
)
@workers_option
@executor_options
@trust_pickle_option
@format_hint_option
@handle_errors
def compare(
    paths,
    against,
    fmt,
    top,
    sort,
    ascending,
    columns,
    optimizer_index,
    plot_path,
    workers,
    executor,
    address,
    trust_pickle,
    format_hint,
):
    """Compare the optimizer state of checkpoints A, B, ... parameter by parameter (matched by name).

    Per parameter: the step delta, the cosine similarity of the first moments, the
    log10 ratio of the second moments (median and spread), the relative change of the
    effective learning rate, and the fraction of coordinates whose state did not change;
    then the largest movers. Every checkpoint format `ostate inspect` reads works, and
    two checkpoints need not be in the same format. See docs/compare.md.
    """
    if plot_path:  # before any reading: a bad figure path fails at once, and never over an input
        # start-up time: matplotlib only when --plot is given
        from ostate.plots.style import figure_format

        figure_format(plot_path)
        check_output(plot_path, paths, overwrite=True)
    result = compare_checkpoints(
        *paths,
        against=against,
        optimizer_index=optimizer_index,
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        workers=workers,
        progress=progress_enabled(),
        executor=ray_executor(executor, address, trust_pickle=trust_pickle, format_hint=format_hint),
    )
    click.echo(
        render(
            result,
            fmt,
            top=top,
            sort=sort,
            ascending=ascending,
            columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
        ),
        nl=False,
    )
    nothing = [n for pair in result.pairs if (n := pair.no_common_parameter()) is not None]
    if nothing:
        fail(nothing[0], EXIT_BAD_INPUT)
    if plot_path:
        # start-up time: matplotlib only when --plot is given
        from ostate.plots.compare import save_compare_figure

        click.echo(f"wrote {save_compare_figure(result, plot_path)}", err=True)
