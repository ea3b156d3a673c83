"""Figures of optimizer state, drawn from the analysis' sketches (never from the raw tensors).

A checkpoint is read and summarised once (:func:`ostate.analysis.summarize`); every
figure is then drawn from the merged sketches, so a huge checkpoint plots about as fast
as it inspects. Nothing in this package reads a checkpoint: the figures take analyses,
:class:`Series` or (``compare``) a computed comparison. :mod:`ostate.figures` is the step
before, from paths, loaded checkpoints and optimizers (what ``ostate plot`` uses).
The kinds (one module each, listed in :data:`ostate.plots.registry.KINDS`):

- ``lr-histogram`` (:func:`plot_lr_histogram`): effective-learning-rate histograms;
- ``layer-profile`` (:func:`plot_layer_profile`): the effective learning rate layer by layer;
- ``moments`` (:func:`plot_moments`): |m̂| against √v̂ with reference lines (Adam family);
- ``compare`` (:func:`ostate.plots.compare.compare_figure`): how each parameter's state
  moved between checkpoints (``--by consecutive`` or ``first``, as ``ostate compare --against``);
- ``timeline`` (:mod:`ostate.plots.timeline`): the state over training steps, from the monitor's
  log or several checkpoints (a :class:`~ostate.plots.timeline.Timeline`).

Each function takes one or more analyses or series (several are overlaid) and returns a
:class:`matplotlib.figure.Figure` built without pyplot (no display needed);
:func:`save_figure` writes it as PNG, SVG or PDF, atomically. The artists that carry
numbers have a ``gid`` naming what they are and whose (``"median|checkpoint-500"``,
``"histogram|checkpoint-500"``, ``"joint|checkpoint-500"``, ``"noise"``, ...), so a program
can read the plotted values back from the Figure.

Example:
    >>> import ostate, torch, tempfile, os
    >>> from ostate.analysis import summarize
    >>> m = torch.nn.Linear(4, 2); opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    >>> m(torch.randn(8, 4)).sum().backward(); opt.step()
    >>> fig = plot("layer-profile", summarize(ostate.from_state_dict(opt.state_dict(), model=m)))
    >>> path = save_figure(fig, os.path.join(tempfile.mkdtemp(), "profile.svg"))
    >>> os.path.getsize(path) > 0
    True
"""

from __future__ import annotations

from typing import Any, Sequence

from matplotlib.figure import Figure

from ostate.plots.kind import COMPARISON, TIMELINE, PlotKind, check_plot_view
from ostate.plots.layer_profile import plot_layer_profile
from ostate.plots.lr_histogram import plot_lr_histogram
from ostate.plots.moments import plot_moments
from ostate.plots.registry import get_kind, plot_kinds
from ostate.plots.series import PlotInput, Series, as_series
from ostate.plots.style import save_figure

__all__ = [
    "PlotKind",
    "Series",
    "as_series",
    "get_kind",
    "plot",
    "plot_kinds",
    "plot_layer_profile",
    "plot_lr_histogram",
    "plot_moments",
    "save_figure",
]


def plot(
    kind: str,
    inputs: PlotInput | Sequence[PlotInput] | Any,
    *,
    by: str | None = None,
    labels: Sequence[str] | None = None,
    optimizer_index: int | None = None,
) -> Figure:
    """The figure of plot kind ``kind`` (see :func:`plot_kinds`) drawn from analyses.

    ``inputs`` are one or more analyses (:func:`ostate.analysis.summarize`; for ``moments``
    with ``joint=True``) or :class:`Series`, overlaid; for ``compare`` a
    :class:`~ostate.compare.compute.Comparison`; for ``timeline`` a
    :class:`~ostate.plots.timeline.Timeline`. ``by`` splits the figure (each kind's
    default when ``None``; for ``compare`` it must be the comparison's pairing when given).
    :func:`ostate.figures.plot` takes paths, checkpoints and optimizers as well.
    """
    chosen = get_kind(kind)
    if chosen.takes in (COMPARISON, TIMELINE):
        return chosen.draw(inputs, by=by)
    by = check_plot_view(chosen, by)
    return chosen.draw(as_series(inputs, labels=labels, optimizer_index=optimizer_index, joint=chosen.joint), by=by)
