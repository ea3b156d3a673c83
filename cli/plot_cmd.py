"""``ostate plot``: draw a checkpoint's optimizer state (or several checkpoints' on the same axes) to a file."""

from __future__ import annotations

import click

from ostate.figures import plot as draw_plot
from ostate.optimizers import families
from ostate.outputs import check_output
from ostate.plots import plot_kinds, save_figure
from ostate.plots.style import DEFAULT_DPI, figure_format
from ostate_cli.common import (
    executor_options,
    format_hint_option,
    handle_errors,
    progress_enabled,
    ray_executor,
    trust_pickle_option,
    workers_option,
)

# The default kind first in the help, then the others by name.
_KINDS = dict(sorted(plot_kinds().items(), key=lambda item: (item[0] != "lr-histogram", item[0])))
_VIEWS = sorted({view for kind in _KINDS.values() for view in kind.views})


@click.command()
@click.argument(
    "paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(readable=False, dir_okay=True, path_type=str)
)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="OUT",
    type=click.Path(readable=False, dir_okay=False, path_type=str),
    help="The figure to write: OUT.png, OUT.svg or OUT.pdf (the format follows the extension).",
)
@click.option(
    "--kind",
    type=click.Choice(list(_KINDS)),
    default="lr-histogram",
    show_default=True,
    help="What to draw: " + "; ".join(f"{name}: {kind.summary}" for name, kind in _KINDS.items()) + ".",
)
@click.option(
    "--by",
    type=click.Choice(_VIEWS),
    metavar="VIEW",
    help="How the figure splits the coordinates: "
    + "; ".join(f"{name}: {' | '.join(kind.views)} (default {kind.views[0]})" for name, kind in _KINDS.items())
    + ".",
)
@click.option(
    "--optimizer-index",
    type=click.IntRange(min=0),
    metavar="K",
    help="Which optimizer (0-based) when a checkpoint holds several.",
)
@click.option(
    "--optimizer",
    "kind_name",
    type=click.Choice(sorted(families())),
    metavar="KIND",
    help="Treat the state as this optimizer family instead of detecting it (see `ostate inspect --help`).",
)
@workers_option
@executor_options
@click.option(
    "--dpi",
    type=click.IntRange(min=20, max=1200),
    default=DEFAULT_DPI,
    show_default=True,
    metavar="N",
    help="Resolution of a PNG (SVG and PDF are vector graphics).",
)
@trust_pickle_option
@format_hint_option
@handle_errors
def plot(paths, out, kind, by, optimizer_index, kind_name, workers, executor, address, dpi, trust_pickle, format_hint):
    """Draw the optimizer state of the checkpoint(s) at PATH... into the figure OUT.

    Each PATH is anything `ostate inspect` reads; several are drawn on the same axes,
    labelled by their paths (e.g. checkpoint-500 and checkpoint-1000). For --kind
    timeline, PATH is the monitor's log (ostate_monitor.csv, or the folder holding it)
    or several checkpoints, drawn over their steps. Every number is
    taken from the same sketches as `ostate inspect`'s tables, so plotting costs about
    what inspecting does. OUT is written atomically and may replace an earlier figure,
    but never an input.

    \b
    Examples:
      ostate plot out/checkpoint-1000 -o lr.png
      ostate plot out/checkpoint-1000 -o profile.svg --kind layer-profile
      ostate plot out/checkpoint-500 out/checkpoint-1000 -o moments.pdf --kind moments
      ostate plot out/ostate_monitor.csv -o timeline.png --kind timeline
      ostate plot out/checkpoint-* -o timeline.png --kind timeline
    """
    figure_format(out)  # a wrong extension fails before any reading
    check_output(out, paths, overwrite=True)
    figure = draw_plot(
        kind,
        list(paths),
        by=by,
        optimizer_index=optimizer_index,
        workers=workers,
        progress=progress_enabled(),
        trust_pickle=trust_pickle,
        format_hint=format_hint,
        optimizer=kind_name,
        executor=ray_executor(
            executor, address, trust_pickle=trust_pickle, optimizer=kind_name, format_hint=format_hint
        ),
    )
    save_figure(figure, out, dpi=dpi)
    click.echo(f"wrote {out}: {kind} of {len(paths)} checkpoint{'s' if len(paths) > 1 else ''}", err=True)
